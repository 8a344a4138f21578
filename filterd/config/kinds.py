"""Kinds: how one key is read, checked and written back, and the walk over the key tree.

A key's dataclass field carries its `Kind` and a one-line description (`_key`); the loader, the
`--set` parser, `Config.to_toml()` and the reference are all driven by those.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from filterd.config.values import (
    _CONTROL,
    _DURATION_FORMS,
    HostPort,
    UnixSocket,
    _check_redis_url,
    _split_hostport,
    format_duration,
    parse_duration,
    parse_listen,
    redact_url,
)
from filterd.policy.levels import FPR
from filterd.policy.lists import normalize_entry, parse_network

Where = tuple[str, ...]  # a key's path: ("redis", "routes", "spam")


class Kind:
    """Base: subclasses set `expect` (what a valid value is, in words) and override `parse`."""

    text_like = False  # a `--set` value that TOML reads as a number, bool, array... is kept as its text
    secret = False  # may hold a password: redacted in error messages and (by default) in dumps
    expect = "a value"

    @property
    def what_type(self) -> str:
        """How docs/configuration.md names the type: `expect`, less the examples an error message needs."""
        return self.expect

    def parse(self, value: Any) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        """The TOML value for a parsed value (inverse of parse)."""
        return value

    def anchor(self, value: Any, base: Path) -> Any:
        """Resolve a value read from a file against the file's directory (paths only)."""
        return value

    def fail(self) -> ValueError:
        return ValueError(f"must be {self.expect}")

    def redact(self, text: str) -> str:
        """A secret value as shown in errors and dumps (URLs keep all but their password)."""
        return redact_url(text)


@dataclass(frozen=True)
class Int(Kind):
    min: int = 0
    max: int | None = None
    why: str = ""  # appended to the message when the bound is not obvious

    @property
    def expect(self) -> str:
        bound = f">= {self.min}" if self.max is None else f"in {self.min}..{self.max}"
        return f"an integer {bound}" + (f" ({self.why})" if self.why else "")

    def parse(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail()
        if value < self.min or (self.max is not None and value > self.max):
            raise self.fail()
        return value


@dataclass(frozen=True)
class Number(Kind):
    min: float = 0.0
    max: float | None = None

    @property
    def expect(self) -> str:
        return f"a number >= {self.min:g}" if self.max is None else f"a number in {self.min:g}..{self.max:g}"

    def parse(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # ints are fine for floats
            raise self.fail()
        if not math.isfinite(value) or value < self.min or (self.max is not None and value > self.max):
            raise self.fail()
        return float(value)

    def dump(self, value: float) -> int | float:
        return int(value) if value.is_integer() else value  # max_wait_ms = 5, as the docs write it


@dataclass(frozen=True)
class Bool(Kind):
    expect = "true or false"

    def parse(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail()
        return value


@dataclass(frozen=True)
class Text(Kind):
    what: str = "a string"
    allow_empty: bool = True
    pattern: str | None = None  # full match, checked on non-empty values
    text_like = True

    @property
    def expect(self) -> str:
        return self.what if self.allow_empty else f"{self.what}, not empty"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail()
        if not value and not self.allow_empty:
            raise self.fail()
        if _CONTROL.search(value):  # a newline in a header value or a name is an injection, never intended
            raise ValueError(f"must be {self.what} without control characters")
        if value and self.pattern and not re.fullmatch(self.pattern, value):
            raise self.fail()
        return value


def _stream(what: str = "a stream name", allow_empty: bool = False) -> Text:
    """A Redis key: non-empty, no whitespace (a stray space is a typo, and breaks redis-cli use)."""
    return Text(what=f"{what} without spaces", allow_empty=allow_empty, pattern=r"\S+")


@dataclass(frozen=True)
class Choice(Kind):
    options: tuple[str, ...] = ()
    text_like = True

    @property
    def expect(self) -> str:
        return "one of " + ", ".join(self.options)

    def parse(self, value: Any) -> str:
        if value not in self.options:
            raise self.fail()
        return value


@dataclass(frozen=True)
class Duration(Kind):
    positive: bool = True  # zero would mean "never wait" or "spin": refused unless a key says otherwise
    expect = f"a duration such as {_DURATION_FORMS}"

    def parse(self, value: Any) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise self.fail() from None
        if self.positive and seconds <= 0:
            raise ValueError("must be a duration > 0")
        return seconds

    @property
    def what_type(self) -> str:
        return "a duration > 0" if self.positive else "a duration >= 0"

    def dump(self, value: float) -> str:
        return format_duration(value)


@dataclass(frozen=True)
class Address(Kind):
    expect = 'host:port, e.g. "127.0.0.1:10025" or "[::1]:9464"'
    text_like = True

    @property
    def what_type(self) -> str:
        return 'host:port (IPv6 in brackets: "[::1]:9464")'

    def parse(self, value: Any) -> HostPort:
        if not isinstance(value, str):
            raise self.fail()
        try:
            return _split_hostport(value)
        except ValueError as e:
            raise ValueError(f"must be host:port ({e})") from None

    def dump(self, value: HostPort) -> str:
        return str(value)


@dataclass(frozen=True)
class Listen(Kind):
    expect = 'host:port or unix:/path, e.g. "127.0.0.1:11332" or "unix:/run/filterd/milter.sock"'
    text_like = True

    @property
    def what_type(self) -> str:
        return "host:port or unix:/path (an absolute path)"

    def parse(self, value: Any) -> HostPort | UnixSocket:
        if not isinstance(value, str):
            raise self.fail()
        try:
            return parse_listen(value)
        except ValueError as e:
            raise ValueError(f"must be host:port or unix:/path ({e})") from None

    def dump(self, value: HostPort | UnixSocket) -> str:
        return str(value)


@dataclass(frozen=True)
class PathKind(Kind):
    optional: bool = False  # "" means "not set" (None)
    text_like = True

    @property
    def expect(self) -> str:
        return 'a path, or "" for none' if self.optional else "a path, not empty"

    def parse(self, value: Any) -> Path | None:
        if not isinstance(value, str) or _CONTROL.search(value) or (not value and not self.optional):
            raise self.fail()
        return Path(value) if value else None

    def dump(self, value: Path | None) -> str:
        return "" if value is None else str(value)

    def anchor(self, value: Path | None, base: Path) -> Path | None:
        return value if value is None or value.is_absolute() else base / value


@dataclass(frozen=True)
class RedisUrl(Kind):
    expect = "a redis://, rediss:// or unix:// URL"
    text_like = True
    secret = True

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or _CONTROL.search(value):
            raise self.fail()
        _check_redis_url(value)
        return value


@dataclass(frozen=True)
class Password(Text):
    """A shared secret: never shown in errors or dumps (to_toml(redact=False) writes it)."""

    what: str = "a password string"
    secret = True

    def redact(self, text: str) -> str:
        return "***" if text else ""


@dataclass(frozen=True)
class Threshold(Kind):
    expect = '"model" (the model\'s own threshold) or a number in 0..1'

    def parse(self, value: Any) -> float | None:
        if value == "model":
            return None
        try:
            return Number(0.0, 1.0).parse(value)
        except ValueError:
            raise self.fail() from None

    def dump(self, value: float | None) -> Any:
        return "model" if value is None else value


@dataclass(frozen=True)
class LevelKind(Kind):
    """A [policy] level: a P(spam), "model" (the model's own threshold), "fpr:<share>" (the threshold the
    model measured for flagging that share of ham), "off", or (per door) "inherit"."""

    inherit: bool = False

    @property
    def expect(self) -> str:
        words = '"model", "off"' + (', "inherit"' if self.inherit else "")
        return f'a number in 0..1, {words} or "fpr:<share>" (the threshold the model measured for that ham FPR)'

    def parse(self, value: Any) -> float | str:
        if value in ("model", "off") or (self.inherit and value == "inherit"):
            return value
        if isinstance(value, str) and value.startswith(FPR):
            try:
                share = float(value[len(FPR) :])
            except ValueError:
                raise self.fail() from None
            if not 0.0 < share < 1.0:
                raise self.fail()
            return f"{FPR}{share:g}"
        try:
            return Number(0.0, 1.0).parse(value)
        except ValueError:
            raise self.fail() from None

    def dump(self, value: float | str) -> Any:
        return value if isinstance(value, str) else Number().dump(value)


@dataclass(frozen=True)
class AddressList(Kind):
    """An array of envelope addresses or domains ("user@example.com", "example.com", "@example.com")."""

    expect = 'an array of addresses or domains, e.g. ["user@example.com", "example.com"]'

    @property
    def what_type(self) -> str:
        return "an array of addresses or domains"

    def parse(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail()
        for v in value:
            try:
                normalize_entry(v)
            except ValueError as e:
                raise ValueError(f"{e} (use user@example.com or example.com)") from None
        return tuple(value)

    def dump(self, value: tuple[str, ...]) -> list[str]:
        return list(value)


@dataclass(frozen=True)
class NetworkList(Kind):
    """An array of IP networks in CIDR ("192.0.2.0/24", "2001:db8::/32"; a bare address is one host), kept as written."""

    expect = 'an array of networks, e.g. ["127.0.0.0/8", "::1/128"]'

    def parse(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail()
        for v in value:
            parse_network(v)  # its ValueError names the entry
        return tuple(value)

    def dump(self, value: tuple[str, ...]) -> list[str]:
        return list(value)


@dataclass(frozen=True)
class Section(Kind):
    """A sub-table; its keys are the fields of `cls`."""

    cls: type = object

    @property
    def expect(self) -> str:
        return "a table"


def _key(default: Any, kind: Kind, doc: str) -> Any:
    return field(default=default, metadata={"kind": kind, "doc": doc})


def _section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"kind": Section(cls=cls), "doc": doc})


# --------------------------------------------------------------------------------------------
# The key tree, and writing values back as TOML


def _all_keys(cls: type, where: Where = ()) -> list[Where]:
    out: list[Where] = []
    for f in fields(cls):
        kind = f.metadata["kind"]
        out += _all_keys(kind.cls, where + (f.name,)) if isinstance(kind, Section) else [where + (f.name,)]
    return out


def _field_at(cls: type, where: Where) -> Any:
    for part in where[:-1]:
        cls = {f.name: f for f in fields(cls)}[part].metadata["kind"].cls
    return {f.name: f for f in fields(cls)}[where[-1]]


def _label(where: Where) -> str:
    if len(where) == 1:
        return f"[{where[0]}]"
    return f"[{'.'.join(where[:-1])}] {where[-1]}"


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    # json's escapes are TOML's, except that TOML also wants DEL escaped
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
