"""Redis Streams ingress: consumer group in, results out, acknowledged in one transaction.

Delivery is at-least-once. An entry is acknowledged in the same MULTI/EXEC that writes its
result (and route copy), so a crash between the two cannot lose it; at worst an entry that was
in flight is scored twice. Entries left pending by a dead consumer are claimed with XAUTOCLAIM
once they have been idle for `claim_idle_ms`. On (re)connect this consumer first re-reads its
own pending entries (id "0"), then new ones (">").
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


from ..config import redact_url

log = logging.getLogger("filterd.redis")

# Failures that mean "Redis is away": reconnect with backoff, the entries stay pending.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
# Entries read but not yet acknowledged, in units of COUNT. Reads are small when traffic trickles
# in, so many of them may wait in the batcher at once, which is what lets it build large batches.
# This bound keeps one consumer from taking the whole stream from the others in its group, and
# limits what a crash leaves to be scored again.
IN_FLIGHT_READS = 8


class Scorer(Protocol):
    """What the ingress needs from the batcher: a score for one message's text."""

    def __call__(self, text: str) -> Awaitable[Any]: ...  # -> Scored (score, verdict, model)


@dataclass(frozen=True)
class Outcome:
    entry_id: bytes
    fields: dict[bytes, bytes]
    result: Any = None  # Scored, when classified
    error: str | None = None  # dead-letter reason, when the entry itself is bad
    failed: bool = False  # classification failed: leave pending, it is retried after claim_idle_ms
    seconds: float = 0.0


def validate_entry(fields: dict[bytes, bytes], max_text_bytes: int) -> tuple[str | None, str | None]:
    """(text, None) for a good entry, (None, reason) for one that belongs in the dead-letter stream."""
    raw = fields.get(b"text")
    if raw is None:
        return None, "missing-text"
    if len(raw) > max_text_bytes:
        return None, "too-large"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "invalid-utf8"


class RedisIngress:
    """Reads `in_stream` as consumer `consumer` of `group` and writes results; see the module docstring."""

    def __init__(self, cfg: Any, consumer: str, score: Callable[[str], Awaitable[Any]], metrics: Any | None = None) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self.score = score
        self.metrics = metrics
        self.up = False  # for /healthz
        self._in_flight: set[asyncio.Task] = set()
        self._entries_in_flight = 0
        self._ids_in_flight: set[bytes] = set()  # never claimed back while being scored here
        self._room = asyncio.Condition()

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; then finish and acknowledge what is in flight."""
        backoff = BACKOFF_MIN_S
        while not stop.is_set():
            client = aioredis.from_url(self.cfg.url, socket_timeout=max(5.0, self.cfg.block_ms / 1000 + 5))
            try:
                await self._ensure_group(client)
                self.up, backoff = True, BACKOFF_MIN_S
                log.info("redis: connected to %s, group %s, consumer %s", redact_url(self.cfg.url), self.cfg.group, self.consumer)
                await self._serve(client, stop)
            except TRANSIENT as e:
                if self.up:
                    log.warning("redis: connection lost (%s); reconnecting", e)
                self.up = False
                await self._wait_in_flight()  # their writes fail too; the entries stay pending for us
                await sleep_or_stop(stop, backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                await self._wait_in_flight()
                self.up = False
                await client.aclose()

    async def _ensure_group(self, client: aioredis.Redis) -> None:
        # Start at "0": entries added before the group existed are processed, not skipped.
        try:
            await client.xgroup_create(self.cfg.in_stream, self.cfg.group, id="0", mkstream=True)
            log.info("redis: created group %s on %s", self.cfg.group, self.cfg.in_stream)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _serve(self, client: aioredis.Redis, stop: asyncio.Event) -> None:
        await self._own_pending(client)
        next_claim = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_claim:
                await self._claim_idle(client)
                next_claim = time.monotonic() + max(self.cfg.claim_idle_ms / 2000, 0.05)
            reply = await client.xreadgroup(
                self.cfg.group, self.consumer, {self.cfg.in_stream: ">"}, count=self.cfg.count, block=self.cfg.block_ms
            )
            if reply and reply[0][1]:
                await self._dispatch(client, reply[0][1])
        await self._wait_in_flight()

    async def _own_pending(self, client: aioredis.Redis) -> None:
        """Entries delivered to this consumer before a reconnect and never acknowledged: finish them."""
        cursor: bytes | str = "0"
        while True:
            reply = await client.xreadgroup(self.cfg.group, self.consumer, {self.cfg.in_stream: cursor}, count=self.cfg.count)
            entries = reply[0][1] if reply else []
            if not entries:
                break
            cursor = entries[-1][0]
            gone = [i for i, f in entries if not f]  # trimmed or deleted from the stream: nothing to score
            if gone:
                await client.xack(self.cfg.in_stream, self.cfg.group, *gone)
            await self._dispatch(client, [(i, f) for i, f in entries if f])
        await self._wait_in_flight()

    async def _claim_idle(self, client: aioredis.Redis) -> None:
        """Take over pending entries idle for too long: a dead consumer's, or our own that failed.

        Entries being scored here right now are skipped: claiming them would score them twice.
        """
        cfg = self.cfg
        pending = await client.xpending_range(cfg.in_stream, cfg.group, "-", "+", cfg.count, idle=cfg.claim_idle_ms)
        ids = [p["message_id"] for p in pending if p["message_id"] not in self._ids_in_flight]
        if not ids:
            return
        claimed = await client.xclaim(cfg.in_stream, cfg.group, self.consumer, cfg.claim_idle_ms, ids)
        claimed = [(i, f) for i, f in claimed if f]
        if claimed:
            log.info("redis: claimed %d idle pending entries", len(claimed))
            await self._dispatch(client, claimed)

    # -- one chunk of entries ---------------------------------------------------------------
    async def _dispatch(self, client: aioredis.Redis, entries: list) -> None:
        if not entries:
            return
        limit = IN_FLIGHT_READS * self.cfg.count
        async with self._room:  # backpressure: stop reading while enough entries are in flight
            await self._room.wait_for(lambda: self._entries_in_flight == 0 or self._entries_in_flight + len(entries) <= limit)
            self._entries_in_flight += len(entries)
            self._ids_in_flight.update(i for i, _ in entries)
        task = asyncio.create_task(self._process(client, entries))
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and task.exception() and not isinstance(task.exception(), TRANSIENT):
            log.error("redis: chunk failed: %r", task.exception())

    async def _wait_in_flight(self) -> None:
        if self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    async def _process(self, client: aioredis.Redis, entries: list) -> None:
        try:
            outcomes = await asyncio.gather(*(self._classify(entry_id, fields) for entry_id, fields in entries))
            await self._write(client, outcomes)
        finally:
            async with self._room:
                self._entries_in_flight -= len(entries)
                self._ids_in_flight.difference_update(i for i, _ in entries)
                self._room.notify_all()

    async def _classify(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Outcome:
        t0 = time.perf_counter()
        text, reason = validate_entry(fields, self.cfg.max_text_bytes)
        if reason:
            return Outcome(entry_id, fields, error=reason)
        try:
            result = await self.score(text or "")
        except Exception as e:  # the model failed: count it, keep the entry pending for a retry
            log.error("redis: classification of %s failed: %r", entry_id.decode(), e)
            return Outcome(entry_id, fields, failed=True, seconds=time.perf_counter() - t0)
        return Outcome(entry_id, fields, result=result, seconds=time.perf_counter() - t0)

    async def _give_up_on_poison(self, client: aioredis.Redis, outcomes: list[Outcome]) -> list[Outcome]:
        """A failed entry is retried (it stays pending) until delivered `max_deliveries` times, then dead-lettered."""
        out = []
        for o in outcomes:
            if o.failed:
                info = await client.xpending_range(self.cfg.in_stream, self.cfg.group, o.entry_id, o.entry_id, 1)
                if info and info[0]["times_delivered"] >= self.cfg.max_deliveries:
                    o = Outcome(o.entry_id, o.fields, error="classify-failed", seconds=o.seconds)
            out.append(o)
        return out

    async def _write(self, client: aioredis.Redis, outcomes: list[Outcome]) -> None:
        """Results, route copies, dead letters and acknowledgements in one MULTI/EXEC."""
        cfg = self.cfg
        if any(o.failed for o in outcomes):
            outcomes = await self._give_up_on_poison(client, outcomes)
        maxlen = {"maxlen": cfg.out_maxlen, "approximate": True} if cfg.out_maxlen else {}
        acked = [o for o in outcomes if not o.failed]
        async with client.pipeline(transaction=True) as tx:
            for o in acked:
                if o.error:
                    tx.xadd(cfg.dead_stream, {**o.fields, b"error": o.error.encode()}, **maxlen)
                    continue
                r = o.result
                score = f"{r.score:.6f}"
                tx.xadd(cfg.out_stream, {
                    b"id": o.fields.get(b"id", b""), b"entry": o.entry_id, b"verdict": r.verdict,
                    b"score": score, b"model": r.model, b"latency_ms": f"{o.seconds * 1000:.1f}",
                }, **maxlen)  # fmt: skip
                route = (cfg.routes or {}).get(r.verdict)
                if route:
                    tx.xadd(route, {**o.fields, b"verdict": r.verdict, b"score": score}, **maxlen)
            if acked:
                tx.xack(cfg.in_stream, cfg.group, *[o.entry_id for o in acked])
                await tx.execute()
        self._count(outcomes)

    def _count(self, outcomes: list[Outcome]) -> None:
        if self.metrics is None:
            return
        for o in outcomes:
            if o.error:  # a message that got no verdict: an error for the message count too
                self.metrics.dead_letters.labels(reason=o.error).inc()
                self.metrics.observe_result(source="redis", verdict="error", score=None, seconds=o.seconds)
            elif o.failed:
                self.metrics.observe_result(source="redis", verdict="error", score=None, seconds=o.seconds)
            else:
                self.metrics.observe_result(source="redis", verdict=o.result.verdict, score=o.result.score, seconds=o.seconds)


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, returning early when `stop` is set (backoff that does not delay shutdown)."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
