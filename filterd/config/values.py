"""Value types and their parsing: durations, host:port and unix:/path listen addresses, loopback
hosts, Redis URLs. Public: the CLIs and the doors use them too, outside any config file."""

from __future__ import annotations

import ipaddress
import math
import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

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
        path = text[len("unix:") :]
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
