"""filterd.mail.text: real SpamAssassin messages, synthetic malformed mail, a whole-corpus sweep.

The corpus examples are fixed file numbers whose structure was checked by hand; each test
first asserts that premise on the raw bytes, so a changed corpus fails loudly rather than
testing nothing.
"""

from __future__ import annotations

import email.policy
import html.parser
import random
import re
import time
from pathlib import Path

import pytest

import filterd.mail.html_text as html_module
import filterd.mail.text as text_module
from filterd.mail.text import MailText, extract_text, html_to_text, parse_mail

FOLDERS = ("easy_ham", "easy_ham_2", "hard_ham", "spam", "spam_2")
CORPUS_SIZE = 6046
TAG = re.compile(r"<[A-Za-z]")  # what an unconverted HTML tag looks like in output


@pytest.fixture(scope="module")
def corpus(spamassassin_dir: Path) -> Path:
    if not all((spamassassin_dir / folder).is_dir() for folder in FOLDERS):
        pytest.skip(f"SpamAssassin corpus not found under {spamassassin_dir}")
    return spamassassin_dir


def message(corpus: Path, name: str) -> bytes:
    """Raw bytes of corpus message "folder/NNNNN" (file names end in an md5 we need not spell)."""
    folder, number = name.split("/")
    (path,) = (corpus / folder).glob(f"{number}.*")
    return path.read_bytes()


# --- real messages ----------------------------------------------------------------------


def test_alternative_prefers_plain(corpus: Path) -> None:
    raw = message(corpus, "easy_ham/00062")  # multipart/alternative: text/plain + text/html
    assert b"multipart/alternative" in raw and b"Content-Type: text/html" in raw
    mail = parse_mail(raw)
    assert mail.subject == "Tiny DNS Swap"
    # Only the plain version indents with spaces; the HTML one uses &nbsp; inside <DIV>s.
    assert "Makers of:\n   Process Server's Toolbox" in mail.body
    assert "Winter Park FL 32792" in mail.body
    assert not TAG.search(mail.body) and "&nbsp" not in mail.body
    assert mail.body.count("I'm using Simple DNS") == 1  # the HTML copy was not added
    assert mail.defects == 0


def test_html_only_message(corpus: Path) -> None:
    raw = message(corpus, "spam/00146")  # single text/html part, quoted-printable
    assert b"Content-Type: text/html" in raw and b"multipart" not in raw
    text = extract_text(raw)
    assert text.startswith("Subject: Hey, rates are low. What are you waiting for?\n\n")
    assert not TAG.search(text)
    assert "quotepoolmortgage™" in text  # <b>quotepool</b>mortgage&#153; across a QP soft break
    assert "• Refinance to get a lower rate" in text  # &#149; in one cell, text in the next
    assert "Credit doesn't have to be an issue either." in text
    assert "font-family" not in text  # <style> dropped
    assert "www.low-interest-rates.net" not in text  # <title> (in <head>) dropped
    assert "=3D" not in text and "&#" not in text


@pytest.mark.parametrize(
    ("name", "present", "charset"),
    [
        ("easy_ham/00271", ["propriété", "intellectuelle"], b"iso-8859-1"),  # 8bit
        ("hard_ham/00007", ["ermöglichen den kostenfreien Betrieb"], b"iso-8859-1"),  # QP
        # Declared iso-8859-1 but uses windows-1252 quotes (0x92): read as windows-1252.
        ("easy_ham/00007", ["I’m gone.", "(£160,000)"], b"iso-8859-1"),
        ("easy_ham/00570", ["the nation’s capital city"], b"windows-1252"),
        ("hard_ham/00039", ["いつもお世話になっております。", "東京都千代田区"], b"iso-2022-jp"),
    ],
)
def test_declared_charsets_decode(corpus: Path, name: str, present: list[str], charset: str) -> None:
    raw = message(corpus, name)
    assert re.search(rb'charset="?' + charset, raw, re.IGNORECASE)
    body = parse_mail(raw).body
    for phrase in present:
        assert phrase in body
    assert "Ã" not in body and "\ufffd" not in body  # no mojibake, no replacement characters
    assert not re.search("[\x80-\x9f]", body)  # no C1 controls from a latin-1 misreading


def test_encoded_subject_and_japanese(corpus: Path) -> None:
    raw = message(corpus, "hard_ham/00039")  # Subject: =?ISO-2022-JP?B?...?=
    assert b"=?iso-2022-jp?b?" in raw.lower()
    assert parse_mail(raw).subject == "日本語の件名（サブジェクト） スパムメールではありません！"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("easy_ham/02345", "£100,000"),  # latin-1 byte, no usable charset: windows-1252 guess
        ("spam_2/00853", "黄山旅游天天发,南京特价宾馆任你选"),  # GB2312 bytes: the body's charset
    ],
)
def test_raw_8bit_subject(corpus: Path, name: str, expected: str) -> None:
    raw = message(corpus, name)
    assert re.search(rb"^Subject: [^\n=]*[\x80-\xff]", raw, re.MULTILINE)  # 8-bit, no encoded word
    assert expected in parse_mail(raw).subject


@pytest.mark.parametrize(
    ("name", "phrase", "encoding"),
    [
        ("spam_2/00853", "黄山旅游天天发", "gb2312"),  # the only part
        ("hard_ham/00240", "SUBSCRIPTION INFORMATION", "us-ascii"),  # in related > alternative
    ],
)
def test_base64_text_part(corpus: Path, name: str, phrase: str, encoding: str) -> None:
    raw = message(corpus, name)
    assert re.search(rb"Content-Transfer-Encoding: base64", raw, re.IGNORECASE)
    assert phrase.encode(encoding) not in raw.split(b"\n\n", 1)[1]  # only readable once decoded
    body = parse_mail(raw).body
    assert phrase in body
    assert not TAG.search(body)


@pytest.mark.parametrize(
    ("name", "kept", "attachment"),
    [
        ("easy_ham/01053", "I made a spec file for it", "Summary: Blackbox derived window manager"),
        ("easy_ham/00986", "apply the following patch", "--- ftoc.tcl.PREV"),
        ("easy_ham_2/00706", None, "Index: lib/ftoc.tcl"),  # application/x-patch
    ],
)
def test_attachments_are_skipped(corpus: Path, name: str, kept: str | None, attachment: str) -> None:
    raw = message(corpus, name)
    assert b"Content-Disposition: attachment" in raw and attachment.encode() in raw
    text = extract_text(raw)
    assert attachment not in text
    if kept:
        assert kept in text


def test_forwarded_message_body_is_included(corpus: Path) -> None:
    raw = message(corpus, "easy_ham_2/00720")  # multipart/signed > mixed > [plain, message/rfc822]
    assert b"Content-Type: message/rfc822" in raw and b"BEGIN PGP SIGNATURE" in raw
    body = parse_mail(raw).body
    assert body.startswith("Am I the only one for whom typing control-L")
    assert "cwg got an error" in body  # from the forwarded message
    assert "Return-Path:" not in body  # ... but not its headers
    assert "PGP SIGNATURE" not in body  # application/pgp-signature is not text


# --- synthetic edge cases -----------------------------------------------------------------


def nested_multipart(depth: int) -> bytes:
    opening = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(depth))
    closing = b"".join(b"\n--b%d--" % i for i in reversed(range(depth)))
    return b"Subject: deep\n" + opening + b"Content-Type: text/plain\n\ninnermost text\n" + closing + b"\n"


MALFORMED = {
    "empty": b"",
    "only newlines": b"\n\n\n",
    "headers, no body": b"Subject: just a subject\nFrom: a@example.com\n",
    "body, no headers": b"Hello there\nthis is all body\n",
    "mbox line only": b"From someone@example.com  Thu Aug 22 13:17:22 2002\n",
    "multipart, no boundary": b"Content-Type: multipart/mixed\n\n--zz\nContent-Type: text/plain\n\nhi\n--zz--\n",
    "boundary never closed": b"Content-Type: multipart/mixed; boundary=zz\n\n--zz\nContent-Type: text/plain\n\ncut off",
    "boundary never used": b'Content-Type: multipart/alternative; boundary="a b"\n\n--a  b\n\ntext\n',
    "bogus charset": b"Content-Type: text/plain; charset=x-no-such-charset\n\ncaf\xc3\xa9\n",
    "non-text codec as charset": b"Content-Type: text/plain; charset=zlib\n\ncaf\xe9\n",
    "invalid base64": b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n!!@@##$$%%\n====\n",
    "invalid quoted-printable": b"Content-Transfer-Encoding: quoted-printable\n\n=ZZ=\n=4",
    "bogus encoded word": b"Subject: =?x-bogus?q?caf=E9?= =?utf-8?b?####?=\n\nbody",
    "nul bytes": b"Subject: \x00\x00\n\n\x00body\x00",
    "header line without colon": b"Subject: ok\nthis is not a header\nFrom: x\n\nbody",
    "deep nesting": nested_multipart(100),
    "absurd nesting": nested_multipart(1000),
    "random binary": random.Random(42).randbytes(64 * 1024),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_never_raises(raw: bytes) -> None:
    mail = parse_mail(raw)
    assert isinstance(mail, MailText)
    assert all(isinstance(value, str) for value in (mail.subject, mail.body, mail.text()))
    assert isinstance(mail.defects, int) and mail.defects >= 0
    mail.text().encode("utf-8")  # no lone surrogates
    assert extract_text(raw) == mail.text()


def test_five_megabytes_of_random_bytes() -> None:
    raw = random.Random(0).randbytes(5 * 1024 * 1024)
    text = extract_text(raw)
    assert isinstance(text, str) and text
    text.encode("utf-8")


def test_empty_and_header_only() -> None:
    assert parse_mail(b"") == MailText("", "", 0)
    mail = parse_mail(b"Subject: just a subject\nFrom: a@example.com\n")
    assert (mail.subject, mail.body, mail.text()) == ("just a subject", "", "Subject: just a subject")


def test_body_without_headers() -> None:
    mail = parse_mail(b"Hello there\nthis is all body\n")
    assert (mail.subject, mail.body) == ("", "Hello there\nthis is all body")
    assert mail.defects >= 1  # the email package notes the missing header/body separator


def test_mbox_from_line_is_skipped() -> None:
    raw = b"From 12a1mailbot1@web.de  Thu Aug 22 13:17:22 2002\nSubject: hi\nTo: b@example.com\n\nbody\n"
    assert parse_mail(raw) == MailText("hi", "body", 0)
    assert parse_mail(b"From: a@example.com\nSubject: kept\n\nbody").subject == "kept"  # a From: header


def test_rfc2047_subject() -> None:
    raw = b"Subject: =?iso-8859-1?q?Caf=E9_cr=E8me?= and =?utf-8?b?4pyTIGRvbmU=?=\n\nbody"
    assert parse_mail(raw).subject == "Café crème and ✓ done"
    folded = b"Subject: =?utf-8?q?first?=\n =?utf-8?q?_second?=\n\n"
    assert parse_mail(folded).subject == "first second"


def test_broken_mime_keeps_the_text() -> None:
    assert "hi" in extract_text(MALFORMED["multipart, no boundary"])  # as raw text, MIME lines and all
    mail = parse_mail(MALFORMED["boundary never closed"])
    assert mail.body == "cut off" and mail.defects >= 1


def test_bogus_charsets_fall_back() -> None:
    assert parse_mail(MALFORMED["bogus charset"]).body == "café"  # valid UTF-8
    assert parse_mail(MALFORMED["non-text codec as charset"]).body == "café"  # else windows-1252
    raw = b"Content-Type: text/plain; charset=unknown-8bit\n\n\x93quoted\x94 caf\xe9\n"
    assert parse_mail(raw).body == "“quoted” café"


def test_invalid_base64_is_decoded_leniently() -> None:
    raw = b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\naGVsbG8gd29y!!bGQ\n"
    mail = parse_mail(raw)
    assert mail.body == "hello world" and mail.defects >= 1


def test_deep_nesting() -> None:
    assert parse_mail(nested_multipart(100)).body == "innermost text"
    assert isinstance(extract_text(nested_multipart(1000)), str)  # the parser itself gives up: raw fallback


def test_alternative_with_empty_plain_uses_html() -> None:
    raw = (
        b"Content-Type: multipart/alternative; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\n \n"
        b"--b\nContent-Type: text/html\n\n<p>Only the <b>HTML</b> has text</p>\n--b--\n"
    )
    assert parse_mail(raw).body == "Only the HTML has text"


def test_html_without_content_type() -> None:
    assert extract_text(b"Subject: s\n\n<html><body><p>Buy <b>now</b></p></body></html>") == "Subject: s\n\nBuy now"


def test_whitespace_is_normalised() -> None:
    raw = b"Subject:  spaced \r\n   out\r\n\r\nline one   \r\n\r\n\r\n\r\n\tline two\r\n\r\n"
    mail = parse_mail(raw)
    assert mail.subject == "spaced out"
    assert mail.body == "line one\n\n\tline two"


def test_text_format() -> None:
    assert MailText("Hi", "body\n", 0).text() == "Subject: Hi\n\nbody"
    assert MailText("", "  body  ", 0).text() == "body"
    assert MailText("Hi", "", 0).text() == "Subject: Hi"


def test_pathological_content_type_is_fast() -> None:
    # The email package is quadratic in the defects of one header: this took minutes uncapped.
    raw = b"Content-Type: text/plain" + b" ;" * 80_000 + b"\n\nbody\n"
    start = time.perf_counter()
    assert parse_mail(raw).body == "body"
    assert time.perf_counter() - start < 5


# --- html_to_text -------------------------------------------------------------------------


def test_html_to_text_basics() -> None:
    html = (
        "<html><head><title>Title</title><style>p {color: red}</style></head>"
        "<body><h1>Head</h1><p>Hello&nbsp;<b>wor</b>ld &amp; &lt;friends&gt; &#8364;5</p>"
        "<script>if (a < b) document.write('</div>')</script>"
        "<div>one<br>two<br/>three</div><ul><li>first</li><li>second</li></ul>"
        "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>"
        "<!-- hidden <b>comment</b> --><a href='http://x.example/'>link text</a>"
        "  lots   of\n\n  spaces</body></html>"
    )
    assert html_to_text(html) == (
        "Head\n\nHello world & <friends> €5\n\none\ntwo\nthree\n\nfirst\nsecond\n\na b\nc\n\nlink text lots of spaces"
    )


def test_html_to_text_malformed() -> None:
    assert html_to_text("") == ""
    assert html_to_text("plain, no markup") == "plain, no markup"
    assert html_to_text("<head><title>t</title><p>no body tag") == "no body tag"  # unclosed <head>
    assert html_to_text("a <b>b</b> 3 < 4 <") == "a b 3 < 4 <"
    assert html_to_text("visible<!--#rotate>still visible") == "visiblestill visible"  # unclosed comment
    assert html_to_text("before<script>never closed") == "before"
    assert html_to_text('text<a href="never closed') == "text"  # EOF inside a tag, as in browsers
    assert html_to_text("<FONT face=Arial's>x</FONT> y") == "x y"


@pytest.mark.parametrize("html", ["<a" * 200_000, "<!--" * 100_000, "<a x='>'" * 50_000, "</" * 200_000])
def test_html_to_text_is_linear_on_unterminated_markup(html: str) -> None:
    # Each of these took from seconds to minutes in Python 3.11's HTMLParser fed directly.
    start = time.perf_counter()
    assert isinstance(html_to_text(html), str)
    assert time.perf_counter() - start < 5


# --- the whole corpus ---------------------------------------------------------------------

# Measured: 6,046 messages in about 6 s; 19 empty bodies, all spam whose only "text" is
# images, links or a virus attachment (e.g. spam_2/00215-00225), so the text is the subject.
MAX_EMPTY_BODIES = CORPUS_SIZE // 100


def test_sweep_whole_corpus(corpus: Path) -> None:
    paths = sorted(path for folder in FOLDERS for path in (corpus / folder).iterdir() if path.is_file())
    assert len(paths) == CORPUS_SIZE
    start = time.perf_counter()
    empty_bodies, empty_texts = [], []
    for path in paths:
        mail = parse_mail(path.read_bytes())
        text = mail.text()
        assert isinstance(text, str), path
        text.encode("utf-8")  # no lone surrogates
        if not mail.body:
            empty_bodies.append(f"{path.parent.name}/{path.name}")
        if not text:
            empty_texts.append(f"{path.parent.name}/{path.name}")
    elapsed = time.perf_counter() - start
    print(f"\nsweep: {len(paths)} messages in {elapsed:.1f} s; {len(empty_bodies)} empty bodies, {len(empty_texts)} empty texts")
    assert len(empty_bodies) < MAX_EMPTY_BODIES, empty_bodies
    assert not empty_texts  # every message has at least a subject or some body text


# --- the fast paths read mail as the email package's and HTMLParser's slower ones do -------

_HTML_PIECES = [
    "<p>", "</p>", "<br>", "<BR/>", "<div class='a>b'>", "</div>", "<td>", "<TH>", "<li>", "<script>x<p>y</script>",
    "<style>p{}</style>", "<!-- c -->", "<!--", "-->", "<head>", "<title>t</title>", "<body>", "<a href=x>", "</a>",
    "&amp;", "&lt;", "&#65;", "&#x42;", "&nbsp;", "&copy", "&", ";", "<", ">", "< p>", "</ >", "<!DOCTYPE html>",
    "<?xml?>", "<h1>", "</h1>", "text", "  ", "\n", "\r\n", "\t", "caf\u00e9", "<a b='", "\"", "'", "=", "<x y=\">\">",
]


class _ReferenceCollector(html.parser.HTMLParser):
    """The collector as it was, on HTMLParser: the reference the bare-tag splitter must match."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.inner = html_module._TextCollector()

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self.inner.handle_starttag(tag)

    def handle_endtag(self, tag: str) -> None:
        self.inner.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        self.inner.handle_data(data)


def _reference_html_to_text(markup: str) -> str:
    ref = _ReferenceCollector()
    ref.feed(html_module._MARKUP.sub(html_module._canonical_markup, html_module._strip_hidden_blocks(markup)))
    ref.close()
    text = "".join(ref.inner.chunks)
    lines = (" ".join(line.split()) for line in text.replace("\r", "\n").split("\n"))
    return html_module._MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def test_html_text_is_what_htmlparser_would_collect() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        markup = "".join(rng.choice(_HTML_PIECES) for _ in range(rng.randint(1, 40)))
        assert html_to_text(markup) == _reference_html_to_text(markup), markup


_HEADER_VALUES = [
    'text/plain; charset="us-ascii"', "text/plain;\r\n\tcharset=iso-8859-1", "TEXT/HTML ; ; ;", 'multipart/alternative;\r\n boundary="=_b"',
    "text/plain; charset==?utf-8?q?x?=", "=?utf-8?b?dGV4dC9wbGFpbg==?=", "attachment; filename*=UTF-8''a%20b.txt", "inline",
    "text/plain; name=\"a\\\"b\"", "(comment) text/plain", "text/plain (x", "caf\udce9/plain", "base64", " quoted-printable ",
]


def test_header_values_are_policy_defaults() -> None:
    """What parse_mail's policy returns for a field is what policy.default returns, as text."""
    policy = text_module._ParsePolicy()
    for value in _HEADER_VALUES:
        for name in ("Content-Type", "Content-Disposition", "Content-Transfer-Encoding", "Subject"):
            assert str(policy.header_fetch_parse(name, value)) == str(email.policy.default.header_fetch_parse(name, value)), (name, value)


def test_unknown_8bit_is_whatwg_windows_1252() -> None:
    every_byte = bytes(range(256)) * 2
    c1 = {b: bytes([b]).decode("cp1252") for b in range(0x80, 0xA0) if b not in b"\x81\x8d\x8f\x90\x9d"}
    assert text_module._decode_unknown(every_byte) == every_byte.decode("latin-1").translate(c1)
    assert text_module._decode_unknown("café".encode()) == "café"  # valid UTF-8 stays UTF-8
