"""The sections of the doors and of the header fields two of them write: [redis] (with
[redis.routes]), [smtp], [milter], [http], [headers]. The doors themselves are filterd/doors/."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from filterd.config.kinds import (
    Address,
    Bool,
    Choice,
    Duration,
    Int,
    Listen,
    Number,
    Password,
    RedisUrl,
    Text,
    _key,
    _section,
    _stream,
)
from filterd.config.values import HostPort, UnixSocket, parse_hostport, parse_listen
from filterd.policy.levels import LEVELS as SPAM_LEVELS

ACTIONS = SPAM_LEVELS  # [smtp] action (deprecated): one level at the spam threshold
ON_ERROR = ("accept", "tempfail")


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
        "tag",
        Choice(options=ACTIONS),
        "deprecated, use [policy.smtp] levels: what spam gets: tag | subject | quarantine | discard | reject",
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


@dataclass(frozen=True)
class MilterConfig:
    """[milter]: the before-queue milter (Postfix smtpd_milters); see filterd/doors/milter/."""

    enabled: bool = _key(False, Bool(), "serve the milter protocol (Postfix smtpd_milters / non_smtpd_milters)")
    listen: HostPort | UnixSocket = _key(parse_listen("127.0.0.1:11332"), Listen(), "host:port or unix:/path the MTA connects to")
    socket_mode: str = _key(
        "0660", Text("an octal file mode such as 0660", allow_empty=False, pattern=r"0?[0-7]{3}"),
        "permissions of a unix:/path socket (the MTA's user must be able to write it)",
    )  # fmt: skip
    max_message_bytes: int = _key(
        1048576,
        Int(1024),
        "headers + body kept per message for classification; past it the MTA skips the rest (mail is still delivered whole)",
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
    listen: HostPort = _key(
        parse_hostport("127.0.0.1:11333"), Address(), "host:port of the scan API; off loopback it needs a password"
    )
    password: str = _key(
        "", Password(), "required in a Password request header when set (401 without, 403 wrong); mandatory off loopback"
    )
    max_body_bytes: int = _key(10485760, Int(1024), "largest request body (a whole message); larger gets 413")
    read_timeout: float = _key(30.0, Duration(), "a request's head and body must arrive within this; else 408")
    idle_timeout: float = _key(60.0, Duration(), "a keep-alive connection silent this long is closed")
    reply_timeout: float = _key(
        60.0, Duration(), "request read to verdict (waits for the model at start, then the batch); else 503"
    )
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
        False,
        Bool(),
        "rename incoming X-Spam-* fields (trusted upstream filter) instead of deleting them; only if every path passes it",
    )
    upstream_prefix: str = _key(
        "X-Upstream-",
        # never one of our namespaces: a renamed field would be ours again (and deleted, or trusted)
        Text("a header name prefix (printable ASCII, no colon), not X- and not starting X-Spam- or X-Filterd-", allow_empty=False,
             pattern=r"(?i)(?!x-spam-|x-filterd-|x-$)[!-9;-~]+"),
        "keep_upstream: X-Spam-Status becomes <prefix>Spam-Status",
    )  # fmt: skip
