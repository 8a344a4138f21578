"""How an allow/deny list entry and a trusted network are written and compared (filterd.config checks the keys
with these, filterd.policy.decision matches with them): addresses and domains in one form, domains as IDNA 2008
A-labels in lower case, the local part lower-cased; anything malformed is refused, not guessed at.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna

REQUIRE = ("none", "authenticated", "trusted_networks", "authenticated_or_trusted_networks")  # allow_senders_require

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # a host name label (LDH), after IDNA
_SPECIALS = re.compile(r'[<>()\[\]\\,;:"@]')  # not in a local part outside quotes; quoted local parts are not supported


@functools.lru_cache(maxsize=4096)  # senders' domains repeat, and idna is pure Python
def _domain(text: str) -> str | None:
    """A domain in A-labels, lower case, without the root's dot; None if it is not a host name."""
    d = text[:-1] if text.endswith(".") else text  # one trailing dot: the DNS root, the same name
    try:
        if d.isascii():
            d = d.lower()
            for label in d.split("."):
                if label.startswith("xn--") and idna.alabel(idna.ulabel(label)) != label.encode():
                    return None  # an A-label must decode to a valid U-label and back to itself, or it names nothing
        else:
            # IDNA 2008 with UTS #46 mapping (case folding, full-width dots), as browsers and MTAs
            # with SMTPUTF8 do. Python's own "idna" codec is IDNA 2003: it maps ß to "ss" and ς to
            # "σ", so faß.example would become fass.example, another domain since 2008.
            d = idna.encode(d, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None
    labels = d.split(".")
    if len(d) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return d


def parse_address(text: str) -> str | None:
    """An address ("local@domain") or a domain in its one compared form, or None if malformed."""
    if not text or not text.isprintable() or " " in text:  # isprintable: no controls, no space but " " itself
        return None
    local, at, domain = text.rpartition("@")
    if at and (not local or _SPECIALS.search(local)):
        return None
    if len(domain) > 1024:  # no host name is this long (253 octets as A-labels): keep wire junk out of the cache
        return None
    d = _domain(domain)
    if d is None:
        return None
    return f"{local.lower()}@{d}" if at else d


def normalize_entry(entry: str) -> str:
    """A list entry as matched: "user@example.com", "example.com" ("@example.com" is the domain);
    domains in A-labels, all lower case. ValueError naming the entry if it is not an address or domain."""
    e = entry.strip()
    parsed = parse_address(e[1:] if e.startswith("@") else e)
    if parsed is None:
        raise ValueError(f"not an address or domain: {entry!r}")
    return parsed


def parse_network(text: str) -> Network:
    """A trusted_networks entry ("192.0.2.0/24", "::1" = "::1/128"); ValueError naming it if it is not a network."""
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError:
        pass
    try:  # the usual typo: an address with the prefix length of its network
        loose = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not a network: {text!r} (use CIDR, e.g. 192.0.2.0/24 or 2001:db8::/32)") from None
    raise ValueError(f"not a network: {text!r} (host bits set: {loose}?)")
