"""The SpamAssassin public corpus as the mail benches send it over SMTP, the milter protocol and HTTP."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path:
    for candidate in (os.environ.get("FILTERD_SHARED"), REPO.parent / "shared", "/work/shared"):
        if candidate and (Path(candidate) / "tiktoken").is_dir():
            return Path(candidate)
    raise RuntimeError("shared data not found: set FILTERD_SHARED to the directory holding tiktoken/ and data/")


SHARED = _shared_dir()  # the shared corpora and tokenizer files
SMS_FILE = SHARED / "data" / "sms-spam-collection" / "SMSSpamCollection"
SPAMASSASSIN = CORPUS = SHARED / "data" / "spamassassin-publiccorpus"


def wire(raw: bytes) -> bytes:
    """A corpus file as an MTA would carry it: the mbox `From ` line removed (as a first line it would
    end the headers), CRLF line ends."""
    raw = re.sub(rb"\A(From [^\n]*\n)", b"", raw)
    return re.sub(rb"\r?\n", b"\r\n", raw)
