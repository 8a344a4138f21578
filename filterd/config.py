"""Configuration: one typed, validated settings object read from TOML plus `--set` overrides.

Each TOML section is a frozen dataclass and every key has a default, so `filterd serve` runs with
no file at all. A key's dataclass field carries its `Kind` (how the value is read, checked and
written back) and a one-line description; the loader, the `--set` parser, `Config.to_toml()` and
`config_reference()` are all driven by those, so adding a key is one line.

Errors are one line naming the file (or the `--set` option) and the key, e.g.
`filterd.toml: [batching] max_wait_ms: must be a number >= 0, got "fast"`.
Durations are stored as seconds (float); host:port values as `HostPort(host, port)`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import ipaddress
import json
import math
import re
import socket
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence
from urllib.parse import urlsplit

from filterd.policy.decision import LEVELS as SPAM_LEVELS
from filterd.policy.decision import SOFT_REJECT, door_levels, level_key, normalize_entry, policy_problem
from filterd.policy.decision import REQUIRE, lists_warning, parse_network
from filterd.errors import ConfigError

__all__ = [
    "BatchingConfig",
    "Config",
    "ExplainConfig",
    "HostPort",
    "HttpConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MilterConfig",
    "ModelConfig",
    "RedisConfig",
    "PolicyConfig",
    "PolicyDoorConfig",
    "RoutesConfig",
    "SmtpConfig",
    "TrainerConfig",
    "UnixSocket",
    "check_config",
    "config_reference",
    "format_duration",
    "is_loopback",
    "load_config",
    "parse_duration",
    "parse_hostport",
    "parse_listen",
    "redact_url",
]

# --------------------------------------------------------------------------------------------
# Value parsers (public: the CLIs and ingress code use them too)

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)")  # "ms" before "m": "5ms" is 5 milliseconds
_DURATION_FORMS = '"500ms", "5s", "2m", "1h", "1d", "1h30m" or a number of seconds'


def parse_duration(text: str | int | float) -> float:
    """Seconds from "500ms", "5s", "2m", "1h", "1d", "1h30m" or a bare number of seconds; ValueError if bad."""
    if isinstance(text, bool):  # bool is an int in Python; `timeout = true` is a mistake, not 1 second
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    elif isinstance(text, str):
        seconds = _duration_from_text(text)
    else:
        raise ValueError(f"not a duration: {text!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {text!r} (must be finite and >= 0)")
    return seconds


def _duration_from_text(text: str) -> float:
    s = text.strip()
    if re.fullmatch(_NUMBER, s):
        return float(s)
    total, pos = 0.0, 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"not a duration: {text!r} (use {_DURATION_FORMS})")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s:
        raise ValueError("not a duration: empty text")
    return total


def format_duration(seconds: float) -> str:
    """The shortest duration text that `parse_duration` reads back as `seconds` ("1h", "500ms", "90s")."""
    ms = round(seconds * 1000)
    if abs(ms / 1000 - seconds) > 1e-9:  # finer than a millisecond: plain seconds
        return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"
    if ms == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        per = round(_UNITS[unit] * 1000)
        if ms % per == 0:
            return f"{ms // per}{unit}"
    return f"{ms}ms"


class HostPort(NamedTuple):
    """A parsed "host:port"; the host carries no brackets ("::1"), `str()` adds them back."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOSTNAME = re.compile(r"(?=.{1,253}$)(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def parse_hostport(text: str) -> HostPort:
    """("127.0.0.1", 10025) from "127.0.0.1:10025"; "[::1]:9464" and "localhost:25" too; ValueError if bad."""
    try:
        return _split_hostport(text)
    except ValueError as e:
        raise ValueError(f"not host:port: {text!r}: {e}") from None


def _split_hostport(text: str) -> HostPort:
    """parse_hostport, with the bare reason in the ValueError (the config loader adds the key)."""
    if not isinstance(text, str):
        raise ValueError("not a string")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [IPv6]:port, e.g. [::1]:9464")
        _check_ipv6(host)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("missing :port")
        _check_host(host)
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ValueError("port must be a number in 1..65535")
    return HostPort(host, int(port))


class UnixSocket(NamedTuple):
    """A listening socket path, written "unix:/path" (as Postfix names milters)."""

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


def parse_listen(text: str) -> HostPort | UnixSocket:
    """HostPort from "127.0.0.1:11332" (or Postfix's "inet:127.0.0.1:11332"), UnixSocket from
    "unix:/run/filterd/milter.sock" (an absolute path); ValueError if bad."""
    if not isinstance(text, str):
        raise ValueError("not a string")
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/") or _CONTROL.search(path):
            raise ValueError('a unix socket needs an absolute path, e.g. "unix:/run/filterd/milter.sock"')
        return UnixSocket(Path(path))
    return _split_hostport(text.removeprefix("inet:"))


def _check_ipv6(host: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv6 address") from None


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("missing host (0.0.0.0 or [::] listen on all interfaces)")
    if ":" in host:
        raise ValueError("an IPv6 address needs brackets, e.g. [::1]:9464")
    if re.fullmatch(r"[0-9.]+", host):  # looks numeric: must be a real IPv4 address, not "127.1" or "300.0.0.1"
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{host!r} is not a valid host name")


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8, ::1 (and ::ffff:127.x); wildcard and other addresses are not."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs, errors and `check-config` output."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def _check_redis_url(url: str) -> None:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a URL starting with redis://, rediss:// or unix://")
    if scheme == "unix":
        if not parts.path:
            raise ValueError("must name a socket path, e.g. unix:///run/redis/redis.sock")
        return
    if not parts.hostname:
        raise ValueError(f"must name a host, e.g. {scheme}://127.0.0.1:6379/0")
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked
    except ValueError:
        raise ValueError("must have a port in 1..65535") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError("must end with a database number, e.g. /0")


# --------------------------------------------------------------------------------------------
# Kinds: how one key is read, checked and written back. `parse` raises ValueError("must be ...").

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Kind:
    """Base: subclasses set `expect` (what a valid value is, in words) and override `parse`."""

    text_like = False  # a `--set` value that TOML reads as a number, bool, array... is kept as its text
    secret = False  # may hold a password: redacted in error messages and (by default) in dumps
    expect = "a value"

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

    def dump(self, value: float) -> str:
        return format_duration(value)


@dataclass(frozen=True)
class Address(Kind):
    expect = 'host:port, e.g. "127.0.0.1:10025" or "[::1]:9464"'
    text_like = True

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
    """A [policy] level: a P(spam), "model" (the model's own threshold), "off", or (per door) "inherit"."""

    inherit: bool = False

    @property
    def expect(self) -> str:
        words = '"model", "off"' + (', "inherit"' if self.inherit else "")
        return f"a number in 0..1, {words}"

    def parse(self, value: Any) -> float | str:
        if value in ("model", "off") or (self.inherit and value == "inherit"):
            return value
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
# The sections

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
ACTIONS = SPAM_LEVELS  # [smtp] action (deprecated): one level at the spam threshold
ON_ERROR = ("accept", "tempfail")
TRAINABLE = ("head", "last-block", "last-2-blocks", "all")  # as `filterd-trainer fit --trainable`
LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
GPT2_CONTEXT = 1024  # GPT-2's positions: the longest message a model reads


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the model directory the daemon serves, and where it runs."""

    path: Path = _key(Path("/var/lib/filterd/models/current"), PathKind(), "model directory; swapped in when it changes")
    device: str = _key("auto", Choice(options=DEVICES), "auto | cpu | cuda (auto: cuda when available)")
    dtype: str = _key("auto", Choice(options=DTYPES), "auto | float32 | bfloat16 (auto: bfloat16 on cuda, float32 on cpu)")
    poll_interval: float = _key(2.0, Duration(), "how often the model path is checked for a new model")
    min_reload_interval: float = _key(
        5.0, Duration(positive=False), "reloads at most this often (SIGHUP excepted); an unchanged model is never reloaded"
    )
    threshold: float | None = _key(
        None, Threshold(), 'deprecated, use [policy] tag_score: "model" (the model\'s own) or P(spam) 0..1 at which mail is spam'
    )

    def resolved_dtype(self, device_type: str) -> str:
        """The dtype to load with on a torch device type ("cuda" or "cpu")."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device_type == "cuda" else "float32"


@dataclass(frozen=True)
class BatchingConfig:
    """[batching]: how messages are grouped into forward passes."""

    max_batch_size: int = _key(64, Int(1), "messages per forward pass")
    max_batch_tokens: int = _key(
        8192, Int(GPT2_CONTEXT, why="one message of up to 1024 tokens must fit in a batch"), "padded tokens per forward pass"
    )
    max_wait_ms: float = _key(5.0, Number(0.0), "longest a message waits for a batch to fill (ms)")
    max_queue: int = _key(4096, Int(1), "messages waiting for a batch; when full, ingress stops reading (backpressure)")


@dataclass(frozen=True)
class RoutesConfig:
    """[redis.routes]: copy each result to a stream per verdict ("" = no copy)."""

    spam: str = _key("", _stream(allow_empty=True), "stream receiving a copy of each spam entry")
    ham: str = _key("", _stream(allow_empty=True), "stream receiving a copy of each ham entry")

    def get(self, verdict: str) -> str | None:
        """The route stream for a verdict, or None when that verdict is not routed."""
        return self.as_dict().get(verdict)

    def as_dict(self) -> dict[str, str]:
        return {v: s for v, s in (("spam", self.spam), ("ham", self.ham)) if s}


@dataclass(frozen=True)
class RedisConfig:
    """[redis]: the Redis Streams ingress (SMS gateways and other producers)."""

    enabled: bool = _key(True, Bool(), "read messages from Redis Streams")
    url: str = _key("redis://127.0.0.1:6379/0", RedisUrl(), "redis://, rediss:// (TLS) or unix:// URL")
    in_stream: str = _key("filterd:in", _stream(), "stream of messages to classify")
    out_stream: str = _key("filterd:out", _stream(), "stream of results")
    dead_stream: str = _key("filterd:dead", _stream(), "entries that could not be processed, with an error field")
    label_stream: str = _key("filterd:labels", _stream(), "labelled messages for the trainer")
    group: str = _key("filterd", _stream("a consumer group name"), "consumer group on in_stream (created if missing)")
    consumer: str = _key(
        "", _stream("a consumer name", allow_empty=True), 'consumer name, stable across restarts; "" = the hostname'
    )
    model_channel: str = _key("filterd:model", _stream("a channel name"), "pub/sub channel announcing new models")
    block_ms: int = _key(1000, Int(1), "XREADGROUP BLOCK time (ms); bounds how long shutdown waits")
    count: int = _key(64, Int(1), "entries read per XREADGROUP call")
    claim_idle_ms: int = _key(60000, Int(1), "pending entries idle this long (ms) are claimed from dead consumers")
    max_deliveries: int = _key(5, Int(1), "an entry delivered this many times without success is dead-lettered")
    max_inflight: int = _key(512, Int(1), "entries read and not yet acknowledged, at most (per consumer)")
    max_inflight_bytes: int = _key(67108864, Int(1), "bytes of entries read and not yet acknowledged, at most (per consumer)")
    dead_consumer_idle: float = _key(3600.0, Duration(), "consumers with no pending entries idle this long are deleted")
    max_text_bytes: int = _key(65536, Int(1), "larger text fields are dead-lettered")
    out_maxlen: int = _key(0, Int(0), "0 = no trimming; else MAXLEN ~ N on output streams")
    routes: RoutesConfig = _section(RoutesConfig, "[redis.routes] spam/ham: copy results to a stream per verdict")

    def consumer_name(self) -> str:
        """The configured consumer name, or the hostname: stable, so a restarted process finds its own pending
        entries at once. Two instances on one host need distinct names (README, "Redis Streams")."""
        return self.consumer or socket.gethostname()


@dataclass(frozen=True)
class SmtpConfig:
    """[smtp]: the after-queue content filter (Postfix content_filter)."""

    enabled: bool = _key(True, Bool(), "accept mail over SMTP")
    listen: HostPort = _key(parse_hostport("127.0.0.1:10025"), Address(), "where mail comes in from the MTA")
    next_hop: HostPort = _key(parse_hostport("127.0.0.1:10026"), Address(), "where accepted mail is re-injected")
    action: str = _key(
        "tag", Choice(options=ACTIONS), "deprecated, use [policy.smtp] levels: what spam gets: tag | subject | quarantine | discard | reject"
    )
    quarantine_rcpt: str = _key(
        "",
        Text("an address without spaces or <>", pattern=r"[^\s<>,;\"]+"),
        "recipient of quarantined spam (the quarantine level)",
    )
    subject_prefix: str = _key("[SPAM] ", Text("a string"), "prepended to the Subject of spam at the subject level")
    max_message_bytes: int = _key(26214400, Int(1), "larger messages get 552 5.3.4")
    max_recipients: int = _key(1000, Int(1), "RCPT TO beyond this get 452 4.5.3")
    timeout: float = _key(300.0, Duration(), "idle timeout for a client session and for each next-hop command")
    on_error: str = _key(
        "accept", Choice(options=ON_ERROR), "when classification fails: accept (relay untagged) | tempfail (451)"
    )
    data_done_timeout: float = _key(
        540.0, Duration(), "end of DATA to our reply (classify + relay); keep below Postfix's smtp_data_done_timeout (10m)"
    )
    session_timeout: float = _key(
        1800.0, Duration(), "total session deadline: then 421 4.4.2 and close (a message being filtered is answered first)"
    )
    max_connections: int = _key(400, Int(1), "sessions at once; more get 421 4.7.0 (lowered to fit the open files limit)")
    max_connections_per_client: int = _key(200, Int(1), "sessions at once from one client address; more get 421 4.7.0")
    max_scan_bytes: int = _key(
        1048576, Int(1024), "only this much of a message is parsed for the classifier's text (all of it is relayed)"
    )
    max_inflight_bytes: int = _key(
        268435456, Int(1), "message bytes held by all sessions together; beyond it 452 4.3.1 (Postfix retries)"
    )


def _level(default: str, action: str, inherit: bool = False) -> Any:
    if inherit:
        return _key(default, LevelKind(inherit=True), f'the {action} level for this door; "inherit" = [policy] {level_key(action)}')
    docs = {
        "tag": "spam threshold: at or above it mail is spam and tagged (X-Spam-Flag: YES)",
        "subject": "spam at or above it also gets [smtp] subject_prefix in the Subject",
        "quarantine": "spam at or above it is quarantined (SMTP: sent to [smtp] quarantine_rcpt only)",
        "discard": "spam at or above it is dropped while the sender is told it was delivered",
        "reject": "spam at or above it is refused (5xx) by doors before the queue; SMTP takes it only from [policy.smtp]",
        SOFT_REJECT: "from it up to the next level: deferred with 4xx (doors before the queue only)",
    }
    return _key(default, LevelKind(), docs[action])


@dataclass(frozen=True)
class PolicyDoorConfig:
    """[policy.smtp], [policy.milter], [policy.http], [policy.redis]: one door's levels."""

    tag_score: float | str = _level("inherit", "tag", True)
    subject_score: float | str = _level("inherit", "subject", True)
    quarantine_score: float | str = _level("inherit", "quarantine", True)
    discard_score: float | str = _level("inherit", "discard", True)
    reject_score: float | str = _level("inherit", "reject", True)
    soft_reject_score: float | str = _level("inherit", SOFT_REJECT, True)


def _door(source: str) -> Any:
    return _section(PolicyDoorConfig, f"[policy.{source}] levels for the {source} door")


@dataclass(frozen=True)
class PolicyConfig:
    """[policy]: what happens to spam (levels, lists), for every door; see filterd/policy/decision.py."""

    tag_score: float | str = _level("model", "tag")
    subject_score: float | str = _level("off", "subject")
    quarantine_score: float | str = _level("off", "quarantine")
    discard_score: float | str = _level("off", "discard")
    reject_score: float | str = _level("off", "reject")
    soft_reject_score: float | str = _level("off", SOFT_REJECT)
    allow_senders: tuple[str, ...] = _key((), AddressList(), "envelope senders (address or domain) never scored: ham")
    allow_recipients: tuple[str, ...] = _key((), AddressList(), "mail whose every recipient is listed is never scored: ham")
    deny_senders: tuple[str, ...] = _key((), AddressList(), "envelope senders never scored: spam, at the door's top level")
    deny_recipients: tuple[str, ...] = _key((), AddressList(), "mail to any listed recipient (spam traps) is spam, not scored")
    allow_senders_require: str = _key(
        "none",
        Choice(options=REQUIRE),
        'who may claim an allow_senders entry: "authenticated" (SASL login), "trusted_networks" (client address in '
        'trusted_networks), "authenticated_or_trusted_networks", or "none" (any client, forgeable: check-config warns)',
    )
    trusted_networks: tuple[str, ...] = _key((), NetworkList(), "client networks (CIDR) for allow_senders_require; empty: none")
    smtp: PolicyDoorConfig = _door("smtp")
    milter: PolicyDoorConfig = _door("milter")
    http: PolicyDoorConfig = _door("http")
    redis: PolicyDoorConfig = _door("redis")


@dataclass(frozen=True)
class MilterConfig:
    """[milter]: the before-queue milter (Postfix smtpd_milters); see filterd/doors/milter.py."""

    enabled: bool = _key(False, Bool(), "serve the milter protocol (Postfix smtpd_milters / non_smtpd_milters)")
    listen: HostPort | UnixSocket = _key(
        parse_listen("127.0.0.1:11332"), Listen(), "host:port or unix:/path the MTA connects to"
    )
    socket_mode: str = _key(
        "0660", Text("an octal file mode such as 0660", allow_empty=False, pattern=r"0?[0-7]{3}"),
        "permissions of a unix:/path socket (the MTA's user must be able to write it)",
    )  # fmt: skip
    max_message_bytes: int = _key(
        1048576, Int(1024), "headers + body kept per message for classification; past it the MTA skips the rest (mail is still delivered whole)"
    )
    on_error: str = _key(
        "accept", Choice(options=ON_ERROR),
        "when the decision fails or is late: accept (forged X-Spam-* removed, no tags) | tempfail (451 4.7.1)",
    )  # fmt: skip
    reply_timeout: float = _key(
        60.0, Duration(), "end of message to our reply; then on_error applies. Keep below Postfix's milter_content_timeout (300s)"
    )
    idle_timeout: float = _key(600.0, Duration(), "a connection silent this long is closed (Postfix reconnects)")
    max_sessions: int = _key(
        256, Int(1), "MTA connections at once (Postfix: one per smtpd process, 100 by default); more are closed at once"
    )


@dataclass(frozen=True)
class HttpConfig:
    """[http]: the HTTP scan API (Rspamd's /checkv2 and legacy RSPAMC, /ping, /classify); see filterd/doors/http.py."""

    enabled: bool = _key(False, Bool(), "serve the HTTP scan API (Exim variant=rspamd, Haraka, Amavis, applications)")
    listen: HostPort = _key(parse_hostport("127.0.0.1:11333"), Address(), "host:port of the scan API; off loopback it needs a password")
    password: str = _key(
        "", Password(), "required in a Password request header when set (401 without, 403 wrong); mandatory off loopback"
    )
    max_body_bytes: int = _key(10485760, Int(1024), "largest request body (a whole message); larger gets 413")
    read_timeout: float = _key(30.0, Duration(), "a request's head and body must arrive within this; else 408")
    idle_timeout: float = _key(60.0, Duration(), "a keep-alive connection silent this long is closed")
    reply_timeout: float = _key(60.0, Duration(), "request read to verdict (waits for the model at start, then the batch); else 503")
    required_score: float = _key(
        15.0, Number(0.001), "Rspamd-scale score at the spam threshold: score = P(spam) / threshold * required_score"
    )
    max_connections: int = _key(256, Int(1), "client connections at once; more get 503 with Retry-After and are closed")


HEADER_STYLES = ("filterd", "spamassassin")


@dataclass(frozen=True)
class HeadersConfig:
    """[headers]: the X-Spam-* fields the doors that edit mail write (SMTP content filter, milter); see filterd/mail/headers.py.

    A section of its own, like [policy]: it is one format for every door that adds headers, not a
    setting of one door (HTTP and Redis report in their own protocols)."""

    style: str = _key(
        "filterd", Choice(options=HEADER_STYLES),
        "filterd (X-Spam-Score = P(spam)) | spamassassin (X-Spam-Score on SpamAssassin's scale, X-Spam-Level stars)",
    )  # fmt: skip
    required_score: float = _key(
        5.0, Number(0.1, 1000.0), "spamassassin style: the X-Spam-Score at the spam threshold (SpamAssassin's required_score)"
    )
    keep_upstream: bool = _key(
        False, Bool(), "rename incoming X-Spam-* fields (trusted upstream filter) instead of deleting them; only if every path passes it"
    )
    upstream_prefix: str = _key(
        "X-Upstream-",
        # never one of our namespaces: a renamed field would be ours again (and deleted, or trusted)
        Text("a header name prefix (printable ASCII, no colon), not X- and not starting X-Spam- or X-Filterd-", allow_empty=False,
             pattern=r"(?i)(?!x-spam-|x-filterd-|x-$)[!-9;-~]+"),
        "keep_upstream: X-Spam-Status becomes <prefix>Spam-Status",
    )  # fmt: skip


EXPLAIN_METHODS = ("integrated-gradients", "gradient", "screened-occlusion", "occlusion")  # filterd/model/explain.py; the first is the default


@dataclass(frozen=True)
class ExplainConfig:
    """[explain]: per-verdict explanations (the words that moved P(spam)), computed beside the batcher."""

    enabled: str = _key("off", Choice(options=("off", "spam", "all")), "which verdicts get an explanation: off | spam | all")
    method: str = _key(EXPLAIN_METHODS[0], Choice(options=EXPLAIN_METHODS), "how word contributions are computed (see README)")
    top_words: int = _key(5, Int(1, 50), "words of each sign (raising, lowering P(spam)) reported")
    header: bool = _key(False, Bool(), "add an X-Spam-Report header with the top words (SMTP, milter)")
    max_header_bytes: int = _key(256, Int(64, 900), "X-Spam-Report's value is cut to this many bytes (whole words)")
    max_queue: int = _key(16, Int(1), "messages waiting for an explanation; beyond, a message goes without (counted)")
    deadline: float = _key(2.0, Duration(), "longest a message waits for its explanation; then it goes on without one (counted)")
    nice: int = _key(10, Int(0, 19), "niceness of the explaining thread and its torch threads, so scoring keeps the CPU first")


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: Prometheus /metrics and /healthz of the daemon."""

    listen: HostPort = _key(parse_hostport("127.0.0.1:9464"), Address(), "/metrics and /healthz")


@dataclass(frozen=True)
class TrainerConfig:
    """[trainer]: the label store and the periodic refit service (filterd-trainer)."""

    store: Path = _key(Path("/var/lib/filterd/labels.sqlite"), PathKind(), "label store (SQLite)")
    models_dir: Path = _key(
        Path("/var/lib/filterd/models"), PathKind(), "versioned model directories; current points at the live one"
    )
    interval: float = _key(3600.0, Duration(), "time between refit attempts")
    metrics_listen: HostPort = _key(parse_hostport("127.0.0.1:9465"), Address(), "the trainer's /metrics")
    min_new_labels: int = _key(100, Int(0), "new labels needed since the last refit before refitting")
    mode: str = _key(
        "auto", Choice(options=("auto", *TRAINABLE)),
        "what a refit trains: auto (all up to 30M parameters, else head) | head | last-block | last-2-blocks | all",
    )  # fmt: skip
    max_regression: float = _key(0.01, Number(0.0, 1.0), "a candidate may lose at most this much accuracy vs the current model")
    max_ham_fpr: float = _key(
        0.02,
        Number(0.0, 1.0),
        "ham false-positive rate bound: gates a first model; over it a better candidate still wins and an alert is raised",
    )
    balance: str = _key(
        "weight",
        Choice(options=("weight", "oversample", "undersample")),
        "refit class balance: weight | oversample | undersample (drops labels)",
    )
    min_per_class: int = _key(20, Int(1), "labels of each class needed before any refit")
    keep: int = _key(5, Int(1), "model versions kept in models_dir (the live one always stays)")
    golden_set: Path | None = _key(
        None, PathKind(optional=True), 'CSV (id,label,text) every candidate must pass; "" = the live model\'s golden.csv'
    )
    golden_tolerance: float = _key(
        0.01,
        Number(0.0, 1.0),
        "on the golden set a candidate may lose at most this much accuracy, or gain this much ham FPR, vs the current model",
    )
    replay: int = _key(
        1000, Int(0), "refit: at most this many messages per class of the live model's replay.csv mixed into training (0 = off)"
    )
    final_fit: str = _key(
        "all",
        Choice(options=("all", "fold")),
        "after promotion: all = retrain on every label (+ replay) and publish that; fold = publish the gated candidate",
    )
    epochs: int = _key(2, Int(1), "top modes (last-block, last-2-blocks, all): training epochs per refit")
    lr: float = _key(5e-5, Number(1e-9, 1.0), "top modes: AdamW learning rate")
    max_cycle_seconds: float = _key(
        0.0,
        Duration(positive=False),
        "top modes: training stops at this much time per cycle, keeping the best state so far (0 = no limit)",
    )
    group: str = _key("filterd-trainer", _stream("a consumer group name"), "consumer group on label_stream")
    reservoir: Path | None = _key(
        None, PathKind(optional=True), 'keep a sample of classified texts here (SQLite, 0600) for pretrain --reservoir; "" = off'
    )
    reservoir_size: int = _key(
        20000, Int(1), "texts the reservoir keeps at most (a uniform sample of the last reservoir_max_age)"
    )
    reservoir_max_age: float = _key(30 * 86400.0, Duration(), "reservoir texts older than this are deleted")


@dataclass(frozen=True)
class HistoryConfig:
    """[history]: the verdict history the web console shows (filterd/store/history.py)."""

    enabled: bool = _key(False, Bool(), "record every decision (time, door, ids, envelope, Subject, score, action, model)")
    path: Path = _key(Path("/var/lib/filterd/history.sqlite"), PathKind(), "the history file (SQLite, created 0600)")
    max_rows: int = _key(100000, Int(1), "decisions kept at most (the oldest are deleted)")
    max_age_days: float = _key(30.0, Number(0.001), "decisions older than this many days are deleted")
    store_text: bool = _key(
        False, Bool(), "also keep the text the model read (the console then highlights it and can learn from it)"
    )


@dataclass(frozen=True)
class ConsoleConfig:
    """[console]: the web console for operators (filterd/console.py)."""

    enabled: bool = _key(False, Bool(), "serve the web console (history, explanations, learn, models, rollback)")
    listen: HostPort = _key(parse_hostport("127.0.0.1:11334"), Address(), "host:port of the console; off loopback it needs a password")
    password: str = _key("", Password(), "HTTP Basic password (any user name) on every request when set; mandatory off loopback")
    grafana_url: str = _key("", Text("an http(s) URL", pattern=r"https?://[^\s\"'<>]+"), "link to the Grafana dashboard shown in the console, \"\" = none")


@dataclass(frozen=True)
class LoggingConfig:
    """[logging]"""

    level: str = _key("info", Choice(options=LEVELS), "debug | info | warning | error")
    format: str = _key("text", Choice(options=LOG_FORMATS), "text | json (one object per line: time, level, logger, message)")


@dataclass(frozen=True)
class Config:
    """The whole configuration: one attribute per TOML section."""

    model: ModelConfig = _section(ModelConfig, "[model]")
    batching: BatchingConfig = _section(BatchingConfig, "[batching]")
    redis: RedisConfig = _section(RedisConfig, "[redis]")
    smtp: SmtpConfig = _section(SmtpConfig, "[smtp]")
    policy: PolicyConfig = _section(PolicyConfig, "[policy]")
    headers: HeadersConfig = _section(HeadersConfig, "[headers]")
    milter: MilterConfig = _section(MilterConfig, "[milter]")
    http: HttpConfig = _section(HttpConfig, "[http]")
    explain: ExplainConfig = _section(ExplainConfig, "[explain]")
    metrics: MetricsConfig = _section(MetricsConfig, "[metrics]")
    trainer: TrainerConfig = _section(TrainerConfig, "[trainer]")
    history: HistoryConfig = _section(HistoryConfig, "[history]")
    console: ConsoleConfig = _section(ConsoleConfig, "[console]")
    logging: LoggingConfig = _section(LoggingConfig, "[logging]")

    def warnings(self) -> list[str]:
        """Risky but valid settings (non-loopback listeners, plaintext remote Redis...), one line each."""
        return [w for check in _WARNINGS if (w := check(self))]

    def deprecations(self) -> list[str]:
        """One line per deprecated key set in the file or a --set (it still works, mapped onto [policy])."""
        explicit = getattr(self, "_explicit", frozenset())  # set by the loader: which keys the user wrote
        out = []
        if ("model", "threshold") in explicit:
            value = "model" if self.model.threshold is None else self.model.threshold
            out.append(f"[model] threshold is deprecated: set [policy] tag_score = {_toml_scalar(value)} instead")
        if ("smtp", "action") in explicit:
            a = self.smtp.action
            at = _toml_scalar(door_levels(self, "smtp")["tag"][0])  # the spam threshold it acted at
            hint = "tag is the default" if a == "tag" else f"[policy.smtp] {level_key(a)} = {at} does the same"
            out.append(f"[smtp] action is deprecated: remove it ({hint}); see the README's Policy section")
        return out

    def to_toml(self, *, redact: bool = True) -> str:
        """The effective configuration as TOML (loads back to an equal Config unless a password was redacted)."""
        lines = ["# filterd effective configuration"]
        for f in fields(self):
            lines.append("")
            _dump_table(getattr(self, f.name), (f.name,), redact, lines)
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class _Origin:
    label: str  # what messages name: the file, "--set section.key" or "defaults"
    base: Path | None = None  # relative paths in a file are relative to the file's directory


Where = tuple[str, ...]  # a key's path: ("redis", "routes", "spam")
OriginOf = Callable[[Where], _Origin]


def load_config(path: Path | str | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file (if any), then `section.key=value` overrides; ConfigError if invalid."""
    return _load(path, overrides)[0]


def check_config(path: Path | str | None, overrides: Sequence[str] = ()) -> Config:
    """`load_config` plus the checks that involve several keys (what `filterd check-config` and serve run)."""
    cfg, origin_of = _load(path, overrides)
    for check in _CROSS_CHECKS:
        problem = check(cfg)
        if problem:
            where, message = problem
            raise ConfigError(f"{origin_of(where).label}: {_label(where)}: {message}")
    return cfg


def _load(path: Path | str | None, overrides: Sequence[str]) -> tuple[Config, OriginOf]:
    if path is None:
        file_origin, raw = _Origin("defaults"), {}
    else:
        path = Path(path)
        file_origin, raw = _Origin(str(path), path.absolute().parent), _read_toml(path)
    cfg = _build(Config, raw, (), lambda where: file_origin)  # the file must be valid on its own
    if not overrides:
        return _with_explicit(cfg, raw), lambda where: file_origin
    origins: dict[Where, _Origin] = {}
    for text in overrides:
        where, value = _parse_override(text)
        _assign(raw, where, value)
        for old in [w for w in origins if w[: len(where)] == where]:  # a replaced table drops its keys' origins
            del origins[old]
        origins[where] = _Origin("--set " + ".".join(where))

    def origin_of(where: Where) -> _Origin:
        for n in range(len(where), 0, -1):
            if where[:n] in origins:
                return origins[where[:n]]
        return file_origin

    return _with_explicit(_build(Config, raw, (), origin_of), raw), origin_of


def _with_explicit(cfg: Config, raw: Mapping[str, Any]) -> Config:
    """Note which keys the user wrote (not a field: equality and dumps ignore it), for `deprecations`."""
    def paths(table: Mapping[str, Any], where: Where) -> list[Where]:
        out: list[Where] = []
        for k, v in table.items():
            out += paths(v, where + (k,)) if isinstance(v, dict) else [where + (k,)]
        return out

    object.__setattr__(cfg, "_explicit", frozenset(paths(raw, ())))
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is harmless
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # tomllib's message ends "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {' '.join(str(e).split())}") from None


def _build(cls: type, raw: Mapping[str, Any], where: Where, origin_of: OriginOf) -> Any:
    """An instance of the dataclass `cls` from a TOML table, every key parsed and checked."""
    spec = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        at = where + (key,)
        if key not in spec and not where and not isinstance(value, dict):
            raise ConfigError(f"{origin_of(at).label}: {key}: {_unknown_top_level(key)}")
        if key not in spec:
            raise _error(origin_of(at), at, _unknown(key, spec, where))
        kind: Kind = spec[key].metadata["kind"]
        if isinstance(kind, Section):
            if not isinstance(value, dict):
                raise _error(origin_of(at), at, f"must be a table [{'.'.join(at)}], got {_show(value)}")
            values[key] = _build(kind.cls, value, at, origin_of)
            continue
        origin = origin_of(at)
        try:
            parsed = kind.parse(value)
        except ValueError as e:
            raise _error(origin, at, f"{e}, got {_show(value, kind)}") from None
        values[key] = kind.anchor(parsed, origin.base) if origin.base else parsed
    return cls(**values)


def _unknown(key: str, spec: Mapping[str, Any], where: Where) -> str:
    """ "unknown key", with the closest known key or the section the key belongs in."""
    noun = "section" if not where else "key"
    close = difflib.get_close_matches(key, list(spec), n=1, cutoff=0.6)
    if close:
        hint = f"[{close[0]}]" if not where else close[0]
        return f"unknown {noun} (did you mean {hint}?)"
    home = [".".join(w[:-1]) for w in _all_keys(Config) if w[-1] == key and w[:-1] != where]
    if home:
        return f"unknown {noun} (it belongs in [{home[0]}])" if where else f"unknown section (set it in [{home[0]}])"
    known = ", ".join(spec)
    return f"unknown {noun} (known: {known})"


def _unknown_top_level(key: str) -> str:
    home = [w[0] for w in _all_keys(Config) if w[-1] == key]
    hint = f"set it in [{home[0]}]" if home else "settings go in a section such as [model]"
    return f"unknown top-level key ({hint})"


def _all_keys(cls: type, where: Where = ()) -> list[Where]:
    out: list[Where] = []
    for f in fields(cls):
        kind = f.metadata["kind"]
        out += _all_keys(kind.cls, where + (f.name,)) if isinstance(kind, Section) else [where + (f.name,)]
    return out


def _label(where: Where) -> str:
    if len(where) == 1:
        return f"[{where[0]}]"
    return f"[{'.'.join(where[:-1])}] {where[-1]}"


def _error(origin: _Origin, where: Where, message: str) -> ConfigError:
    return ConfigError(f"{origin.label}: {_label(where)}: {message}")


def _show(value: Any, kind: Kind | None = None) -> str:
    """A value as the user wrote it, on one short line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, str):
        text = json.dumps(kind.redact(value) if kind is not None and kind.secret else value)  # escapes newlines: stays one line
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:76] + '..."'


# --------------------------------------------------------------------------------------------
# --set overrides


def _parse_override(text: str) -> tuple[Where, Any]:
    """(("batching", "max_batch_size"), 32) from "batching.max_batch_size=32"."""
    name, sep, value_text = text.partition("=")
    where = tuple(name.strip().split("."))
    if not sep or len(where) < 2 or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in where):
        raise ConfigError(f"--set {text}: expected section.key=value, e.g. batching.max_batch_size=32")
    kind = _kind_at(where)
    value = _toml_value(value_text)
    if kind.text_like and not isinstance(value, str):  # --set redis.group=2024 means the name "2024"
        value = value_text
    return where, value


def _kind_at(where: Where) -> Kind:
    """The kind of the key at `where`, or ConfigError naming the override's unknown part."""
    cls: type = Config
    for i, part in enumerate(where):
        spec = {f.name: f for f in fields(cls)}
        at = where[: i + 1]
        if part not in spec:
            raise _error(_Origin("--set " + ".".join(where)), at, _unknown(part, spec, at[:-1]))
        kind: Kind = spec[part].metadata["kind"]
        if i == len(where) - 1:
            return kind
        if not isinstance(kind, Section):
            raise _error(_Origin("--set " + ".".join(where)), at, "is a value, not a table")
        cls = kind.cls
    raise AssertionError("unreachable")


def _toml_value(text: str) -> Any:
    """The value as TOML reads it (32, false, "x", [..], {..}); anything else is the text itself."""
    if "\n" in text or "\r" in text:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assign(raw: dict[str, Any], where: Where, value: Any) -> None:
    node = raw
    for part in where[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):  # the file was validated first, so this is only a missing table
            child = node[part] = {}
        node = child
    node[where[-1]] = value


# --------------------------------------------------------------------------------------------
# Checks across keys: each returns (the key to blame, why) or None

Problem = tuple[Where, str] | None


def _check_ingress(cfg: Config) -> Problem:
    if not cfg.smtp.enabled and not cfg.redis.enabled and not cfg.milter.enabled and not cfg.http.enabled:
        return ("smtp", "enabled"), (
            "every ingress ([smtp], [redis], [milter], [http]) is disabled: nothing would be filtered; enable one"
        )
    return None


def _check_http_password(cfg: Config) -> Problem:
    """Off loopback, anyone who reaches the port could use the classifier (and probe it): no password, no start."""
    h = cfg.http
    if h.enabled and not h.password and not is_loopback(h.listen.host):
        return ("http", "password"), f'required when [http] listen = "{h.listen}" is not a loopback address'
    return None


def _check_console_password(cfg: Config) -> Problem:
    """Off loopback the console (history, learn, rollback) needs a password: no password, no start."""
    c = cfg.console
    if c.enabled and not c.password and not is_loopback(c.listen.host):
        return ("console", "password"), f'required when [console] listen = "{c.listen}" is not a loopback address'
    return None


def _check_quarantine(cfg: Config) -> Problem:
    if not cfg.smtp.enabled or cfg.smtp.quarantine_rcpt or "quarantine" not in door_levels(cfg, "smtp"):
        return None
    if cfg.smtp.action == "quarantine":
        return ("smtp", "quarantine_rcpt"), 'required when action = "quarantine"'
    return ("smtp", "quarantine_rcpt"), "required when a quarantine_score applies to the smtp door"


def _same_socket(a: HostPort, b: HostPort) -> bool:
    """Whether two addresses name the same listening socket (wildcards and localhost included)."""
    if a.port != b.port:
        return False
    hosts = {a.host.lower(), b.host.lower()}
    if len(hosts) == 1 or hosts & {"0.0.0.0", "::"}:
        return True
    return "localhost" in hosts and all(is_loopback(h) for h in hosts)


def _check_smtp_loop(cfg: Config) -> Problem:
    if cfg.smtp.enabled and _same_socket(cfg.smtp.listen, cfg.smtp.next_hop):
        return ("smtp", "next_hop"), f"{cfg.smtp.next_hop} is filterd's own listen address: mail would loop"
    return None


def _check_listen_clash(cfg: Config) -> Problem:
    listens: list[tuple[Where, HostPort]] = [(("metrics", "listen"), cfg.metrics.listen)]
    if cfg.smtp.enabled:
        listens.insert(0, (("smtp", "listen"), cfg.smtp.listen))
    if cfg.milter.enabled and isinstance(cfg.milter.listen, HostPort):
        listens.append((("milter", "listen"), cfg.milter.listen))
    if cfg.http.enabled:
        listens.append((("http", "listen"), cfg.http.listen))
    if cfg.console.enabled:
        listens.append((("console", "listen"), cfg.console.listen))
    listens.append((("trainer", "metrics_listen"), cfg.trainer.metrics_listen))
    for i, (where, addr) in enumerate(listens):
        for other, other_addr in listens[:i]:
            if _same_socket(addr, other_addr):
                return where, f"{addr} is also {_label(other)}: two servers cannot listen there"
    return None


def _check_streams(cfg: Config) -> Problem:
    r = cfg.redis
    if not r.enabled:
        return None
    written = [("out_stream", r.out_stream), ("dead_stream", r.dead_stream)]
    written += [(f"routes.{v}", s) for v, s in r.routes.as_dict().items()]
    for key, stream in written + [("label_stream", r.label_stream)]:
        if stream == r.in_stream:
            return ("redis", *key.split(".")), f'"{stream}" is also in_stream: filterd would read its own output'
    for key, stream in written:
        if stream == r.label_stream:
            return ("redis", *key.split(".")), f'"{stream}" is also label_stream: results would be taken for labels'
    return None


def _check_smtp_budget(cfg: Config) -> Problem:
    s = cfg.smtp
    if s.enabled and s.max_inflight_bytes < s.max_message_bytes:
        return ("smtp", "max_inflight_bytes"), f"must be >= max_message_bytes ({s.max_message_bytes}), got {s.max_inflight_bytes}"
    return None


def _check_read_count(cfg: Config) -> Problem:
    if cfg.redis.enabled and cfg.redis.count > cfg.batching.max_queue:
        return ("redis", "count"), f"must be <= [batching] max_queue ({cfg.batching.max_queue}), got {cfg.redis.count}"
    return None


_CROSS_CHECKS: tuple[Callable[[Config], Problem], ...] = (
    _check_ingress,
    _check_http_password,
    _check_console_password,
    policy_problem,  # levels in order, what each door can do, old and new keys not both
    _check_quarantine,
    _check_smtp_loop,
    _check_listen_clash,
    _check_streams,
    _check_read_count,
    _check_smtp_budget,
)


# --------------------------------------------------------------------------------------------
# Warnings: valid, but worth a second look


def _listen_warning(where: Where, addr: HostPort, why: str) -> str | None:
    if is_loopback(addr.host):
        return None
    return f'{_label(where)} = "{addr}" is not a loopback address: {why}; bind 127.0.0.1 or firewall the port'


def _warn_smtp_listen(cfg: Config) -> str | None:
    if not cfg.smtp.enabled:
        return None
    why = "anyone who can reach it can inject mail that next_hop accepts as already filtered (an open relay)"
    return _listen_warning(("smtp", "listen"), cfg.smtp.listen, why)


def _warn_milter_listen(cfg: Config) -> str | None:
    if not cfg.milter.enabled or not isinstance(cfg.milter.listen, HostPort):
        return None
    return _listen_warning(("milter", "listen"), cfg.milter.listen, "anyone who can reach it can have mail classified")


def _warn_http_listen(cfg: Config) -> str | None:
    if not cfg.http.enabled:
        return None
    why = "the Password header and the messages travel unencrypted (no TLS)"
    return _listen_warning(("http", "listen"), cfg.http.listen, why)


def _warn_console_listen(cfg: Config) -> str | None:
    if not cfg.console.enabled:
        return None
    return _listen_warning(("console", "listen"), cfg.console.listen, "the password and the history travel unencrypted (no TLS)")


def _warn_milter_reply_timeout(cfg: Config) -> str | None:
    if not cfg.milter.enabled or cfg.milter.reply_timeout < 300:
        return None
    return (
        f"[milter] reply_timeout = {format_duration(cfg.milter.reply_timeout)} is not below Postfix's "
        "milter_content_timeout (300s by default): Postfix may give up first and apply its default_action"
    )


def _warn_metrics_listen(cfg: Config) -> str | None:
    return _listen_warning(("metrics", "listen"), cfg.metrics.listen, "metrics reveal model and traffic details")


def _warn_trainer_listen(cfg: Config) -> str | None:
    return _listen_warning(("trainer", "metrics_listen"), cfg.trainer.metrics_listen, "metrics reveal model and training details")


def _warn_redis_plaintext(cfg: Config) -> str | None:
    parts = urlsplit(cfg.redis.url)
    if not cfg.redis.enabled or parts.scheme.lower() != "redis" or is_loopback(parts.hostname or "localhost"):
        return None
    return f"[redis] url: message texts travel to {parts.hostname} unencrypted; use rediss:// (TLS) across a network"


def _warn_reject(cfg: Config) -> str | None:
    if not cfg.smtp.enabled or "reject" not in door_levels(cfg, "smtp"):
        return None
    setting = '[smtp] action = "reject"' if cfg.smtp.action == "reject" else "[policy.smtp] reject_score"
    return (
        f"{setting} suits a before-queue filter (smtpd_proxy_filter) only: after the queue, "
        "Postfix turns the 550 into a bounce to a usually forged sender (backscatter)"
    )


def _warn_keep_upstream(cfg: Config) -> str | None:
    if not cfg.headers.keep_upstream:
        return None
    return (
        f"[headers] keep_upstream = true: incoming X-Spam-* fields are kept as {cfg.headers.upstream_prefix}Spam-*; "
        "safe only if every path into this server passes the trusted filter first (else senders can forge them)"
    )


_WARNINGS: tuple[Callable[[Config], str | None], ...] = (
    _warn_smtp_listen,
    _warn_milter_listen,
    _warn_http_listen,
    _warn_console_listen,
    _warn_milter_reply_timeout,
    _warn_metrics_listen,
    _warn_trainer_listen,
    _warn_redis_plaintext,
    _warn_reject,
    _warn_keep_upstream,
    lists_warning,  # allow_senders that any client (or no client) can claim
)


# --------------------------------------------------------------------------------------------
# Writing TOML, and the reference table for the README


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    # json's escapes are TOML's, except that TOML also wants DEL escaped
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _dump_table(obj: Any, where: Where, redact: bool, lines: list[str]) -> None:
    lines.append(f"[{'.'.join(where)}]")
    tables = []
    for f in fields(obj):
        kind: Kind = f.metadata["kind"]
        value = getattr(obj, f.name)
        if isinstance(kind, Section):
            tables.append((value, where + (f.name,)))  # TOML: sub-tables after the section's own keys
            continue
        shown = kind.dump(value)
        if redact and kind.secret:
            shown = kind.redact(shown)
        lines.append(f"{f.name} = {_toml_scalar(shown)}  # {f.metadata['doc']}")
    for value, sub in tables:
        lines.append("")
        _dump_table(value, sub, redact, lines)


def config_reference() -> str:
    """Every key with its default and meaning, as a Markdown table (the README's configuration reference)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for where in _all_keys(Config):
        f = _field_at(where)
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = _toml_scalar(f.metadata["kind"].dump(default)).replace("|", "\\|")
        doc = f.metadata["doc"].replace("|", "\\|")
        rows.append(f"| `{_label(where)}` | `{shown}` | {doc} |")
    return "\n".join(rows) + "\n"


def _field_at(where: Where) -> Any:
    cls: type = Config
    for part in where[:-1]:
        cls = {f.name: f for f in fields(cls)}[part].metadata["kind"].cls
    return {f.name: f for f in fields(cls)}[where[-1]]
