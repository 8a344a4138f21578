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
from typing import Any, Awaitable, Callable, Protocol

from filterd.policy.decision import Decision, Message, Policy
from filterd.net.streams import (  # noqa: F401  (re-exported: the trainer's intake used to import them from here)
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    Entry,
    StreamConsumer,
    StreamSettings,
    sleep_or_stop,
    without_large_fields,
)

log = logging.getLogger("filterd.redis")


class Scorer(Protocol):
    """What the ingress needs from the batcher: a score for one message's text."""

    def __call__(self, text: str) -> Awaitable[Any]: ...  # -> Scored (score, model, threshold: 0.5 when absent)


@dataclass(frozen=True)
class Outcome:
    entry_id: bytes
    fields: dict[bytes, bytes]
    result: Any = None  # Scored, when the model scored it
    decision: Decision | None = None  # when classified (a listed entry has a decision and no result)
    error: str | None = None  # dead-letter reason, when the entry itself is bad
    failed: bool = False  # classification failed: leave pending, it is retried after claim_idle_ms
    seconds: float = 0.0
    explanation: Any = None  # filterd.model.explain.Explanation, when [explain] gave one


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

    def __init__(self, cfg: Any, consumer: str, score: Callable[[str], Awaitable[Any]], metrics: Any | None = None,
                 policy: Policy | None = None, explain: Any = None, **settings: Any) -> None:  # fmt: skip
        self.cfg = cfg
        self.consumer = consumer
        self.score = score
        self.explain = explain  # Daemon.explainer("redis"): async (text, decision, scored) -> Explanation | None
        self.metrics = metrics
        self.policy = policy or Policy.default()
        s = StreamSettings.from_config(cfg, stream=cfg.in_stream, group=cfg.group, name="redis", consumer=consumer, **settings)
        self.stream = StreamConsumer(s, self._handle, metrics)
        self.record: Callable[..., None] | None = None  # the verdict history ([history]), set by the daemon

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
        message = Message("redis")  # an entry carries no envelope: only [policy.redis] levels apply
        listed = self.policy.listed(message)
        if listed is not None:
            return Outcome(entry_id, fields, decision=listed, seconds=time.perf_counter() - t0)
        try:
            result = await self.score(text or "")
            decision = self.policy.decide(message, result.score, getattr(result, "threshold", 0.5))  # NaN: ValueError
        except Exception as e:  # the model failed: count it, keep the entry pending for a retry
            log.error("redis: classification of %s failed: %r", entry_id.decode(), e)
            return Outcome(entry_id, fields, failed=True, seconds=time.perf_counter() - t0)
        explanation = await self.explain(text or "", decision, result) if self.explain is not None else None
        if self.record is not None:
            self.record("redis", message, decision, result.model, ref=entry_id.decode(), text=text, explanation=explanation)
        return Outcome(
            entry_id, fields, result=result, decision=decision, seconds=time.perf_counter() - t0, explanation=explanation
        )

    async def _give_up_on_poison(self, outcomes: list[Outcome]) -> list[Outcome]:
        """A failed entry is retried (it stays pending) until delivered `max_deliveries` times, then dead-lettered."""
        client = self.stream.client
        assert client is not None
        out = []
        for o in outcomes:
            if o.failed:
                info = await client.xpending_range(self.cfg.in_stream, self.cfg.group, o.entry_id, o.entry_id, 1)
                if info and info[0]["times_delivered"] >= self.cfg.max_deliveries:
                    o = Outcome(o.entry_id, o.fields, error="classify-failed", seconds=o.seconds)
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
                model = o.result.model if o.result is not None else ""
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
        if self.metrics is None:
            return
        for o in outcomes:
            if o.error:  # a message that got no verdict: an error for the message count too
                self.metrics.dead_letters.labels(reason=o.error).inc()
                self.metrics.observe_result(source="redis", verdict="error", score=None, seconds=o.seconds)
            elif o.failed:
                self.metrics.observe_result(source="redis", verdict="error", score=None, seconds=o.seconds)
            elif o.decision is not None:
                d = o.decision
                self.metrics.observe_result(source="redis", verdict=d.verdict, score=d.score, seconds=o.seconds)
                self.metrics.count_action("redis", d.action)
