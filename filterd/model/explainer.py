"""The daemon's explanations ([explain]): one worker thread beside the batcher, bounded, with a deadline.

The message path asks after it has a door's decision: `await explainer.explain(door, text, decision)` gives
an `Explanation` or None. None when [explain] does not ask for this verdict, or when the
message would have to wait: scoring is behind (more than a full batch, `[batching] max_batch_size`,
waiting for the batcher: under a flood every message goes unexplained rather than hold its door's
in-flight window), `max_queue` messages already waiting or being explained, or no result within `deadline` (the thread's work is not interrupted, but its result is dropped and a message
still queued when its deadline passed is skipped unexplained). Every skip is counted in
`filterd_explanations_total{outcome}`; mail is never held longer than `deadline` for an explanation.

The batcher is not slowed more than the CPU must be shared: explanations run on their own thread
(never the batcher's), one message at a time, and that thread (with the torch/OpenMP threads it
starts, which inherit it) runs at `nice` (10 by default), so the kernel gives scoring the CPU first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from filterd.model.explain import Explanation, explain

log = logging.getLogger("filterd")

OUTCOMES = ("explained", "busy", "queue-full", "deadline", "error")  # filterd_explanations_total{outcome}


class Explainer:
    """Explanations for the daemon's doors (see the module docstring); `engine()` gives the live model."""

    def __init__(self, cfg: Any, engine: Callable[[], Any], metrics: Any | None = None,
                 backlog: Callable[[], int] | None = None, max_backlog: int = 64) -> None:  # fmt: skip
        self.cfg = cfg
        self.engine = engine
        self.metrics = metrics
        self.backlog = backlog  # messages waiting for the batcher
        self.max_backlog = max_backlog
        self.pending = 0  # waiting or being explained
        self._pool: ThreadPoolExecutor | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled != "off"

    def wants(self, decision: Any) -> bool:
        """Whether this decision gets an explanation: scored by the model (not listed), and spam unless `all`."""
        if decision is None or getattr(decision, "score", None) is None or self.cfg.enabled == "off":
            return False
        return self.cfg.enabled == "all" or decision.verdict == "spam"

    async def on_demand(self, source: str, text: str) -> Explanation | None:
        """An explanation someone asked for (the console's /classify), whatever [explain] enabled says, within the
        same bounds as the doors' (the backlog, `max_queue`, `deadline`, one thread at `nice`)."""
        return await self._bounded(source, text)

    async def explain(self, source: str, text: str, decision: Any) -> Explanation | None:
        if not self.wants(decision):
            return None
        return await self._bounded(source, text)

    async def _bounded(self, source: str, text: str) -> Explanation | None:
        if self.backlog is not None and self.backlog() > self.max_backlog:  # scoring is behind: CPU to it, not to us
            return self._skip(source, "busy")
        if self.pending >= self.cfg.max_queue:
            return self._skip(source, "queue-full")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="filterd-explain", initializer=self._lower_priority)
        self.pending += 1
        deadline = time.monotonic() + self.cfg.deadline
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._run, text, deadline)
        future.add_done_callback(self._done)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout=self.cfg.deadline)
        except TimeoutError:
            return self._skip(source, "deadline")
        except Exception as e:  # a failed explanation never fails the message
            log.error("explain: %s message: %r", source, e)
            return self._skip(source, "error")
        if result is None:
            return self._skip(source, "deadline")
        explanation, seconds = result
        if self.metrics is not None:
            self.metrics.explanations.labels(source, "explained").inc()
            self.metrics.explain_seconds.observe(seconds)
        return explanation

    def _done(self, _: Any) -> None:
        self.pending -= 1

    def _run(self, text: str, deadline: float) -> tuple[Explanation, float] | None:
        if time.monotonic() >= deadline:  # waited its whole deadline in the queue: the message has gone on
            return None
        t0 = time.perf_counter()
        e = explain(self.engine(), text, top=self.cfg.top_words, method=self.cfg.method)
        return e, time.perf_counter() - t0

    def _lower_priority(self) -> None:
        try:  # Linux: niceness is per thread, and threads this one starts (torch's) inherit it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.cfg.nice)
        except OSError as e:
            log.warning("explain: cannot lower the explaining thread's priority: %s", e)

    def _skip(self, source: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.explanations.labels(source, outcome).inc()
        return None

    def prime(self, sources: list[str]) -> None:
        if self.metrics is not None and self.enabled:
            for source in sources:
                for outcome in OUTCOMES:
                    self.metrics.explanations.labels(source, outcome)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
