"""Checks across keys (what `check_config` refuses), warnings (valid, but worth a second look) and
deprecations. Each check reads a whole `Config`; a refusal names the one key to blame.

[policy]'s own checks (`policy_problem`) and the levels a door ends up with (`door_levels`) read a
whole Config too, so they live with the decision in filterd/policy/decision.py, which imports
Config for its types. They are imported here when a check runs, never when filterd.config is
imported: the config package knows [policy]'s words (filterd/policy/levels.py), not its code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from filterd.config.kinds import Where, _label, _toml_scalar
from filterd.config.values import HostPort, format_duration, is_loopback
from filterd.policy.levels import level_key

if TYPE_CHECKING:
    from filterd.config.sections import Config

Problem = tuple[Where, str] | None


def first_problem(cfg: Config) -> Problem:
    """(the key to blame, why) for the first check across keys that fails, or None."""
    for check in _CROSS_CHECKS:
        if problem := check(cfg):
            return problem
    return None


def warnings(cfg: Config) -> list[str]:
    """Risky but valid settings (non-loopback listeners, plaintext remote Redis...), one line each."""
    return [w for check in _WARNINGS if (w := check(cfg))]


def deprecations(cfg: Config) -> list[str]:
    """One line per deprecated key set in the file or a --set (it still works, mapped onto [policy])."""
    explicit = getattr(cfg, "_explicit", frozenset())  # set by the loader: which keys the user wrote
    out = []
    if ("model", "threshold") in explicit:
        value = "model" if cfg.model.threshold is None else cfg.model.threshold
        out.append(f"[model] threshold is deprecated: set [policy] tag_score = {_toml_scalar(value)} instead")
    if ("smtp", "action") in explicit:
        a = cfg.smtp.action
        at = _toml_scalar(_door_levels(cfg, "smtp")["tag"][0])  # the spam threshold it acted at
        hint = "tag is the default" if a == "tag" else f"[policy.smtp] {level_key(a)} = {at} does the same"
        out.append(f"[smtp] action is deprecated: remove it ({hint}); see the README's Policy section")
    return out


def _door_levels(cfg: Config, source: str) -> dict[str, Any]:
    from filterd.policy.decision import door_levels

    return door_levels(cfg, source)


def _check_policy(cfg: Config) -> Problem:
    """Levels in order, what each door can do, old and new keys not both."""
    from filterd.policy.decision import policy_problem

    return policy_problem(cfg)


# --------------------------------------------------------------------------------------------
# Checks across keys: each returns (the key to blame, why) or None


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
    if not cfg.smtp.enabled or cfg.smtp.quarantine_rcpt or "quarantine" not in _door_levels(cfg, "smtp"):
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
    _check_policy,  # levels in order, what each door can do, old and new keys not both
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
    if not cfg.smtp.enabled or "reject" not in _door_levels(cfg, "smtp"):
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


def _warn_allow_senders(cfg: Config) -> str | None:
    """A [policy] allow_senders that any client can claim, or that no client can ."""
    p = cfg.policy
    if not p.allow_senders:
        return None
    if p.allow_senders_require == "none":
        return ('[policy] allow_senders with allow_senders_require = "none": any SMTP client can forge an allow-listed '
                'envelope sender and skip the filter; set allow_senders_require = "authenticated", "trusted_networks" '
                'or "authenticated_or_trusted_networks"')  # fmt: skip
    if p.allow_senders_require == "trusted_networks" and not p.trusted_networks:
        return '[policy] allow_senders_require = "trusted_networks" but trusted_networks is empty: no sender is allow-listed'
    return None


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
    _warn_allow_senders,  # allow_senders that any client (or no client) can claim
)
