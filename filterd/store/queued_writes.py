"""Rows queued on the event loop, written in batches from a worker thread: the verdict history and the
reservoir both record something for every message, and neither may ever delay or fail a message.

`put` never blocks (a full queue drops the row and counts it); `run` writes batches until `stop`;
`close` writes what is still queued, then closes the store. A failed write drops that batch, is
counted and logged at most once a minute, and never reaches mail or SMS handling.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger("filterd")

Row = TypeVar("Row")
BATCH_MAX = 500  # rows per write transaction
ERROR_LOG_EVERY_S = 60.0


class QueuedWriter(Generic[Row]):
    """`write(batch)` and `close_store()` run in a worker thread; `dropped` is a counter with a
    `reason` label (queue-full | write-error), `written` a plain counter; `failed` formats the log line of a
    failed write from the batch size (e.g. "history: write failed, %d verdicts not recorded")."""

    def __init__(self, write: Callable[[list[Row]], object], close_store: Callable[[], None], *, dropped: Any,
                 written: Any, max_queue: int, failed: str) -> None:  # fmt: skip
        self._write_batch, self._close_store = write, close_store
        self.dropped, self.written, self.failed = dropped, written, failed
        self._queue: asyncio.Queue[Row] = asyncio.Queue(max_queue)
        self._last_error_log = -math.inf
        self._errors_unlogged = 0
        for reason in ("queue-full", "write-error"):  # zero-valued series from the first scrape
            dropped.labels(reason)

    def put(self, row: Row) -> None:
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped.labels("queue-full").inc()

    async def run(self, stop: asyncio.Event) -> None:
        """Write batches until `stop` (supervised: an exception here is a bug and ends the process)."""
        while not stop.is_set():
            getter = asyncio.ensure_future(self._queue.get())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({getter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not getter.done():
                getter.cancel()
                return
            await self._write([getter.result(), *self._take(BATCH_MAX - 1)])

    async def close(self) -> None:
        """After the doors have finished: write what is still queued, then close the store."""
        while batch := self._take(BATCH_MAX):
            await self._write(batch)
        await asyncio.to_thread(self._close_store)

    def _take(self, n: int) -> list[Row]:
        batch = []
        while len(batch) < n and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _write(self, batch: list[Row]) -> None:
        try:
            await asyncio.to_thread(self._write_batch, batch)
        except Exception as e:  # disk full, file deleted under us, locked for too long: a batch is lost
            self.dropped.labels("write-error").inc(len(batch))
            now = time.monotonic()
            if now - self._last_error_log >= ERROR_LOG_EVERY_S:
                more = f" ({self._errors_unlogged} more failed writes since the last report)" if self._errors_unlogged else ""
                log.error("%s: %s%s", self.failed % len(batch), " ".join(str(e).split()), more)
                self._last_error_log, self._errors_unlogged = now, 0
            else:
                self._errors_unlogged += 1
            return
        self.written.inc(len(batch))
