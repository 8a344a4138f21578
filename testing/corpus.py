"""The SpamAssassin public corpus as the mail benches send it over SMTP, the milter protocol and HTTP."""

from __future__ import annotations

import os
import re
from pathlib import Path

SHARED = Path(os.environ.get("FILTERD_SHARED", "/work/shared"))
CORPUS = SHARED / "data" / "spamassassin-publiccorpus"


def wire(raw: bytes) -> bytes:
    """A corpus file as an MTA would carry it: the mbox `From ` line removed (as a first line it would
    end the headers), CRLF line ends."""
    raw = re.sub(rb"\A(From [^\n]*\n)", b"", raw)
    return re.sub(rb"\r?\n", b"\r\n", raw)
