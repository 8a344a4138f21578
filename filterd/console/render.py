"""The console's HTML: the page type, escaping and formatting, the explanation highlighter, the layout and
the response bytes with the security headers every page carries."""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass
from typing import Any

from filterd.net.http import Request

COOKIE = "filterd_console"
PAGE = 50  # rows per history page
MAX_BODY = 1 << 20  # a pasted message, a form
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")  # fmt: skip
REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
ACTIONS = ("pass", "tag", "subject", "quarantine", "discard", "soft-reject", "reject")

CSS = b"""
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#cfd8dc;text-decoration:none}header a:hover{color:#fff}header b{margin-right:16px}
main{padding:12px 16px}table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eceff1}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.spam{color:#b71c1c;font-weight:600}.ham{color:#1b5e20;font-weight:600}
form.filters{margin-bottom:10px;display:flex;gap:8px;flex-wrap:wrap;align-items:end}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#555}
pre.text{white-space:pre-wrap;background:#fff;border:1px solid #ddd;padding:8px;max-width:960px}
mark{padding:0 1px;border-radius:2px;color:#000}
mark.up1{background:#ffcdd2}mark.up2{background:#ef9a9a}mark.up3{background:#e57373}
mark.dn1{background:#c8e6c9}mark.dn2{background:#a5d6a7}mark.dn3{background:#81c784}
.note{color:#555}.err{color:#b71c1c}.ok{color:#1b5e20}textarea{width:100%;max-width:960px;height:12em}
header .live{margin-left:auto;color:#cfd8dc}button{padding:4px 12px}form{margin-top:8px}button[disabled]{opacity:.5}.inline{display:inline}
"""


@dataclass
class Page:
    status: int
    body: bytes
    ctype: str = "text/html; charset=utf-8"
    location: str = ""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def fmt_score(s: float | None) -> str:
    return "-" if s is None else f"{s:.4f}"


def parse_time(text: str) -> float | None:
    """ "2026-12-01T19:20" or "2026-12-01 19:20:05" (UTC) -> Unix time; "" -> None; ValueError otherwise."""
    text = text.strip()
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace(" ", "T")).replace(tzinfo=dt.timezone.utc).timestamp()


def highlight(text: str, words: list[dict[str, Any]]) -> str:
    """The text escaped, with each explanation word inside its span marked: <mark class="up|dn1..3">."""
    spans = []
    for w in words:
        try:
            start, end, weight = int(w["start"]), int(w["end"]), float(w["weight"])
        except (KeyError, TypeError, ValueError):
            continue
        if 0 <= start < end <= len(text) and weight == weight and weight != 0:
            spans.append((start, end, weight))
    top = max((abs(s[2]) for s in spans), default=1.0) or 1.0
    out, at = [], 0
    for start, end, weight in sorted(spans):
        if start < at:  # overlapping spans: the first one wins
            continue
        level = 1 + min(2, int(3 * abs(weight) / top - 1e-9))
        cls = f"{'up' if weight > 0 else 'dn'}{level}"
        out.append(esc(text[at:start]))
        out.append(f'<mark class="{cls}" title="{weight:+.4f}">{esc(text[start:end])}</mark>')
        at = end
    out.append(esc(text[at:]))
    return "".join(out)


def words_table(words: list[dict[str, Any]]) -> str:
    rows = []
    for w in sorted(words, key=lambda w: -abs(float(w.get("weight", 0) or 0)) if isinstance(w, dict) else 0)[:50]:
        if not isinstance(w, dict):
            continue
        weight = float(w.get("weight", 0) or 0)
        cls = "up2" if weight > 0 else "dn2"
        rows.append(f'<tr><td><mark class="{cls}">{esc(w.get("word", ""))}</mark></td><td class="num">{weight:+.4f}</td></tr>')
    return f'<table class="words"><tr><th>word</th><th>weight</th></tr>{"".join(rows)}</table>'


def response(req: Request, page: Page, set_session: str) -> bytes:
    body = b"" if req.method == "HEAD" else page.body
    keep = req.keep_alive and page.status not in (400, 401, 403)
    lines = [
        f"HTTP/1.1 {page.status} {REASONS.get(page.status, 'Error')}", f"Content-Type: {page.ctype}",
        f"Content-Length: {len(body)}", f"Content-Security-Policy: {CSP}", "X-Content-Type-Options: nosniff",
        "X-Frame-Options: DENY", "Referrer-Policy: same-origin", "Cache-Control: no-store",
        f"Connection: {'keep-alive' if keep else 'close'}",
    ]  # fmt: skip
    if page.location:
        lines.append(f"Location: {page.location}")
    if page.status == 401:
        lines.append('WWW-Authenticate: Basic realm="filterd console", charset="UTF-8"')
    if set_session:
        lines.append(f"Set-Cookie: {COOKIE}={set_session}; Path=/; HttpOnly; SameSite=Strict")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def layout(title: str, body: str, live: str, grafana: str) -> bytes:
    """A page: the navigation (Grafana when configured), the live model's version, the title and `body`."""
    nav = ['<a href="/history">History</a>', '<a href="/models">Models</a>', '<a href="/classify">Classify</a>']
    if grafana:
        nav.append(f'<a href="{esc(grafana)}" rel="noopener noreferrer">Grafana</a>')
    live = live or "none loaded"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)} - filterd</title>'
            f'<link rel="stylesheet" href="/console.css"></head><body><header><b>filterd</b>{"".join(nav)}'
            f'<span class="note live">live model <code id="live-model">{esc(live)}</code></span>'
            f'</header><main><h1>{esc(title)}</h1>{body}</main></body></html>').encode()  # fmt: skip


def pct(x: Any) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "-"


def pair(refit: dict[str, Any], split: str, key: str) -> str:
    """"candidate / current" for one metric of a logged refit."""
    got = []
    for model in ("candidate", "current"):
        m = (refit.get(model) or {}).get(split) if isinstance(refit.get(model), dict) else None
        got.append(pct(m.get(key) if isinstance(m, dict) else None))
    return " / ".join(got)


def num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"

