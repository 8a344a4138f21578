"""Logging for both commands (`filterd`, `filterd-trainer`): one line per event, whatever it quotes.

Log lines quote what clients send (a `MAIL FROM`, a Redis field, an exception's text), so the
formatter escapes control characters in the whole formatted line: CR, LF and tab as \\r \\n \\t, the
other C0 controls, DEL and C1 controls as \\xNN, U+2028/U+2029 as \\uNNNN. No message can start a
forged line of its own, in the text format or the JSON one (where they are JSON escapes).

Under systemd (`$JOURNAL_STREAM` names our stderr) each line starts with its syslog priority
(`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), which journald reads and strips, so
`journalctl -p warning` works; the timestamp is left to journald.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import IO, Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"  # journald stamps each line itself

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_TEXT_ESCAPES = {c: _NAMED.get(chr(c)) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}
# Inside a JSON document json.dumps already escapes C0; these it leaves raw, and \x is not JSON.
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _CONTROLS if c >= 0x7F}


def escape_controls(text: str) -> str:
    """`text` with every control character written as a visible escape (see the module docstring)."""
    return text.translate(_TEXT_ESCAPES)


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald files a Python level under."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stream_is_journal(stream: IO[str]) -> bool:
    """True when `stream` is the journald stream systemd connected (`$JOURNAL_STREAM` = device:inode)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no real file (pytest's capture, a StringIO)
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


class LineFormatter(logging.Formatter):
    """One escaped line per record: text (`TEXT_FORMAT`) or a JSON object, with an optional `<N>` prefix."""

    def __init__(self, fmt: str = "text", journald: bool = False) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        super().__init__(JOURNAL_FORMAT if journald else TEXT_FORMAT)
        self.json = fmt == "json"
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        if self.json:
            line = self._json(record)
        else:
            line = escape_controls(super().format(record))
        return f"<{syslog_priority(record.levelno)}>{line}" if self.journald else line

    def _json(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False).translate(_JSON_ESCAPES)


class _LineHandler(logging.StreamHandler):
    """setup_logging's handler: a later call replaces it and leaves other handlers (pytest's) alone."""


def setup_logging(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Send every logger's records to `stream` (stderr) through LineFormatter; replaces an earlier call's handler."""
    stream = stream or sys.stderr
    handler = _LineHandler(stream)
    handler.setFormatter(LineFormatter(fmt, journald=stream_is_journal(stream)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LineHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
