"""The label intake: entries of the Redis label stream into the label store, none lost, none doubled.

Users and clients label messages by adding `label` (spam|ham) and `text` (UTF-8) or `email` (raw
RFC 822) to `[redis] label_stream`; an optional `id` is the client's own and is only carried into
logs and dead letters: the store keys messages by their text (see `filterd.store.labels.message_id`).

Delivery is at-least-once, with the store as the commit point. A chunk of entries is written to
the store in one SQLite transaction FIRST, and only then acknowledged: a kill -9 between the two
leaves the entries pending, they are delivered again, and adding a label the store already has
changes nothing. Bad entries (unknown label, no text, invalid UTF-8, empty text) are copied to
`[redis] dead_stream` with `error` and `stream` fields, in the same MULTI/EXEC as the XACK.

Reading, claiming, reconnecting and Redis errors are those of the daemon's ingress: both are handlers
on `filterd.net.streams.StreamConsumer` (the group is created from "0" if missing, a restarted consumer
finishes its own pending entries first, idle ones are claimed, Redis away means a reconnect with
backoff, an error retrying cannot fix ends the service with a one-line reason).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Any

from filterd.config import RedisConfig, TrainerConfig, redact_url
from filterd.errors import FilterdError
from filterd.mail.text import extract_text
from filterd.net.streams import Entry, StreamConsumer, StreamSettings, error_kind, one_line, without_large_fields

from trainer.data import LABELS
from filterd.store.labels import AddResult, LabelStore, NewLabel, StoreError

log = logging.getLogger("filterd.trainer")

SOURCE = "redis"  # the `source` of labels stored from the stream


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
        self.max_field_bytes = redis_cfg.max_text_bytes
        self.group = trainer_cfg.group
        over = {k: v for k, v in (("claim_idle_ms", claim_idle_ms), ("count", count), ("block_ms", block_ms)) if v}
        over["max_inflight"] = over.get("count", redis_cfg.count)  # one chunk at a time: the store has one writer
        settings = StreamSettings.from_config(redis_cfg, stream=self.stream, group=self.group, name="intake",
                                              consumer=consumer, **over)  # fmt: skip
        self.consumer = settings.consumer
        self.store = store
        self.metrics = metrics
        self._settings = settings
        self.reader = StreamConsumer(settings, self._handle, metrics)
        self._draining: StreamConsumer | None = None  # the one-shot reader of drain_once, while it runs

    @property
    def up(self) -> bool:
        """Connected and reading, for a health check."""
        return self.reader.up

    # -- the service -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Take in labels until `stop` is set (the chunks in hand are finished first); fatal errors raise StreamError."""
        await self.reader.run(stop)

    async def drain_once(self, timeout_s: float = 30.0) -> int:
        """Take in what is waiting now (own pending, idle claimable, new), for up to about `timeout_s`; entries handled.

        Raises IntakeUnavailable when Redis cannot be reached; what was handled before that is stored and acknowledged.
        """
        self._draining = StreamConsumer(self._settings, self._handle, self.metrics)  # a fresh one: its own deadline
        try:
            handled = await self._draining.drain_once(timeout_s)
        except (StoreError, FilterdError):
            raise
        except Exception as e:  # Redis away, refusing, or misconfigured: the labels stay in the stream
            kind = error_kind(e, "read")
            raise IntakeUnavailable(f"label stream {self.stream} at {redact_url(self.url)} ({kind}): {one_line(e)}") from e
        finally:
            self._draining = None
        log.info("intake: drained %d entries from %s", handled, self.stream)
        return handled

    # -- one chunk -----------------------------------------------------------------------------
    async def _handle(self, entries: list[Entry]) -> None:
        """Store the good entries, then dead-letter the bad ones and acknowledge all in one MULTI/EXEC."""
        parsed = [parse_entry(i, f) for i, f in entries if f]  # no fields: trimmed or deleted, just acknowledge
        good = [p for p in parsed if p.error is None]
        results: list[AddResult] = []
        if good:  # in a worker thread: a busy store must not stall the event loop
            results = await self._store(good)
        bad = [p for p in parsed if p.error is not None]

        def fill(tx: Any) -> None:
            for p in bad:
                fields = without_large_fields(p.fields, self.max_field_bytes)
                tx.xadd(self.dead_stream, {**fields, b"error": p.error.encode(), b"stream": self.stream.encode()},
                        **self.dead_maxlen)  # fmt: skip

        await (self._draining or self.reader).commit([i for i, _ in entries], fill)
        self._report(results, bad)

    async def _store(self, good: list[Parsed]) -> list[AddResult]:
        """The commit point. A busy or full store is retried with backoff by the service (the entries stay
        pending meanwhile); drain_once raises it."""
        items = [NewLabel(p.text, p.label, SOURCE) for p in good]
        backoff = 0.1
        while True:
            try:
                return await asyncio.to_thread(self.store.add_many, items)
            except StoreError as e:
                if self._draining is not None:  # drain_once: let the caller decide
                    raise
                log.warning("intake: label store: %s; retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

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
