"""The spam decision: a score (or an allow/deny list entry) in, one `Decision` out, from `[policy]`.

Every door (SMTP content filter, milter, HTTP, Redis) asks the same question here and only turns
the answer into its own protocol's reply, so the same message gets the same decision through any
of them, up to what a door can physically do.

Levels (like SpamAssassin's required/kill scores and Rspamd's action table)
    tag <= subject <= quarantine <= discard <= reject, each at its own P(spam) or off. The spam
    threshold is `tag_score` (the verdict: spam at or above it); a message gets the highest level
    whose score it reaches (at a tie, the later one in that order). A level set below the spam
    threshold acts at the threshold: ham is never acted on. "model" means the scoring model's own
    threshold (filterd.json), known only once a model is loaded; "fpr:0.005" the threshold the
    model measured for flagging 0.5% of unseen ham (its operating points, filterd.json): a model
    without the point a level asks for is refused at load (`check_model`), the old one serving on.
Soft reject
    `soft_reject_score` opens a band from that score up to the next level above it: the door defers
    (4xx) and a sender that really is a mail server retries. Ties go to the other level.
Allow and deny lists
    Envelope sender (address, or domain and its subdomains) and recipients, case-insensitively.
    An allow-listed message is not scored (ham, `pass`); a deny-listed one is not scored either and
    gets the most severe level the door has. Allow wins over deny (an exception made on purpose, e.g.
    postmaster@ must receive complaints). A message is allow-listed by recipient only when every
    recipient is; one deny-listed recipient (a spam trap) is enough.
    Entries and addresses are compared in one form: the domain in A-labels (IDNA 2008 with the
    UTS #46 mapping, so "bücher.example" and "xn--bcher-kva.example" are one entry) and lower case,
    the local part as written but lower case. An entry that is not an address or a host name (an
    empty label, a label starting or ending with "-", "_", an address literal...) is a config
    error; an address from the wire that is malformed matches no entry.
Who may claim an allow-listed sender
    The envelope sender is whatever the SMTP client says. `allow_senders_require` makes an
    allow_senders entry count only for clients the MTA vouches for: "authenticated" (a SASL login,
    Rspamd's `authenticated`, Postfix's permit_sasl_authenticated), "trusted_networks" (the client's
    address is in `trusted_networks`, SpamAssassin's key and Rspamd's local_addrs), either
    ("authenticated_or_trusted_networks"), or "none" (anyone: the default, kept for compatibility;
    `check-config` warns). A sender that fails the requirement is not allow-listed, the message is
    scored (or deny-listed) as any other, and the Decision says why in one reason. Which login may use
    which sender is the MTA's business (Postfix smtpd_sender_login_maps). allow_recipients is not
    restricted: the MTA has accepted the recipients, the client cannot pick them to skip the filter.
Doors
    `[policy.<door>]` overrides any level for one door. A door uses only the levels it can carry
    out (`CAN`); a level it cannot is skipped there (the level below applies), and setting it in the
    door's own section is a config error. The after-queue SMTP filter takes `reject` only from
    `[policy.smtp]` (or the deprecated `[smtp] action = "reject"`): refusing after the queue makes
    Postfix bounce to a usually forged sender, so `[policy] reject_score` is for doors before the queue.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

# the shared vocabulary lives in levels.py and lists.py (filterd.config imports them without this module)
from filterd.errors import ModelError
from filterd.policy.levels import ACTIONS, CAN, LEVELS, OWN_ONLY, SOFT_REJECT, SOURCES, Level, fpr_target, level_key  # noqa: F401
from filterd.policy.lists import REQUIRE, Network, normalize_entry, parse_address, parse_network  # noqa: F401

if TYPE_CHECKING:
    from filterd.config import Config


@dataclass(frozen=True)
class Message:
    """What the door knows about a message besides its text."""

    source: str  # smtp | milter | http | redis
    sender: str = ""  # envelope sender (MAIL FROM), "" when none or unknown
    recipients: tuple[str, ...] = ()
    client_address: str = ""  # the SMTP client's IP address as the MTA saw it, "" when unknown
    authenticated: str = ""  # the client's SASL login name, "" when not authenticated

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")


@dataclass(frozen=True)
class Decision:
    verdict: str  # "spam" | "ham"
    action: str  # one of ACTIONS, already one the door can carry out
    score: float | None  # P(spam); None when a list decided without the model
    reasons: tuple[str, ...]  # why, for logs and replies
    threshold: float = 0.5  # the spam threshold (tag level) in effect
    listed: str = ""  # the list that decided without the model (allow_senders, deny_recipients, ...), else ""

    @property
    def spam(self) -> bool:
        return self.verdict == "spam"


def scaled_score(p: float, threshold: float, required: float) -> float:
    """P(spam) on an additive scale whose spam threshold is `required` (Rspamd's required_score for the
    HTTP door, SpamAssassin's required for [headers] style = "spamassassin"): [0, t] -> [0, R],
    [t, 1] -> [R, 2R], so score >= R exactly when p >= t, and every level keeps its order."""
    if p < threshold:
        return required * p / threshold
    return required * (2.0 if threshold >= 1.0 else 1.0 + (p - threshold) / (1.0 - threshold))


# --- lists ---------------------------------------------------------------------------


def _address(addr: str) -> str | None:
    """An envelope address from the wire in its compared form; None when empty or malformed."""
    a = addr.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    return parse_address(a) if "@" in a else None  # a bare domain is no envelope address


def _matches(addr: str, entries: frozenset[str]) -> str | None:
    """The entry matching an address (exactly, or by its domain or a parent domain), or None."""
    if not entries:  # most sites list nothing: no address to parse per message
        return None
    a = _address(addr)
    if a is None:
        return None
    if a in entries:
        return a
    labels = a.rpartition("@")[2].split(".")
    return next((d for i in range(len(labels)) if (d := ".".join(labels[i:])) in entries), None)


def _client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address as a door passes it: "192.0.2.1", "::1", "[::1]", Postfix's "IPv6:::1"."""
    a = text.strip()
    if a.startswith("[") and a.endswith("]"):
        a = a[1:-1]
    if a[:5].lower() == "ipv6:":
        a = a[5:]
    try:
        ip = ipaddress.ip_address(a)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # an IPv4 client on a dual-stack socket: 127.0.0.0/8 must cover it
    return ip


@dataclass(frozen=True)
class Lists:
    allow_senders: frozenset[str] = frozenset()
    allow_recipients: frozenset[str] = frozenset()
    deny_senders: frozenset[str] = frozenset()
    deny_recipients: frozenset[str] = frozenset()
    allow_senders_require: str = "none"  # one of REQUIRE
    trusted_networks: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        if self.allow_senders_require not in REQUIRE:
            raise ValueError(f"allow_senders_require must be one of {', '.join(REQUIRE)}, got {self.allow_senders_require!r}")

    @classmethod
    def of(cls, allow_senders_require: str = "none", trusted_networks: Sequence[str] = (), **lists: Sequence[str]) -> Lists:
        nets = tuple(parse_network(n) for n in trusted_networks)
        return cls(**{k: frozenset(normalize_entry(e) for e in v) for k, v in lists.items()},
                   allow_senders_require=allow_senders_require, trusted_networks=nets)  # fmt: skip

    def unmet(self, m: Message) -> str | None:
        """Why an allow-listed sender does not count for this client (allow_senders_require), or None."""
        require = self.allow_senders_require
        if require == "none" or (hit := _matches(m.sender, self.allow_senders)) is None:
            return None
        ip = _client_ip(m.client_address)
        authenticated = bool(m.authenticated)
        trusted = ip is not None and any(ip in net for net in self.trusted_networks)
        if require == "authenticated" and not authenticated:
            why = "not authenticated"
        elif require == "trusted_networks" and not trusted:
            why = f"client {ip} is not in trusted_networks" if ip else "the client address is unknown, not in trusted_networks"
        elif require == "authenticated_or_trusted_networks" and not (authenticated or trusted):
            why = "neither authenticated nor from trusted_networks"
        else:
            return None
        return f"sender {_address(m.sender)} is on allow_senders ({hit}) but {why}"

    def allowed(self, m: Message) -> str | None:
        """Why the message is allow-listed, or None."""
        hit = _matches(m.sender, self.allow_senders)
        if hit is not None and self.unmet(m) is None:
            return f"sender {_address(m.sender)} is on allow_senders ({hit})"
        hits = [_matches(r, self.allow_recipients) for r in m.recipients]
        if hits and all(h is not None for h in hits):
            return f"every recipient is on allow_recipients ({', '.join(sorted(set(h for h in hits if h)))})"
        return None

    def denied(self, m: Message) -> str | None:
        if (hit := _matches(m.sender, self.deny_senders)) is not None:
            return f"sender {_address(m.sender)} is on deny_senders ({hit})"
        for r in m.recipients:
            if (hit := _matches(r, self.deny_recipients)) is not None:
                return f"recipient {_address(r)} is on deny_recipients ({hit})"
        return None


# --- levels per door -----------------------------------------------------------------


def _set(value: Level) -> bool:
    return value not in ("off", "inherit")


def door_levels(cfg: Config, source: str) -> dict[str, tuple[Level, tuple[str, ...]]]:
    """The levels a door uses: action -> (value, the config key it came from), legacy keys mapped.

    Levels the door cannot carry out are left out; so are "off" ones. Raises nothing: conflicts and
    bad orders are `policy_problem`'s (config load) business.
    """
    p = cfg.policy
    own = getattr(p, source)
    out: dict[str, tuple[Level, tuple[str, ...]]] = {}
    for action in (SOFT_REJECT, *LEVELS):
        key = level_key(action)
        value, where = getattr(own, key), ("policy", source, key)
        if value == "inherit":
            if action in OWN_ONLY.get(source, ()):
                continue
            value, where = getattr(p, key), ("policy", key)
        if action == "tag" and value == "model" and cfg.model.threshold is not None:  # deprecated [model] threshold
            value, where = cfg.model.threshold, ("model", "threshold")
        if _set(value) and action in CAN[source]:
            out[action] = (value, where)
    legacy = cfg.smtp.action
    if source == "smtp" and legacy != "tag" and getattr(own, level_key(legacy)) == "inherit":  # deprecated [smtp] action
        out[legacy] = (out["tag"][0], ("smtp", "action"))  # spam (at the threshold) gets the action, as before
    return out


def policy_problem(cfg: Config) -> tuple[tuple[str, ...], str] | None:
    """(key to blame, why) for a [policy] that cannot work, or None. Run at config load."""
    p = cfg.policy
    if cfg.model.threshold is not None and p.tag_score != "model":
        return ("model", "threshold"), "deprecated, and [policy] tag_score is set too: keep only tag_score"
    legacy = cfg.smtp.action
    if legacy != "tag" and _set(getattr(p.smtp, level_key(legacy))):
        why = f"deprecated, and [policy.smtp] {level_key(legacy)} is set too: keep only the [policy.smtp] level"
        return ("smtp", "action"), why
    if p.tag_score == "off":
        return ("policy", "tag_score"), 'the spam threshold cannot be "off" (use "model" or a number)'
    for source in SOURCES:
        own = getattr(p, source)
        if own.tag_score == "off":
            return ("policy", source, "tag_score"), 'the spam threshold cannot be "off" (use "model" or a number)'
        for action in (SOFT_REJECT, *LEVELS):
            if _set(getattr(own, level_key(action))) and action not in CAN[source]:
                return ("policy", source, level_key(action)), _cannot(source, action)
        levels = door_levels(cfg, source)
        last: tuple[str, float, tuple[str, ...]] | None = None
        for action in LEVELS:
            value, where = levels.get(action, ("off", ()))
            if isinstance(value, str):
                continue  # off, or "model": known once a model is loaded (a level below the threshold acts at it)
            if last is not None and value < last[1]:
                return where, (f"{value:g} is below {_label(last[2])} ({last[1]:g}) for {source}: "
                               f"levels must rise {' <= '.join(LEVELS)}")  # fmt: skip
            last = (action, value, where)
    return None


def _label(where: tuple[str, ...]) -> str:
    return f"[{'.'.join(where[:-1])}] {where[-1]}"


def _cannot(source: str, action: str) -> str:
    if source == "smtp":
        return ("the after-queue SMTP filter cannot defer during the session (Postfix would retry the queued "
                "message with the same score); set it for milter or http")  # fmt: skip
    return f"{source} cannot {'defer' if action == SOFT_REJECT else 'refuse'} a message (nobody to answer); use discard_score"


# --- the decision --------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """One door's levels: action -> P(spam) or "model"."""

    source: str
    levels: Mapping[str, Level]

    def resolved(self, model_threshold: float, points: Mapping[float, float] | None = None) -> tuple[float, list[tuple[float, int, str]]]:
        """(spam threshold, [(score, rank, action)]) with "model" and "fpr:" filled in and spam levels clamped to
        the threshold. `points`: the model's operating points (ham-FPR target -> threshold); None before any
        score is known (a listed message), where an "fpr:" level reads as the model's threshold (a label only)."""

        def value(v: Level) -> float:
            if (target := fpr_target(v)) is not None:
                if points is None:
                    return model_threshold
                if target not in points:
                    raise ValueError(f"the model has no operating point for a ham FPR of {target:g}")
                return points[target]
            return model_threshold if v == "model" else float(v)

        threshold = value(self.levels["tag"])
        steps = []
        for rank, action in enumerate((SOFT_REJECT, *LEVELS)):
            if action in self.levels:
                v = value(self.levels[action])
                steps.append((v if action == SOFT_REJECT else max(v, threshold), rank, action))
        return threshold, steps

    def top(self) -> str:
        """The most severe level this door has (what a deny-listed message gets)."""
        return [a for a in LEVELS if a in self.levels][-1]


class Policy:
    """The compiled [policy]: a table per door plus the lists. `decide` is all a door needs."""

    def __init__(self, tables: Mapping[str, Table], lists: Lists = Lists()) -> None:
        self.tables = dict(tables)
        self.lists = lists

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        tables = {s: Table(s, {a: v for a, (v, _) in door_levels(cfg, s).items()}) for s in SOURCES}
        p = cfg.policy
        lists = Lists.of(allow_senders=p.allow_senders, allow_recipients=p.allow_recipients,
                         deny_senders=p.deny_senders, deny_recipients=p.deny_recipients,
                         allow_senders_require=p.allow_senders_require, trusted_networks=p.trusted_networks)  # fmt: skip
        return cls(tables, lists)

    @classmethod
    def default(cls) -> Policy:
        """Today's behaviour: spam at the model's threshold is tagged, nothing else."""
        return cls({s: Table(s, {"tag": "model"}) for s in SOURCES})

    def actions(self, source: str) -> frozenset[str]:
        """The actions a door can get from this policy (for priming metrics and config checks)."""
        return frozenset(("pass", *self.tables[source].levels))

    def targets(self) -> set[float]:
        """The ham-FPR targets ("fpr:" levels) any door's table asks the model for."""
        return {t for table in self.tables.values() for v in table.levels.values() if (t := fpr_target(v)) is not None}

    def check_model(self, points: Mapping[float, float], version: str) -> None:
        """ModelError when the model lacks an operating point an "fpr:" level needs (refused at load)."""
        if missing := sorted(self.targets() - set(points)):
            have = ", ".join(f"{t:g}" for t in sorted(points)) or "none"
            raise ModelError(f"model {version} has no operating point for [policy] level(s) "
                             f"{', '.join(f'fpr:{t:g}' for t in missing)} (it has: {have}); fit it again, or change the level")  # fmt: skip

    def listed(self, message: Message, model_threshold: float = 0.5) -> Decision | None:
        """The decision for an allow- or deny-listed message (the door skips the model), or None."""
        table = self.tables[message.source]
        threshold = table.resolved(model_threshold)[0]
        note = _note(self.lists.unmet(message))
        if why := self.lists.allowed(message):
            return Decision("ham", "pass", None, (why, "not scored", *note), threshold, _list_name(why))
        if why := self.lists.denied(message):
            return Decision("spam", table.top(), None, (why, "not scored", *note), threshold, _list_name(why))
        return None

    def decide(self, message: Message, score: float | None, model_threshold: float = 0.5,
               points: Mapping[float, float] | None = None) -> Decision:  # fmt: skip
        """The decision for a scored message (score None: only a list can decide; ValueError otherwise).
        `points`: the scoring model's operating points, for "fpr:" levels."""
        listed = self.listed(message, model_threshold)
        if listed is not None:
            return listed
        if score is None or math.isnan(score):
            raise ValueError("no score, and the message is on no list")
        threshold, steps = self.tables[message.source].resolved(model_threshold, {} if points is None else points)
        reached = [s for s in steps if score >= s[0]]
        verdict = "spam" if score >= threshold else "ham"
        note = _note(self.lists.unmet(message))  # an allow-listed sender this client may not claim: scored, and said so
        if not reached:
            return Decision(verdict, "pass", score, (f"score {score:.4f} < {threshold:.4f} (tag_score)", *note), threshold)
        at, _, action = max(reached)
        return Decision(verdict, action, score, (f"score {score:.4f} >= {at:.4f} ({level_key(action)})", *note), threshold)


def _note(why: str | None) -> tuple[str, ...]:
    return (why,) if why else ()


def _list_name(why: str) -> str:
    return next(w for w in why.split() if w.endswith(("_senders", "_recipients")))


def decide(message: Message, score: float | None, policy: Policy | None = None, model_threshold: float = 0.5) -> Decision:
    """`policy.decide` (default policy: tag at the model's threshold)."""
    return (policy or Policy.default()).decide(message, score, model_threshold)
