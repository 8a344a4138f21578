"""Who may use the console: loopback Host names without a password, HTTP Basic with one, and form posts only
from this console's own pages (same origin and a per-session token); see filterd.console."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import urllib.parse

from filterd.config import is_loopback
from filterd.console.render import COOKIE
from filterd.net.http import HttpError, Request, password_ok

_SESSION = re.compile(r"[A-Za-z0-9_-]{32,64}")


class Guard:
    """The checks every request passes (`check_host`, `check_password`) and every form post (`check_csrf`)."""

    def __init__(self, password: str) -> None:
        self._console_password = password.encode()
        self._secret = secrets.token_bytes(32)  # CSRF tokens die with the process: a restart asks for a reload

    def session(self, req: Request) -> tuple[str, bool]:
        for header in req.all("cookie"):
            for part in header.split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE and _SESSION.fullmatch(value):
                    return value, False
        return secrets.token_urlsafe(32), True

    def token(self, session: str) -> str:
        return hmac.new(self._secret, session.encode(), hashlib.sha256).hexdigest()

    def check_host(self, req: Request) -> None:
        if len(req.all("host")) > 1:
            raise HttpError(400, "more than one Host header")
        if self._console_password:
            return
        host = (req.header("host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if not (name == "localhost" or (name and is_ip(name) and is_loopback(name))):
            raise HttpError(403, f"Host {host[:80]!r} is not a loopback name; set [console] password to serve other names")

    def check_password(self, req: Request) -> None:
        if not self._console_password:
            return
        auth = req.header("authorization") or ""
        scheme, _, value = auth.partition(" ")
        given = b""
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except ValueError:
                given = b""
        if not password_ok(given, self._console_password):  # constant time: no guessing by timing
            raise HttpError(401, "password required" if not auth else "wrong password")

    def check_csrf(self, req: Request, session: str) -> None:
        """A form POST must come from a page of this console: same origin and this session's token."""
        own = f"http://{req.header('host') or ''}"
        origin = req.header("origin")
        if origin is None:  # older browsers: the Referer's origin
            referer = urllib.parse.urlsplit(req.header("referer") or "")
            origin = f"{referer.scheme}://{referer.netloc}" if referer.scheme else None
        if origin != own:
            raise HttpError(403, f"cross-site request refused (origin {str(origin)[:80]!r})")
        form = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"), keep_blank_values=True)
        if not hmac.compare_digest(form_value(form, "csrf").encode(), self.token(session).encode()):
            raise HttpError(403, "cross-site request refused (missing or wrong form token; reload the page)")


def form_value(q: dict[str, list[str]], key: str) -> str:
    values = q.get(key)
    return values[0] if values else ""


def is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
