"""The X-Spam-* fields filterd writes, in both formats ([headers] style "filterd" and "spamassassin"),
and the X-Spam-Report of an explanation: values that are one safe line each, and their bytes.

A value is built so that nothing from outside (a model version, an error text, a word of the mail)
can add a line, a field or an encoded word it did not mean; filterd.mail.headers puts them on the mail.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any

from filterd import __version__
from filterd.config import HeadersConfig
from filterd.policy.decision import Decision, scaled_score

_UNSAFE = re.compile(r"[^!-~]")  # in a token: spaces, controls, line breaks, non-ASCII
PLAIN = re.compile(r"[!-~]+")  # a word that can go into a header as is
MAX_LINE = 998  # RFC 5322, without the line ending
FOLD_AT = 78  # RFC 5322's recommended width for the lines we write
DEFAULT_HEADERS = HeadersConfig()
SA_TEST = "FILTERD_GPT2"  # our one "test" in X-Spam-Status tests=...
SA_MAX_STARS = 50  # SpamAssassin caps X-Spam-Level at 50 characters


def token(text: str, limit: int) -> str:
    """One header word: a model version or an error cannot add a line, a field or even a space."""
    return _UNSAFE.sub("_", str(text))[:limit] or "unknown"


def decision_fields(d: Decision | None, model: str, error: str, headers: HeadersConfig = DEFAULT_HEADERS,
                     report: str = "") -> list[tuple[str, str]]:  # fmt: skip
    if d is None:  # no Flag and no Score: nothing was measured
        return [("X-Spam-Status", f"Unknown, reason={token(error, 100)}")]
    yes = "Yes" if d.spam else "No"
    if headers.style == "spamassassin":
        fields = _sa_fields(d, model, headers.required_score)
    elif d.score is None:  # a list decided: no Score, the list named instead of a model
        return [("X-Spam-Flag", yes.upper()), ("X-Spam-Status", f"{yes}, listed={token(d.listed, 40)}")]
    else:
        score = f"{d.score:.4f}"
        fields = [
            ("X-Spam-Flag", yes.upper()),
            ("X-Spam-Score", score),
            ("X-Spam-Status", f"{yes}, score={score} threshold={d.threshold:.4f} model={token(model, 200)}"),
        ]
    report = _REPORT_UNSAFE.sub("_", report)[:_MAX_REPORT]  # report_value made it safe; a caller's string is checked anyway
    return fields + [("X-Spam-Report", report)] if report.strip() else fields


_REPORT_UNSAFE = re.compile(r"[^ -~]")  # printable ASCII and the space: no CR, LF, tab or other control can pass
_REPORT_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MAX_REPORT = MAX_LINE - len("X-Spam-Report: ")


def explanation_header(e: Any, cfg: Any) -> str:
    """The X-Spam-Report value for an Explanation when [explain] header is on (`cfg`: ExplainConfig), else ""."""
    return report_value(e, cfg.max_header_bytes) if e is not None and cfg.header else ""


def report_value(e: Any, max_bytes: int) -> str:
    """An X-Spam-Report value for an Explanation: `+1.234 word | ... | -0.321 word (method, log-odds)`, at most
    `max_bytes`, cut between words. A word that is not plain printable ASCII (spaces, controls, line breaks,
    non-ASCII, or something that looks like an encoded word) goes in as RFC 2047 encoded words."""
    tail = f" ({token(e.method, 40)}, log-odds)"
    items: list[str] = []
    used = len(tail)
    for c in e.words:
        word = _REPORT_CONTROL.sub("\ufffd", c.word)  # decoded, an encoded word must not carry a control either
        word = word if PLAIN.fullmatch(word) and "=?" not in word else " ".join(encoded_words(word))
        item = f"{c.weight:+.3f} {word}"
        cost = len(item) + (3 if items else 0)
        if used + cost > min(max_bytes, _MAX_REPORT):
            break
        items.append(item)
        used += cost
    return " | ".join(items) + tail if items else ""


def _tenths(x: float) -> str:
    return f"{x:.1f}" if abs(x * 10 - round(x * 10)) < 1e-9 else f"{x:g}"


def sa_score(d: Decision, required: float) -> str:
    """The X-Spam-Score of a decision on SpamAssassin's scale (P(spam) mapped by `scaled_score`, the
    HTTP door's mapping), one decimal as SpamAssassin writes it. Rounded away from `required`
    (spam up, ham down), so `X-Spam-Score >= required` matches exactly the spam, also when a rule
    compares only the integer part (Sieve's i;ascii-numeric) and `required` is whole."""
    if d.score is None:  # a list decided: the ends of the scale, as the HTTP door reports them
        return _tenths(2 * required if d.spam else 0.0)
    tenths = round(scaled_score(d.score, d.threshold, required) * 10, 6)  # 72.9999999 is 7.3
    if d.spam:
        return _tenths(math.ceil(tenths) / 10)
    shown = math.floor(tenths) / 10
    return _tenths(shown - 0.1 if shown >= required else shown)  # a ham a hair under required


def _sa_fields(d: Decision, model: str, required: float) -> list[tuple[str, str]]:
    """SpamAssassin's fields: Flag only on spam (SA writes none on ham), Score, Level (one star per
    whole point, capped as SA caps it), Status with SA's keys (tests, autolearn, version) and ours (model)."""
    score = sa_score(d, required)
    tests = SA_TEST if d.score is not None else "FILTERD_" + token(d.listed, 40).upper()  # e.g. FILTERD_DENY_SENDERS
    status = (f"{'Yes' if d.spam else 'No'}, score={score} required={_tenths(required)} tests={tests} autolearn=no "
              f"version=filterd-{__version__}" + (f" model={token(model, 200)}" if d.score is not None else ""))  # fmt: skip
    fields = [("X-Spam-Flag", "YES")] if d.spam else []
    stars = "*" * min(max(int(float(score)), 0), SA_MAX_STARS)
    return fields + [("X-Spam-Score", score), ("X-Spam-Level", stars), ("X-Spam-Status", status)]


def _sa_folded(name: str, value: str, eol: bytes) -> bytes:
    """`name: value` folded between words with a tab, as SpamAssassin folds its long fields."""
    lines, line = [], f"{name}:"
    for word in value.split(" "):
        if len(line) + 1 + len(word) > FOLD_AT and line.strip() and not line.endswith(":"):
            lines.append(line)
            line = "\t" + word
        else:
            line += " " + word
    lines.append(line)
    return eol.join(text.encode("ascii") for text in lines) + eol


def field_bytes(fields: list[tuple[str, str]], eol: bytes, headers: HeadersConfig = DEFAULT_HEADERS) -> bytes:
    if headers.style == "spamassassin":
        return b"".join(_sa_folded(name, value, eol) if value else f"{name}:".encode("ascii") + eol for name, value in fields)
    return b"".join(f"{name}: {value}".encode("ascii") + eol for name, value in fields)


def encoded_words(text: str) -> list[str]:
    """RFC 2047 words for text that cannot go into a header as is; each stays within 75 characters."""
    chunks, chunk = [], ""
    for char in text:
        if len((chunk + char).encode("utf-8", "replace")) > 45:  # 45 bytes are 60 base64 characters
            chunks.append(chunk)
            chunk = ""
        chunk += char
    chunks.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(c.encode('utf-8', 'replace')).decode()}?=" for c in chunks if c]
