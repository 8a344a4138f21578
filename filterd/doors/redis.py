"""Redis Streams ingress: the daemon's handler on a `filterd.net.streams.StreamConsumer`.

Each chunk the consumer reads is scored (every entry waits for its batch), then its results, route
copies and dead letters are written and the chunk acknowledged in one MULTI/EXEC (`commit`): a
crash between the two cannot lose an entry, at worst one that was in flight is scored twice. How
entries are read, claimed, kept from other consumers and bounded, and what a Redis error does, is
the consumer's business (see filterd/net/streams.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from filterd.doors.path import Inbound, MessagePath, Scan
from filterd.policy.decision import Decision
from filterd.net.streams import Entry, StreamConsumer, StreamSettings, without_large_fields

log = logging.getLogger("filterd.redis")


@dataclass(frozen=True)
class Outcome:
    entry_id: bytes
    fields: dict[bytes, bytes]
    error: str | None = None  # dead-letter reason, when the entry itself is bad
    failed: bool = False  # classification failed: leave pending, it is retried after claim_idle_ms
    seconds: float = 0.0
    scan: Scan | None = None  # the message path's result, when the entry was valid

    @property
    def decision(self) -> Decision | None:
        """The decision, when classified (by the model or a list)."""
        return self.scan.decision if self.scan is not None and not self.failed and not self.error else None

    @property
    def explanation(self) -> Any:
        """filterd.model.explain.Explanation, when [explain] gave one."""
        return self.scan.explanation if self.scan is not None else None


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
    """Scores `in_stream` as consumer `consumer` of `group` and writes results; see the module docstring."""

    def __init__(self, cfg: Any, consumer: str, path: MessagePath, metrics: Any | None = None, **settings: Any) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self.path = path
        self.metrics = metrics
        s = StreamSettings.from_config(cfg, stream=cfg.in_stream, group=cfg.group, name="redis", consumer=consumer, **settings)
        self.stream = StreamConsumer(s, self._handle, metrics)

    @property
    def up(self) -> bool:
        return self.stream.up

    @property
    def reason(self) -> str:
        return self.stream.reason

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; then finish and acknowledge what is in flight. Fatal errors raise StreamError."""
        await self.stream.run(stop)

    async def _handle(self, entries: list[Entry]) -> None:
        outcomes = await asyncio.gather(*(self._classify(entry_id, fields) for entry_id, fields in entries))
        await self._write(list(outcomes))

    async def _classify(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Outcome:
        t0 = time.perf_counter()
        text, reason = validate_entry(fields, self.cfg.max_text_bytes)
        if reason:
            return Outcome(entry_id, fields, error=reason)
        # An entry carries no envelope: only [policy.redis] levels apply. A full batcher queue is waited for
        # (the consumer simply reads more slowly); a failure leaves the entry pending for a retry.
        scan = await self.path.scan(Inbound("redis", text=text or "", ref=entry_id.decode()), wait_when_full=True)
        seconds = time.perf_counter() - t0
        if scan.decision is None:
            return Outcome(entry_id, fields, failed=True, seconds=seconds, scan=scan)
        return Outcome(entry_id, fields, seconds=seconds, scan=scan)

    async def _give_up_on_poison(self, outcomes: list[Outcome]) -> list[Outcome]:
        """A failed entry is retried (it stays pending) until delivered `max_deliveries` times, then dead-lettered."""
        client = self.stream.client
        assert client is not None
        out = []
        for o in outcomes:
            if o.failed:
                info = await client.xpending_range(self.cfg.in_stream, self.cfg.group, o.entry_id, o.entry_id, 1)
                if info and info[0]["times_delivered"] >= self.cfg.max_deliveries:
                    o = Outcome(o.entry_id, o.fields, error="classify-failed", seconds=o.seconds, scan=o.scan)
            out.append(o)
        return out

    async def _write(self, outcomes: list[Outcome]) -> None:
        """Results, route copies, dead letters and acknowledgements in one MULTI/EXEC."""
        cfg = self.cfg
        if any(o.failed for o in outcomes):
            outcomes = await self._give_up_on_poison(outcomes)
        maxlen = {"maxlen": cfg.out_maxlen, "approximate": True} if cfg.out_maxlen else {}
        acked = [o for o in outcomes if not o.failed]

        def fill(tx: Any) -> None:
            for o in acked:
                if o.error:  # every field kept, but an oversized one only as its size
                    tx.xadd(cfg.dead_stream, {**without_large_fields(o.fields, cfg.max_text_bytes), b"error": o.error.encode()},
                            **maxlen)  # fmt: skip
                    continue
                d = o.decision
                assert d is not None
                score = "" if d.score is None else f"{d.score:.6f}"  # "": a list decided, the model was not asked
                model = o.scan.model if o.scan is not None else ""
                result = {
                    b"id": o.fields.get(b"id", b""), b"entry": o.entry_id, b"verdict": d.verdict,
                    b"score": score, b"model": model, b"latency_ms": f"{o.seconds * 1000:.1f}", b"action": d.action,
                }  # fmt: skip
                if o.explanation is not None:  # [explain]: the words as JSON (filterd.model.explain.Explanation.to_json)
                    result[b"explanation"] = json.dumps(o.explanation.to_json(), ensure_ascii=False)
                tx.xadd(cfg.out_stream, result, **maxlen)
                route = (cfg.routes or {}).get(d.verdict)
                if route:
                    tx.xadd(route, {**o.fields, b"verdict": d.verdict, b"score": score, b"action": d.action}, **maxlen)

        if acked:
            await self.stream.commit([o.entry_id for o in acked], fill)
        self._count(outcomes)

    def _count(self, outcomes: list[Outcome]) -> None:
        """After the commit: the message path's action count and history for each decided entry, and the
        dead letters' metrics (the path counted every verdict and failure already; a bad entry never reached it)."""
        for o in outcomes:
            if o.error and self.metrics is not None:
                self.metrics.dead_letters.labels(reason=o.error).inc()
                if o.scan is None:  # a message that got no verdict: an error for the message count too
                    self.metrics.observe_result(source="redis", verdict="error", score=None, seconds=o.seconds)
            elif not o.failed and o.scan is not None and o.decision is not None:
                self.path.done(o.scan, o.decision.action, log_line=False)
