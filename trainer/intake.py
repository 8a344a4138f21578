"""The label intake: entries of the Redis label stream into the label store, none lost, none doubled.

Users and clients label messages by adding `label` (spam|ham) and `text` (UTF-8) or `email` (raw
RFC 822) to `[redis] label_stream`; an optional `id` is the client's own and is only carried into
logs and dead letters: the store keys messages by their text (see `trainer.store.message_id`).

Delivery is at-least-once, with the store as the commit point. A chunk of entries is written to
the store in one SQLite transaction FIRST, and only then acknowledged: a kill -9 between the two
leaves the entries pending, they are delivered again, and adding a label the store already has
changes nothing. Bad entries (unknown label, no text, invalid UTF-8, empty text) are copied to
`[redis] dead_stream` with `error` and `stream` fields, in the same MULTI/EXEC as the XACK.

As in the daemon's ingress (`filterd.ingress.redis_streams`): the consumer group is created from
"0" if missing (labels added before the trainer first ran are not skipped), a (re)connected
consumer first finishes its own pending entries, then claims entries that other consumers left
idle for `claim_idle_ms` (XAUTOCLAIM), and Redis going away means reconnecting with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from filterd.config import RedisConfig, TrainerConfig, redact_url
from filterd.errors import FilterdError
from filterd.ingress.redis_streams import BACKOFF_MAX_S, BACKOFF_MIN_S, TRANSIENT, sleep_or_stop
from filterd.mail import extract_text

from .data import LABELS
from .store import AddResult, LabelStore, NewLabel, StoreError

log = logging.getLogger("filterd.trainer")

SOURCE = "redis"  # the `source` of labels stored from the stream
# Worth a retry: Redis away, or the store busy/full (the entries stay pending and come back).
RETRY = (*TRANSIENT, StoreError)

Entry = tuple[bytes, dict[bytes, bytes]]


class IntakeUnavailable(FilterdError):
    """Redis could not be reached for `drain_once`."""


@dataclass(frozen=True)
class Parsed:
    """One stream entry, read: a label and text to store, or the reason it is dead-lettered."""

    entry_id: bytes
    fields: dict[bytes, bytes]
    label: str = ""
    text: str = ""
    error: str | None = None


def parse_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Parsed:
    """Check one entry's fields. The label's case and surrounding blanks are ignored; `text` wins over `email`."""
    raw_label = fields.get(b"label")
    if raw_label is None:
        return Parsed(entry_id, fields, error="missing-label")
    label = raw_label.decode("utf-8", "replace").strip().lower()
    if label not in LABELS:
        return Parsed(entry_id, fields, error="unknown-label")
    if b"text" in fields:
        try:
            text = fields[b"text"].decode("utf-8")
        except UnicodeDecodeError:
            return Parsed(entry_id, fields, error="invalid-utf8")
    elif b"email" in fields:
        text = extract_text(fields[b"email"])  # never raises: malformed mail reads as its raw text
    else:
        return Parsed(entry_id, fields, error="missing-text")
    if not text.strip():
        return Parsed(entry_id, fields, error="empty-text")
    return Parsed(entry_id, fields, label=label, text=text)


class LabelIntake:
    """Consumer `consumer` of group `trainer_cfg.group` on `redis_cfg.label_stream`; see the module docstring."""

    def __init__(
        self,
        redis_cfg: RedisConfig,
        trainer_cfg: TrainerConfig,
        store: LabelStore,
        metrics: Any | None = None,
        consumer: str | None = None,
        *,
        claim_idle_ms: int | None = None,
        count: int | None = None,
        block_ms: int | None = None,
    ) -> None:
        self.url = redis_cfg.url
        self.stream = redis_cfg.label_stream
        self.dead_stream = redis_cfg.dead_stream
        self.dead_maxlen = {"maxlen": redis_cfg.out_maxlen, "approximate": True} if redis_cfg.out_maxlen else {}
        self.group = trainer_cfg.group
        self.consumer = consumer or redis_cfg.consumer_name()
        self.claim_idle_ms = redis_cfg.claim_idle_ms if claim_idle_ms is None else claim_idle_ms
        self.count = count or redis_cfg.count
        self.block_ms = block_ms or redis_cfg.block_ms
        self.store = store
        self.metrics = metrics
        self.up = False  # connected and reading, for a health check

    def _client(self, timeout_s: float) -> aioredis.Redis:
        return aioredis.from_url(self.url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 5.0))

    # -- the service -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Take in labels until `stop` is set (the chunk in hand is finished first)."""
        backoff = BACKOFF_MIN_S
        while not stop.is_set():
            client = self._client(max(5.0, self.block_ms / 1000 + 5))
            try:
                await self._ensure_group(client)
                self.up, backoff = True, BACKOFF_MIN_S
                log.info("intake: reading %s as %s/%s at %s", self.stream, self.group, self.consumer, redact_url(self.url))
                await self._serve(client, stop)
            except (*RETRY, ResponseError) as e:
                if isinstance(e, ResponseError) and "NOGROUP" not in str(e):
                    raise
                log.warning("intake: %s; retrying in %.1fs", _one_line(e), backoff)  # NOGROUP: stream deleted, recreate
                self.up = False
                await sleep_or_stop(stop, backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                self.up = False
                await client.aclose()

    async def _serve(self, client: aioredis.Redis, stop: asyncio.Event) -> None:
        await self._own_pending(client)
        next_claim = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_claim:
                await self._claim_idle(client)
                next_claim = time.monotonic() + max(self.claim_idle_ms / 2000, 0.05)
            reply = await client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.count, block=self.block_ms)
            await self._handle(client, _entries(reply))

    async def drain_once(self, timeout_s: float = 30.0) -> int:
        """Take in what is waiting now (own pending, idle claimable, new), for up to about `timeout_s`; entries handled.

        Raises IntakeUnavailable when Redis cannot be reached; what was handled before that is stored and acknowledged.
        """
        deadline = time.monotonic() + timeout_s
        client = self._client(max(timeout_s, 1.0))
        try:
            await self._ensure_group(client)
            handled = await self._own_pending(client, deadline)
            handled += await self._claim_idle(client, deadline)
            while time.monotonic() < deadline:
                entries = _entries(await client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.count))
                if not entries:
                    break
                handled += await self._handle(client, entries)
        except TRANSIENT as e:
            raise IntakeUnavailable(f"label stream at {redact_url(self.url)}: {_one_line(e)}") from e
        finally:
            await client.aclose()
        log.info("intake: drained %d entries from %s", handled, self.stream)
        return handled

    # -- reading -----------------------------------------------------------------------------
    async def _ensure_group(self, client: aioredis.Redis) -> None:
        try:
            await client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("intake: created group %s on %s", self.group, self.stream)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _own_pending(self, client: aioredis.Redis, deadline: float | None = None) -> int:
        """Entries delivered to this consumer before a crash or reconnect and never acknowledged."""
        cursor: bytes | str = "0"
        handled = 0
        while deadline is None or time.monotonic() < deadline:
            reply = await client.xreadgroup(self.group, self.consumer, {self.stream: cursor}, count=self.count)
            entries = reply[0][1] if reply else []
            if not entries:
                break
            cursor = entries[-1][0]
            handled += await self._handle(client, entries)
        if handled:
            log.info("intake: finished %d own pending entries", handled)
        return handled

    async def _claim_idle(self, client: aioredis.Redis, deadline: float | None = None) -> int:
        """Take over entries another consumer (a dead one, usually) left pending for `claim_idle_ms`."""
        start: bytes | str = "0-0"
        handled = 0
        while deadline is None or time.monotonic() < deadline:
            reply = await client.xautoclaim(
                self.stream, self.group, self.consumer, self.claim_idle_ms, start_id=start, count=self.count
            )
            start = reply[0]  # Redis 7 adds a third element: ids of deleted entries, already dropped from the PEL
            claimed = [(i, f) for i, f in reply[1] if i is not None]  # Redis 6.2 lists deleted entries as nil
            if claimed:
                log.info("intake: claimed %d idle entries", len(claimed))
                handled += await self._handle(client, claimed)
            if start in (b"0-0", "0-0"):
                break
        return handled

    # -- one chunk -----------------------------------------------------------------------------
    async def _handle(self, client: aioredis.Redis, entries: list) -> int:
        """Store the good entries, then dead-letter the bad ones and acknowledge all in one MULTI/EXEC."""
        if not entries:
            return 0
        parsed = [parse_entry(i, f) for i, f in entries if f]  # no fields: trimmed or deleted, just acknowledge
        good = [p for p in parsed if p.error is None]
        results: list[AddResult] = []
        if good:  # in a worker thread: a busy store must not stall the event loop
            results = await asyncio.to_thread(self.store.add_many, [NewLabel(p.text, p.label, SOURCE) for p in good])
        bad = [p for p in parsed if p.error is not None]
        async with client.pipeline(transaction=True) as tx:
            for p in bad:
                tx.xadd(
                    self.dead_stream,
                    {**p.fields, b"error": p.error.encode(), b"stream": self.stream.encode()},
                    **self.dead_maxlen,
                )
            tx.xack(self.stream, self.group, *[i for i, _ in entries])
            await tx.execute()
        self._report(results, bad)
        return len(entries)

    def _report(self, results: list[AddResult], bad: list[Parsed]) -> None:
        for p in bad:
            client_id = p.fields.get(b"id", b"").decode("utf-8", "replace")
            log.warning(
                "intake: dead-lettered %s%s: %s", p.entry_id.decode(), f" (id {client_id!r})" if client_id else "", p.error
            )
        if results:
            new, flipped = sum(r.new for r in results), sum(r.flipped for r in results)
            log.info("intake: stored %d labels (%d new, %d relabelled, %d unchanged)",
                     len(results), new, flipped, len(results) - new - flipped)  # fmt: skip
        if self.metrics is not None:
            for label, n in collections.Counter(r.label for r in results).items():
                self.metrics.count_label(label, n)


def _entries(reply: Any) -> list[Entry]:
    return reply[0][1] if reply else []


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]
