"""A few header fields of a raw message, read as the email package's compat32 parser reads them, cheaply.

The HTTP door answers with the Subject and Message-ID of every message it scans; parsing the whole
header block with the email package for two fields cost a quarter of that door's own CPU (real
mail carries twenty-odd fields, most of them Received). A block that is plain (ASCII, every line a
`name:` field or its continuation, line ends CRLF or LF) is read with two regular expressions; any
other block goes to the parser, so the answer is the parser's either way.
"""

from __future__ import annotations

import email.parser
import email.policy
import re

_PLAIN_BLOCK = re.compile(rb"(?:[!-9;-~]++:[^\r\n]*+(?:\r?\n|\Z)(?:[ \t][^\r\n]*+(?:\r?\n|\Z))*+)*+\Z")
_LINE_END = re.compile(rb"\r?\n")


def head_of(raw: bytes, limit: int) -> bytes:
    """`raw[:limit]` up to its first empty line: all a header parser reads of it, without the body
    (which the email package's header-only parsers still read line by line). Never cut earlier than
    a parser stops: a mail whose lines end in a lone CR keeps its whole `limit`."""
    head = raw[:limit]
    ends = [i for i in (head.find(b"\n\n"), head.find(b"\n\r\n")) if i >= 0]
    return head[: min(ends) + 1] if ends else head


def first_fields(raw: bytes, names: tuple[str, ...], limit: int) -> dict[str, str]:
    """The first field of each of `names` (lower case) in the header block of `raw[:limit]`, unfolded and
    with runs of whitespace made one space; a field that is absent, or not ASCII, is left out."""
    head = head_of(raw, limit)
    if head.isascii() and _PLAIN_BLOCK.match(head):
        return _plain_fields(head, names)
    return _parsed_fields(head, names)


def _plain_fields(head: bytes, names: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        m = re.search(rb"^%b:([^\r\n]*+(?:\r?\n[ \t][^\r\n]*+)*+)" % re.escape(name.encode()), head, re.I | re.M)
        if m:
            out[name] = " ".join(m[1].decode("ascii").split())
    return out


def _parsed_fields(head: bytes, names: tuple[str, ...]) -> dict[str, str]:
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    except Exception:  # never let a header oddity cost the reply
        return {}
    out = {}
    for name in names:
        value = msg.get(name)
        if isinstance(value, str):  # compat32 gives a Header object for raw 8-bit values
            out[name] = " ".join(value.split())
    return out
