"""Log lines: control characters escaped (also through the real SMTP ingress), journald priorities, JSON."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from filterd.doors.smtp import SmtpIngress
from filterd.obs.logs import LineFormatter, escape_controls, setup_logging

from testing.smtp_sink import SmtpSink
from tests.test_smtp_ingress import door_path, smtp_cfg, word_score

HOSTILE = "a\rFAKE 2026-01-01 ERROR forged\nline\x0b\x00\t\x1b[31m\x7f\x85\u2028end"


def _record(msg: str, *args: object, level: int = logging.WARNING, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("filterd.test", level, __file__, 1, msg, args, exc_info)


def test_escape_controls_leaves_no_control_character():
    out = escape_controls(HOSTILE)
    assert out == "a\\rFAKE 2026-01-01 ERROR forged\\nline\\x0b\\x00\\t\\x1b[31m\\x7f\\x85\\u2028end"
    assert out.isprintable()
    assert escape_controls("ünïcödé, € and 中文 stay") == "ünïcödé, € and 中文 stay"


def test_text_formatter_writes_one_line_per_record_even_with_a_traceback():
    fmt = LineFormatter("text")
    line = fmt.format(_record("smtp: from=<%s> rcpts=%d", HOSTILE, 1, exc=True))
    assert "\n" not in line and "\r" not in line and line.isprintable()
    assert "WARNING filterd.test: smtp: from=<a\\rFAKE" in line
    assert "ValueError: bad\\nvalue" in line  # the traceback is kept, escaped into the same line


def test_json_format_one_object_per_line_with_level_logger_message():
    fmt = LineFormatter("json")
    line = fmt.format(_record("from=<%s>", HOSTILE, exc=True))
    assert "\n" not in line and "\r" not in line and "\x7f" not in line and "\u2028" not in line
    doc = json.loads(line)
    assert doc["level"] == "warning" and doc["logger"] == "filterd.test"
    assert doc["message"] == f"from=<{HOSTILE}>"  # JSON escapes, so the reader gets the text back exactly
    assert "ValueError: bad\nvalue" in doc["exception"] and doc["time"].endswith("+00:00")


def test_journald_prefix_only_when_journal_stream_is_our_stderr():
    """A child logs to a pipe; $JOURNAL_STREAM names that pipe (as systemd would) or something else."""
    code = (
        "import logging; from filterd.obs.logs import setup_logging; setup_logging('debug');"
        "log = logging.getLogger('filterd.x');"
        "log.error('e'); log.warning('w'); log.info('i'); log.debug('d')"
    )

    def run(journal_stream: str | None, fmt_json: bool = False) -> list[str]:
        r, w = os.pipe()
        st = os.fstat(w)
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream.format(dev=st.st_dev, ino=st.st_ino)
        c = code.replace("setup_logging('debug')", "setup_logging('debug', 'json')") if fmt_json else code
        p = subprocess.Popen([sys.executable, "-c", c], stderr=w, env=env)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        assert p.wait(timeout=60) == 0, out
        return out.splitlines()

    lines = run("{dev}:{ino}")
    assert [x[:3] for x in lines] == ["<3>", "<4>", "<6>", "<7>"], lines
    assert lines[1] == "<4>WARNING filterd.x: w"  # no timestamp: journald adds its own
    assert [json.loads(x[3:])["level"] for x in run("{dev}:{ino}", fmt_json=True)] == ["error", "warning", "info", "debug"]
    plain = run("1:2")  # set, but not our stderr (e.g. inherited by a child writing to a file)
    assert not any(x.startswith("<") for x in plain) and plain[1].endswith("WARNING filterd.x: w")
    assert not any(x.startswith("<") for x in run(None))


def _smtp_dialogue(port: int, commands: list[bytes]) -> list[bytes]:
    """Send each command over a raw socket (no client library to clean the input up); the reply codes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if line[3:4] != b"-":
                    return line[:3]

        codes = [reply()]
        for c in commands:
            s.sendall(c)
            codes.append(reply())
    return codes


def test_bare_cr_in_mail_from_cannot_forge_a_log_line():
    buf = io.StringIO()
    handler = setup_logging("info", stream=buf)
    forged = "ERROR filterd forged line"  # what a log reader would take for a line of its own
    try:
        with SmtpSink() as sink:
            cfg = smtp_cfg(sink)

            async def main() -> list[bytes]:
                ingress = SmtpIngress(cfg, door_path(cfg, word_score))
                await ingress.start()
                try:
                    return await asyncio.to_thread(_smtp_dialogue, cfg.listen.port, [
                        b"EHLO client\r\n", f"MAIL FROM:<x\r{forged}@example.org>\r\n".encode(),
                        b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n",
                        b"Message-ID: <m\x1b[2K\x0bERROR forged@example.org>\r\nSubject: hi\r\n\r\nsee you at noon\r\n.\r\n",
                        b"QUIT\r\n",
                    ])  # fmt: skip
                finally:
                    await ingress.close()

            codes = asyncio.run(main())
    finally:
        logging.getLogger().removeHandler(handler)
    # The raw envelope parser refuses a control byte in an address (553), so it never reaches our own
    # log line; aiosmtpd's debug trace of the command line must not carry it raw either.
    assert codes == [b"220", b"250", b"553", b"250", b"250", b"354", b"250", b"221"], codes
    out = buf.getvalue()
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", out), out  # no control byte but the records' own newlines
    assert any("smtp: " in x and "from=<a@example.org>" in x for x in out.splitlines()), out  # the message went through
    # every line is a whole record with a timestamp of its own; none starts with the forged text
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) ", x) for x in out.splitlines()), out


@pytest.mark.parametrize("level, fmt", [("info", "json"), ("debug", "text")])
def test_logging_config_keys(level, fmt):
    from filterd.config import load_config

    cfg = load_config(None, [f"logging.level={level}", f"logging.format={fmt}"])
    assert (cfg.logging.level, cfg.logging.format) == (level, fmt)
