"""What the model reads of a mail: a scan budget that header padding cannot spend.

Every door parses at most `scan_bytes` of a message for the classifier's text (the whole message is
still relayed). Cutting the first `scan_bytes` of the raw bytes would let a sender push the body out
of the budget with a megabyte of junk header fields, and the model would score an empty text. So the
budget is taken from the message's parts: a header block up to `header_limit` (64 KiB, or half the
budget when that is smaller) is kept whole (real mail's is a few KB, so ordinary mail is read exactly
as before); a longer one is cut down to the fields text extraction reads (Subject, Content-*,
MIME-Version, each capped) and the body gets the rest of the budget. That fact goes into the
decision's reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from filterd.mail.headers import header_block_end

HEADER_BYTES = 64 * 1024  # a header block longer than this is padding or abuse, not mail
FIELD_BYTES = 4096  # of one kept field (text extraction caps Subject and Content-* at 2 KB anyway)
HEADERS_CUT = "header block over the scan budget: scored on its Subject, MIME fields and body"

_NEEDED_NAMES = r"subject|content-[\w-]*|mime-version"  # the fields text extraction reads
NEEDED_FIELD = re.compile(_NEEDED_NAMES, re.I)  # a field name (a door that collects headers itself keeps these)
_NEEDED = re.compile(rb"^(?:%b)[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*\n?" % _NEEDED_NAMES.encode(), re.I | re.M)


@dataclass(frozen=True)
class ScanView:
    raw: bytes  # what text extraction parses
    headers_cut: bool  # the header block was over `header_bytes`: only its needed fields are in `raw`


def header_limit(scan_bytes: int, header_bytes: int = HEADER_BYTES) -> int:
    """The longest header block read whole: `header_bytes`, but never more than half the scan budget."""
    return min(header_bytes, scan_bytes // 2)


def scan_view(raw: bytes, scan_bytes: int, header_bytes: int = HEADER_BYTES) -> ScanView:
    """The part of `raw` the classifier's text comes from (see the module docstring)."""
    end = header_block_end(raw)  # where the most lenient reader's header block ends (its blank line stays with the body)
    if end <= header_limit(scan_bytes, header_bytes):  # a header block within its budget: the first scan_bytes, as always
        return ScanView(raw if len(raw) <= scan_bytes else raw[:scan_bytes], False)
    block, body = raw[:end], raw[end:]
    kept = b"".join(f[0][:FIELD_BYTES].rstrip(b"\r\n") + b"\r\n" for f in _NEEDED.finditer(block))[: header_limit(scan_bytes, header_bytes)]
    return ScanView(kept + body[: max(scan_bytes - len(kept), 0)], True)
