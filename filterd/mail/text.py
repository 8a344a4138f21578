"""Text from RFC 822 mail: the subject and body a classifier should see.

Mail in the wild is often malformed (spam more so): bogus charsets, broken base64,
multiparts without boundaries, raw 8-bit headers.  Nothing here raises on such input;
the last resort is the raw bytes decoded leniently.

Which parts make up the body:

* A multipart/alternative contributes one alternative: the first plain-text one, else the
  last (richest) HTML one.  Alternatives without any text do not count.
* Over the whole message text/plain is preferred: if any inline text/plain part has text,
  only those are used, else the text/html ones (converted by ``html_to_text``).  Several
  parts of the chosen kind are joined with a blank line.
* Attachments (``Content-Disposition: attachment`` below the top level) and non-text
  parts are skipped.  MIME preamble and epilogue (where some lists add footers) are not
  body text either.
* message/rfc822 parts, even ones marked as attachments, are walked like any multipart,
  so a forwarded or bounced message's body is included (its headers are not): for a spam
  filter a forwarded message is still content the sender chose to send.

Charsets follow the WHATWG reading of mail labels (iso-8859-1 is decoded as windows-1252,
gb2312 as gb18030, ...); missing, "us-ascii" or unusable labels mean UTF-8 if the bytes
are valid UTF-8, else windows-1252.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import lru_cache
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32
from email.policy import default as _DEFAULT_POLICY
from typing import NamedTuple

from filterd.mail.html_text import html_to_text

# Deeper MIME trees than this are abuse, not mail; parts below it are ignored.
_MAX_DEPTH = 128

# WHATWG-style label mapping: mail that declares these nearly always means the superset
# (e.g. Outlook's "smart quotes" in iso-8859-1 mail are really windows-1252 bytes).
_CHARSET_SUPERSETS = {
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso-8859-9": "cp1254",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "big5": "big5hkscs",
    "euc-kr": "cp949",
    "ks_c_5601-1987": "cp949",
    "chinesebig5": "big5hkscs",
    "tis-620": "cp874",
}

# Charsets that say nothing useful: decode as if none were declared.
_NO_CHARSET = {"", "us-ascii", "ascii", "default", "unknown", "unknown-8bit", "x-unknown"}

# Unknown 8-bit text is windows-1252 as WHATWG reads it: cp1252, with the five bytes it leaves
# undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) kept as their latin-1 controls.
codecs.register_error("filterd-latin1", lambda e: (e.object[e.start : e.end].decode("latin-1"), e.end))

_MBOX_FROM = re.compile(rb"\AFrom [^\n]*\n")
_MAX_FIELD = 2048
_RISKY_FIELD = re.compile(rb"^(?:content-[\w-]*|subject)[ \t]*:(?:[^\n]*\n[ \t])*[^\n]*", re.I | re.M)
_MIME_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)  # any whitespace but newline, incl. U+00A0
_MANY_NEWLINES = re.compile(r"\n{3,}")


class _ParsePolicy(Compat32):
    """compat32's parsing with policy.default's header values, for half the CPU.

    policy.default builds a header object (a full RFC 5322 parse) on every access to a field, and
    the parser and this module read Content-Type several times per part: that was most of this
    module's time. Here a field's value is still policy.default's own header object, built once
    per distinct value: short values (most Content-Transfer-Encoding and Content-Type values repeat
    across mail) in a small cache shared by all messages, longer ones per message (a hostile 512-byte
    Content-Type's object holds ~300 KB). The message classes differ only in methods this module
    does not call.
    """

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_values", {})  # policies refuse attribute writes after init

    def header_fetch_parse(self, name: str, value: str) -> str:  # type: ignore[override]
        if len(value) <= _SHARED_VALUE_CHARS:
            return _shared_header(name, value)
        values: dict[tuple[str, str], str] = self._values  # type: ignore[attr-defined]
        if (name, value) not in values:
            values[name, value] = _DEFAULT_POLICY.header_fetch_parse(name, value)
        return values[name, value]


_SHARED_VALUE_CHARS = 100  # such a value's header object is at most ~20 KB: the cache stays under ~10 MB


@lru_cache(maxsize=512)
def _shared_header(name: str, value: str) -> str:
    return _DEFAULT_POLICY.header_fetch_parse(name, value)




@dataclass(frozen=True)
class MailText:
    """The readable parts of one message."""

    subject: str  # decoded Subject header ("" if none)
    body: str  # body text, whitespace normalised
    defects: int  # parse and decode defects the email package reported (0 for clean mail)

    def text(self) -> str:
        """What the classifier sees: the subject as a first line, then the body."""
        if self.subject:
            return f"Subject: {self.subject}\n\n{self.body}".strip()
        return self.body.strip()


def extract_text(raw: bytes) -> str:
    """The classifier's input for one raw message."""
    return parse_mail(raw).text()


def parse_mail(raw: bytes) -> MailText:
    """Subject, body text and defect count of a raw RFC 822 message; never raises."""
    if isinstance(raw, str):  # be forgiving about the type too
        raw = raw.encode("utf-8", "surrogateescape")
    raw = _cap_fields(_MBOX_FROM.sub(b"", bytes(raw), count=1))
    try:
        msg = BytesParser(policy=_ParsePolicy()).parsebytes(raw)
        leaves = _prefer_plain(_text_leaves(msg, 0))
        body = _normalise("\n\n".join(leaf.text for leaf in leaves))
        hint = leaves[0].charset if leaves else _charset_of(msg)
        return MailText(_subject(msg, hint), body, _count_defects(msg))
    except Exception:  # RecursionError on absurd nesting, bugs in header parsing, ...
        # Nothing was parsed, so no defect list exists; 1 still flags the message as broken.
        return MailText("", _normalise(_fallback_body(raw)), 1)


def _cap_fields(raw: bytes) -> bytes:
    """Cut overlong Content-* and Subject fields (in any part) before the parser sees them.

    The email package's header parser is quadratic in the number of defects in one field:
    the 14 KB ``Content-Type: text/html ; ; ; ...`` in spam_2/00471 costs seconds, 160 KB
    costs minutes.  Real fields of these kinds are well under 1 KB.
    """
    return _RISKY_FIELD.sub(lambda match: match[0][:_MAX_FIELD], raw)


# --- choosing parts -----------------------------------------------------------------


class _Leaf(NamedTuple):
    """One decoded text part."""

    html: bool  # came from text/html (already converted to text)
    text: str
    charset: str | None  # as declared; hints how to read a raw 8-bit Subject


def _prefer_plain(leaves: list[_Leaf]) -> list[_Leaf]:
    """Non-empty plain parts if there are any, else the non-empty HTML ones."""
    leaves = [leaf for leaf in leaves if leaf.text.strip()]
    return [leaf for leaf in leaves if not leaf.html] or leaves


def _text_leaves(part: Message, depth: int) -> list[_Leaf]:
    """Decoded text parts under `part` a reader would see, one alternative per group."""
    if depth > _MAX_DEPTH:
        return []
    ctype = _content_type(part)
    if depth > 0 and ctype != "message/rfc822" and _is_attachment(part):
        return []  # a whole message sent as "attachment" is still its own content
    if not part.is_multipart():
        return [_decode_leaf(part, ctype == "text/html")] if ctype in ("text/plain", "text/html") else []
    groups = [_text_leaves(child, depth + 1) for child in part.get_payload() if isinstance(child, Message)]
    if ctype == "multipart/alternative":
        return _best_alternative(groups)
    return [leaf for group in groups for leaf in group]


def _best_alternative(groups: list[list[_Leaf]]) -> list[_Leaf]:
    """The first alternative that is plain text, else the last (richest) with any text.

    Empty alternatives do not count: spam often pairs a blank text/plain with real HTML.
    """
    groups = [nonempty for group in groups if (nonempty := [leaf for leaf in group if leaf.text.strip()])]
    plain = [group for group in groups if not any(leaf.html for leaf in group)]
    return plain[0] if plain else groups[-1] if groups else []


def _content_type(part: Message) -> str:
    """The part's MIME type as this module treats it (fetched once: parsing can be slow)."""
    try:
        match = _MIME_TYPE.match(part.get_content_type())
    except Exception:
        match = None
    ctype = match[0] if match else "text/plain"  # RFC 2045: an invalid type means text/plain
    if ctype.startswith("multipart/") and not part.is_multipart():
        return "text/plain"  # no usable boundary: its raw content beats losing the body
    if ctype == "text/plain" and _looks_like_html(part):
        return "text/html"
    return ctype


def _looks_like_html(part: Message) -> bool:
    """Spam often sends HTML with no Content-Type header at all (so text/plain)."""
    if "content-type" in part:
        return False
    payload = part.get_payload()
    return isinstance(payload, str) and payload.lstrip()[:14].lower().startswith(("<html", "<!doctype html"))


def _is_attachment(part: Message) -> bool:
    try:
        return part.get_content_disposition() == "attachment"
    except Exception:
        return False


def _count_defects(msg: Message) -> int:
    """Defects on every part, including those found while decoding text payloads."""
    total, stack = 0, [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        total += len(getattr(part, "defects", ()))
        if depth < _MAX_DEPTH and part.is_multipart():
            stack.extend((child, depth + 1) for child in part.get_payload() if isinstance(child, Message))
    return total


# --- decoding -----------------------------------------------------------------------


def _decode_leaf(part: Message, html: bool) -> _Leaf:
    """One text part: transfer-decoded, charset-decoded, HTML converted."""
    try:
        data = part.get_payload(decode=True)  # base64/QP; lenient on broken base64
    except Exception:
        data = None
    if data is None:  # an unexpected payload type: take what the parser kept
        payload = part.get_payload()
        data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""
    charset = _charset_of(part)
    text = _decode_bytes(data, charset)
    return _Leaf(html, html_to_text(text) if html else text, charset)


def _charset_of(part: Message) -> str | None:
    try:
        charset = part.get_param("charset")
    except Exception:
        return None
    return charset if isinstance(charset, str) else None


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset, replacing bad bytes; guess if it is unusable."""
    name = (charset or "").strip().strip("\"'").lower()
    if name not in _NO_CHARSET:
        try:
            return data.decode(_CHARSET_SUPERSETS.get(name, name), errors="replace")
        except (LookupError, ValueError, TypeError):
            pass  # unknown name, or a non-text codec such as "base64" or "zlib"
    return _decode_unknown(data)


def _decode_unknown(data: bytes) -> str:
    """UTF-8 if the bytes are valid UTF-8, else windows-1252 over latin-1 (never fails)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="filterd-latin1")


def _subject(msg: Message, hint: str | None) -> str:
    """The decoded Subject; raw 8-bit subjects are read with the body's charset."""
    raw = next((value for name, value in msg.raw_items() if name.lower() == "subject"), None)
    if raw is None:
        return ""
    raw = str(raw)
    raw_bytes = raw.encode("utf-8", "surrogateescape") if _is_escaped(raw) else None
    try:
        subject = str(msg["subject"]) if raw_bytes is None or "=?" in raw else _decode_bytes(raw_bytes, hint)
    except Exception:  # header parser bugs on hostile input
        subject = _decode_bytes(raw.encode("utf-8", "surrogateescape"), hint) if raw_bytes else raw
    return " ".join(_scrub(subject).split())


def _is_escaped(text: str) -> bool:
    """Whether the parser kept undecodable raw bytes as surrogate escapes."""
    return any("\udc80" <= char <= "\udcff" for char in text)


def _scrub(text: str) -> str:
    """Replace lone surrogates so the result can always be encoded as UTF-8."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _fallback_body(raw: bytes) -> str:
    """Last resort: everything after the first blank line, decoded leniently."""
    match = _HEADER_END.search(raw)
    return _decode_unknown(raw[match.end() :] if match else raw)


def _normalise(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = _scrub(text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()
