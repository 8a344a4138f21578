"""The console's server: routes to the pages of filterd.console (the history, a verdict, models, classify)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.parse
from pathlib import Path
from typing import Any, Awaitable, Callable

from filterd.config import Config
from filterd.sources import SOURCES
from filterd.store.history import Filter, History, Verdict
from filterd.net.http import HttpError, Request, Server, ServerSettings
from filterd.console.guard import Guard, form_value
from filterd.console.render import (ACTIONS, CSS, MAX_BODY, PAGE, REASONS, Page, esc, fmt_score, fmt_time, highlight, layout, num, pair,
                                    parse_time, pct, response, words_table)

log = logging.getLogger("filterd")

_VERDICT_PATH = re.compile(r"/verdict/([0-9]{1,18})(/learn)?")


class Console(Server):
    """The console's HTTP server. `live()`: the live model's version; `score`: the daemon's scorer (no reservoir)."""

    def __init__(self, cfg: Config, live: Callable[[], str], score: Callable[[str], Awaitable[Any]] | None,
                 explain: Callable[[str], Awaitable[Any]] | None = None) -> None:  # fmt: skip
        c = cfg.console
        # The password is HTTP Basic, checked in `_route` (its 401 carries WWW-Authenticate and the page headers).
        super().__init__(ServerSettings(name="console", host=c.listen.host, port=c.listen.port, max_body_bytes=MAX_BODY,
                                        read_timeout=30.0, idle_timeout=60.0, password=c.password, password_header=None,
                                        listening="listening on http://{host}:{port}/"), self._route)  # fmt: skip
        self.full = cfg
        self.live = live
        self.score_text = score
        self.explain = explain  # the daemon's bounded explainer (queue, deadline, nice): text -> Explanation | None
        self.guard = Guard(c.password)

    # --- routing ---------------------------------------------------------------------------

    async def _route(self, req: Request) -> bytes:
        session, new_session = self.guard.session(req)
        try:
            self.guard.check_host(req)
            self.guard.check_password(req)
            page = await self._dispatch(req, session)
        except HttpError as e:
            page = self._error_page(e.status, str(e))
        except Exception:  # a bug costs one page, not the daemon
            log.exception("console: %s %s failed", req.method, req.path)
            page = self._error_page(500, "internal error (see the daemon's log)")
        return response(req, page, session if new_session else "")

    async def _dispatch(self, req: Request, session: str) -> Page:
        path, method = req.path, req.method
        q = urllib.parse.parse_qs(req.query, keep_blank_values=True)
        if method == "POST":
            self.guard.check_csrf(req, session)
            form = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"), keep_blank_values=True)
        elif method in ("GET", "HEAD"):
            form = {}
        else:
            raise HttpError(405, f"{method} is not served here")
        token = self.guard.token(session)
        if path == "/console.css":
            return Page(200, CSS, "text/css; charset=utf-8")
        if path == "/" and method != "POST":
            return Page(303, b"", location="/history")
        if path == "/history" and method != "POST":
            return await self._history(q)
        m = _VERDICT_PATH.fullmatch(path)
        if m and not m[2] and method != "POST":
            return await self._verdict(int(m[1]), q, token)
        if m and m[2] and method == "POST":
            return await self._learn(int(m[1]), form_value(form, "label"))
        if path == "/models" and method != "POST":
            return await self._models(q, token)
        if path == "/models/rollback" and method == "POST":
            return await self._rollback()
        if path == "/classify":
            return await self._classify(form_value(form, "text") if method == "POST" else None, token)
        raise HttpError(404 if path not in ("/history", "/models", "/") else 405, f"no page {path}")

    # --- responses -------------------------------------------------------------------------

    def _page(self, title: str, body: str) -> bytes:
        return layout(title, body, self.live(), self.full.console.grafana_url)

    def _error_page(self, status: int, message: str) -> Page:
        return Page(status, self._page(f"{status} {REASONS.get(status, 'Error')}", f'<p class="err">{esc(message)}</p>'))

    # --- pages -----------------------------------------------------------------------------

    def _history_file(self) -> Path | None:
        h = self.full.history
        return h.path if h.enabled else None

    async def _read_history(self, fn: Callable[[History], Any]) -> Any:
        path = self._history_file()
        if path is None:
            raise HttpError(404, "the verdict history is off: set [history] enabled = true")
        if not path.is_file():
            return None

        def run() -> Any:
            with History(path, writer=False) as h:
                return fn(h)

        return await asyncio.to_thread(run)

    async def _history(self, q: dict[str, list[str]]) -> Page:
        verdict, action, source = form_value(q, "verdict"), form_value(q, "action"), form_value(q, "source")
        since_text, until_text = form_value(q, "since"), form_value(q, "until")
        try:
            since, until = parse_time(since_text), parse_time(until_text)
            before = int(form_value(q, "before")) if form_value(q, "before") else None
        except ValueError:
            raise HttpError(400, "since/until must be times like 2026-12-01T19:20 (UTC), before an id") from None
        f = Filter(verdict if verdict in ("spam", "ham") else "", action if action in ACTIONS else "",
                   source if source in SOURCES else "", since, until, before, PAGE)  # fmt: skip
        rows: list[Verdict] = await self._read_history(lambda h: h.query(f)) or []

        def select(name: str, value: str, options: tuple[str, ...]) -> str:
            opts = "".join(f'<option value="{o}"{" selected" if o == value else ""}>{o or "any"}</option>' for o in ("", *options))
            return f'<label>{name}<select name="{name}">{opts}</select></label>'

        filters = (f'<form class="filters" method="get" action="/history">{select("verdict", f.verdict, ("spam", "ham"))}'
                   f'{select("action", f.action, ACTIONS)}{select("source", f.source, SOURCES)}'
                   f'<label>since (UTC)<input type="datetime-local" name="since" value="{esc(since_text)}"></label>'
                   f'<label>until (UTC)<input type="datetime-local" name="until" value="{esc(until_text)}"></label>'
                   '<button type="submit">Filter</button> <a href="/history">clear</a></form>')  # fmt: skip
        body = [filters]
        if not rows:
            body.append('<p class="note">No decisions match.</p>')
        else:
            body.append('<table id="history"><tr><th>time (UTC)</th><th>door</th><th>id</th><th>from</th><th>to</th>'
                        '<th>subject</th><th>score</th><th>verdict</th><th>action</th><th>model</th></tr>')  # fmt: skip
            for v in rows:
                to = ", ".join(v.recipients[:3]) + (f" +{len(v.recipients) - 3}" if len(v.recipients) > 3 else "")
                body.append(
                    f'<tr class="row-{v.verdict}"><td><a href="/verdict/{v.id}">{fmt_time(v.at)}</a></td><td>{esc(v.source)}</td>'
                    f"<td>{esc(v.ref)}</td><td>{esc(v.sender)}</td><td>{esc(to)}</td><td>{esc(v.subject)}</td>"
                    f'<td class="num">{fmt_score(v.score)}</td><td class="{esc(v.verdict)}">{esc(v.verdict)}</td>'
                    f"<td>{esc(v.action)}</td><td>{esc(v.model)}</td></tr>"
                )  # fmt: skip
            body.append("</table>")
            if len(rows) == PAGE:
                keep = {k: v for k, v in (("verdict", f.verdict), ("action", f.action), ("source", f.source),
                                          ("since", since_text), ("until", until_text)) if v}  # fmt: skip
                older = urllib.parse.urlencode({**keep, "before": rows[-1].id})
                body.append(f'<p><a id="older" href="/history?{esc(older)}">older &rarr;</a></p>')
        return Page(200, self._page("Verdict history", "".join(body)))

    async def _verdict(self, id: int, q: dict[str, list[str]], token: str) -> Page:
        v: Verdict | None = await self._read_history(lambda h: h.get(id))
        if v is None:
            raise HttpError(404, f"no verdict {id} (deleted by retention, or never recorded)")
        fields = [("time (UTC)", fmt_time(v.at)), ("door", v.source), ("queue / entry id", v.ref), ("from", v.sender),
                  ("to", ", ".join(v.recipients)), ("subject", v.subject), ("P(spam)", fmt_score(v.score)),
                  ("verdict", v.verdict), ("action", v.action), ("model", v.model), ("decided by list", v.listed)]  # fmt: skip
        body = ['<table id="fields">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(x)}</td></tr>" for k, x in fields) + "</table>"]
        body.append("<h2>Why</h2>")
        words = (v.explanation or {}).get("words")
        words = [w for w in words if isinstance(w, dict)] if isinstance(words, list) else None
        if v.text is not None:
            body.append(f'<pre class="text" id="text">{highlight(v.text, words or [])}</pre>')
            if not words:
                body.append('<p class="note">No explanation was recorded for this verdict.</p>')
            else:
                body.append('<p class="note">Red words raised P(spam), green ones lowered it; darker is stronger.'
                            f' Method: {esc((v.explanation or {}).get("method", "?"))}.</p>')  # fmt: skip
        elif words:
            body.append('<p class="note">The text is not stored ([history] store_text = false); the words that moved the score:</p>')
            body.append(words_table(words))
        else:
            body.append('<p class="note">No explanation was recorded, and the text is not stored ([history] store_text = false).</p>')
        body.append("<h2>Teach the filter</h2>")
        learned = form_value(q, "learned")
        if learned in ("spam", "ham"):
            body.append(f'<p class="ok" id="learned">Stored in the label store as {learned}; the next refit learns from it.</p>')
        if v.text is None:
            why = "the text of this message is not stored ([history] store_text = false), so there is nothing to learn from"
            body.append(f'<p class="note" id="learn-disabled">{esc(why)}.</p>')
            for label in ("spam", "ham"):
                body.append(f'<button disabled title="{esc(why)}">learn as {label}</button> ')
        else:
            current = await asyncio.to_thread(self._label_of, v.text)
            if current:
                body.append(f'<p class="note" id="label-now">In the label store as <b>{esc(current)}</b>.</p>')
            for label in ("spam", "ham"):
                body.append(f'<form class="inline" method="post" action="/verdict/{v.id}/learn">'
                            f'<input type="hidden" name="csrf" value="{token}"><input type="hidden" name="label" value="{label}">'
                            f'<button type="submit" id="learn-{label}">learn as {label}</button></form> ')  # fmt: skip
        return Page(200, self._page(f"Verdict {v.id}", "".join(body)))

    def _label_of(self, text: str) -> str:
        from filterd.store.labels import LabelStore, message_id

        path = self.full.trainer.store
        if not path.is_file():
            return ""
        with LabelStore(path) as store:
            row = store.get(message_id(text))
        return f"{row.label} (by {row.source})" if row else ""

    async def _learn(self, id: int, label: str) -> Page:
        if label not in ("spam", "ham"):
            raise HttpError(400, "label must be spam or ham")
        v: Verdict | None = await self._read_history(lambda h: h.get(id))
        if v is None:
            raise HttpError(404, f"no verdict {id}")
        if v.text is None:
            raise HttpError(409, "the text of this message is not stored ([history] store_text = false): nothing to learn from")
        text = v.text

        def add() -> Any:
            from filterd.store.labels import LabelStore

            with LabelStore(self.full.trainer.store) as store:  # as `filterd-trainer learn`: one row per text
                return store.add(text, label, "console")

        try:
            result = await asyncio.to_thread(add)
        except Exception as e:
            raise HttpError(500, f"label store {self.full.trainer.store}: {' '.join(str(e).split())}") from None
        log.info("console: verdict %d learned as %s (%s)", id, label, "new" if result.new else "flipped" if result.flipped else "unchanged")
        return Page(303, b"", location=f"/verdict/{id}?learned={label}")

    async def _models(self, q: dict[str, list[str]], token: str) -> Page:
        rows = await asyncio.to_thread(self._model_rows)
        body = []
        rolled = form_value(q, "rolled")
        if rolled:
            body.append(f'<p class="ok" id="rolled">Rolled back: current now points at {esc(rolled)}; '
                        "the daemon loads it at its next model check.</p>")  # fmt: skip
        body.append(f'<p class="note">Versions in {esc(self.full.trainer.models_dir)}, newest first. '
                    "Metrics are those the trainer wrote beside each version (filterd.json).</p>")  # fmt: skip
        if not rows:
            body.append('<p class="note">No published versions.</p>')
        else:
            body.append('<table id="models"><tr><th>version</th><th>created</th><th>base</th><th>trained</th>'
                        "<th>test accuracy</th><th>ham FPR</th><th>spam recall</th><th>ROC AUC</th><th>n</th><th>refit</th></tr>")  # fmt: skip
            for r in rows:
                m = r["test"]
                mark = " (current)" if r["current"] else ""
                body.append(
                    f'<tr{" class=current" if r["current"] else ""}><td><code>{esc(r["version"])}</code>{mark}</td>'
                    f'<td>{esc(r["created"])}</td><td>{esc(r["base"])}</td><td>{esc(r["trainable"])}</td>'
                    f'<td class="num">{pct(m.get("accuracy"))}</td><td class="num">{pct(m.get("ham_fpr"))}</td>'
                    f'<td class="num">{pct(m.get("spam_recall"))}</td><td class="num">{num(m.get("roc_auc"))}</td>'
                    f'<td class="num">{esc(m.get("n", ""))}</td><td>{esc(r["refit"])}</td></tr>'
                )  # fmt: skip
            body.append("</table>")
        refits = await asyncio.to_thread(self._refit_rows)
        body.append('<h2>Recent refits</h2>')
        if not refits:
            body.append('<p class="note">No refit has run yet (refits.jsonl in models_dir is written by the trainer).</p>')
        else:
            body.append('<table id="refits"><tr><th>time</th><th>outcome</th><th>mode</th><th>from</th><th>to</th>'
                        "<th>test accuracy: candidate / current</th><th>golden ham FPR: candidate / current</th>"
                        "<th>seconds</th><th>why</th></tr>")  # fmt: skip
            for r in refits:
                body.append(
                    f'<tr class="refit-{esc(str(r.get("outcome", "")))}"><td>{esc(str(r.get("time", ""))[:19].replace("T", " "))}</td>'
                    f'<td>{esc(r.get("outcome", ""))}</td><td>{esc(r.get("mode", ""))}</td>'
                    f'<td><code>{esc(r.get("current_version") or "")}</code></td><td><code>{esc(r.get("version") or "")}</code></td>'
                    f'<td class="num">{pair(r, "test", "accuracy")}</td><td class="num">{pair(r, "golden", "ham_fpr")}</td>'
                    f'<td class="num">{r.get("seconds", 0):.1f}</td><td>{esc(r.get("reason", ""))}</td></tr>'
                )  # fmt: skip
            body.append("</table>")
        can = any(r["current"] for r in rows[:-1]) if rows else False
        live_path, current_link = self.full.model.path, self.full.trainer.models_dir / "current"
        if live_path.absolute() != current_link.absolute():
            body.append(f'<p class="err" id="not-current">The daemon serves [model] path = {esc(live_path)}, not {esc(current_link)}:'
                        " a rollback here does not change the live model.</p>")  # fmt: skip
        body.append(f'<form method="post" action="/models/rollback"><input type="hidden" name="csrf" value="{token}">'
                    f'<button type="submit" id="rollback"{"" if can else " disabled"}>roll back to the previous version</button>'
                    "</form>")  # fmt: skip
        if not can:
            body.append('<p class="note">No older version to roll back to.</p>')
        return Page(200, self._page("Model versions", "".join(body)))

    def _model_rows(self) -> list[dict[str, Any]]:
        from filterd.store.models import ModelStore

        store = ModelStore(self.full.trainer.models_dir)
        current = store.current_version()
        out = []
        for version in store.versions():
            try:
                meta = json.loads((store.versions_dir / version / "filterd.json").read_text())
            except (OSError, ValueError):
                meta = {}
            metrics = meta.get("metrics") or {}
            refit = (meta.get("extra") or {}).get("refit")
            if isinstance(refit, dict):
                counts = refit.get("counts") or {}
                what = f"from {refit.get('parent', '?')}, {refit.get('mode', '?')}, final fit: {refit.get('final_fit', '?')}"
                if isinstance(counts, dict) and counts:
                    what += ", labels " + ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, int))
            else:
                what = "initial fit"
            test = metrics.get("test") or next(iter(metrics.values()), {}) if isinstance(metrics, dict) else {}
            out.append({"version": version, "current": version == current, "created": str(meta.get("created", ""))[:16].replace("T", " "),
                        "base": meta.get("base", ""), "trainable": meta.get("trainable", ""),
                        "test": test if isinstance(test, dict) else {}, "refit": what})  # fmt: skip
        return out

    def _refit_rows(self) -> list[dict[str, Any]]:
        from filterd.store.models import ModelStore

        return ModelStore(self.full.trainer.models_dir).refits()

    async def _rollback(self) -> Page:
        from filterd.store.models import ModelStore

        from filterd.errors import FilterdError

        try:
            version = await asyncio.to_thread(ModelStore(self.full.trainer.models_dir).rollback)
        except FilterdError as e:
            raise HttpError(409, str(e)) from None
        log.info("console: rolled back to %s", version)
        return Page(303, b"", location=f"/models?rolled={urllib.parse.quote(version)}")

    async def _classify(self, text: str | None, token: str) -> Page:
        body = [f'<form method="post" action="/classify"><input type="hidden" name="csrf" value="{token}">'
                f'<p><textarea name="text" id="paste" placeholder="Paste a message (its text, or a whole mail)">{esc(text or "")}</textarea></p>'
                '<button type="submit" id="score">Score</button></form>']  # fmt: skip
        if text is not None and text.strip():
            if self.score_text is None:
                raise HttpError(503, "no model is loaded yet")
            from filterd.mail.text import extract_text

            if re.match(r"(?:[A-Za-z0-9-]+:[^\n]*\n)+\r?\n", text):  # looks like a whole mail: read it as the doors do
                text = await asyncio.to_thread(extract_text, text.encode("utf-8", "surrogateescape"))
            try:
                scored = await self.score_text(text)
            except Exception as e:
                raise HttpError(503, f"could not score: {type(e).__name__}") from None
            verdict = "spam" if scored.score >= scored.threshold else "ham"
            body.append(f'<p id="result">P(spam) = <b id="p-spam">{scored.score:.4f}</b>: <span class="{verdict}">{verdict}</span>'
                        f" at the model's threshold {scored.threshold:.4f} (model {esc(scored.model)})</p>")  # fmt: skip
            explanation = await self._explain(text)
            if explanation is None:
                body.append('<p class="note" id="no-explain">explanations not available</p>')
            else:
                words = [w for w in explanation.get("words", []) if isinstance(w, dict)]
                body.append(f'<pre class="text" id="text">{highlight(text, words)}</pre>')
        return Page(200, self._page("Score a message", "".join(body)))

    async def _explain(self, text: str) -> dict[str, Any] | None:
        """The explanation, through the daemon's explainer and so within its bounds (one thread at `nice`, `max_queue`,
        `deadline`); None when there is none (no explainer, busy, past the deadline, failed: counted there)."""
        if self.explain is None:
            return None
        try:
            result = await self.explain(text)
        except Exception:
            log.exception("console: explanation failed")
            return None
        return result.to_json() if result is not None else None
