"""Micro-batching: one asyncio batcher shared by every ingress (SMTP, Redis) in front of one engine.

Callers hand in token lists and each gets its own `Scored` back. The batcher gathers messages that
arrive close together into one forward pass, which runs in a single dedicated worker thread so the
event loop never blocks on torch.

When a batch closes
    - it holds `max_batch_size` messages, or
    - adding one more waiting message would exceed `max_batch_tokens` padded tokens (messages x longest), or
    - `max_wait_ms` have passed since the oldest waiting message arrived, or
    - `stop()` is draining (no more waiting).
  A message longer than the whole token budget still goes, alone: nothing is ever stuck.

Which messages go in it (`plan_batch`)
    Padding is what grouping saves: a batch is padded to its longest message. The waiting messages
    (the oldest PLAN_WINDOW of them) are cut, in length order, into the batches that cost least in
    total (filterd.model.grouping: each pass costs `overhead + count * longest` tokens, the overhead
    measured per engine), and the batch holding the *oldest* waiting message goes next. On a CPU the
    overhead is tens of tokens, so tight groups win; on a GPU it is thousands, so everything waiting
    that fits goes together. Measured on 2,000 UCI messages arriving at once: 1.1% of computed tokens
    were padding, against 14.5% when batches grew around the oldest by nearest length.

Starvation
    Seeding with the oldest message means every batch serves the head of the queue, so nobody waits more
    than the batches ahead of them. Optionally (`starve_after_ms`), a message waiting that long is
    overdue: overdue messages seed the next batch, oldest first, and the room left is filled with the
    waiting messages nearest in length (the one adding the least padding at each step).
    It is off by default: under a sustained backlog every message outlives any such limit, batching
    degrades to arrival order and padding returns exactly when it costs the most (measured with 124M
    on 2 CPU cores: padding 0.55 with the limit at 4 forward passes, against a mean of 0.64 with 50 ms).

Pipelining and hot reload
    At most one batch is in the worker thread; the next one fills meanwhile (and so grows larger under
    load). `engine_ref()` is called once per batch, as the batch is planned (its `overhead_tokens`
    guides the plan) right before its forward pass, so a hot-reloaded model takes over between
    batches, never inside one, and each result names the version that scored it.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

from filterd.model.grouping import DEFAULT_OVERHEAD_TOKENS, group_of

log = logging.getLogger(__name__)

# Planning looks at this many of the oldest waiting messages: enough for tight groups, and planning
# them takes ~5 ms of the event loop (one vectorised step per message, whatever max_batch_size is).
PLAN_WINDOW = 1024


class QueueFull(Exception):
    """The bounded queue is full (SMTP answers 451 and the sender retries)."""


class BatcherClosed(Exception):
    """The batcher is stopping or stopped and accepts no more messages."""


class ScoringEngine(Protocol):
    """What the batcher needs from `filterd.model.engine.Engine`."""

    @property
    def version(self) -> str: ...

    @property
    def threshold(self) -> float: ...

    def score_tokens(self, sequences: Sequence[Sequence[int]]) -> list[float]: ...


class BatchObserver(Protocol):
    """Metrics hook (implemented by the metrics module)."""

    def on_batch(self, size: int, padded_tokens: int, real_tokens: int, seconds: float) -> None: ...

    def on_depth(self, depth: int) -> None: ...


@dataclass(frozen=True)
class Scored:
    """A score, not a verdict: what it means is filterd.policy.decision's business (per door, per [policy])."""

    score: float  # P(spam)
    model: str  # version of the engine that scored it
    tokens: int
    queued_s: float  # arrival to the start of its batch
    inference_s: float  # the forward pass it was part of
    threshold: float = 0.5  # the scoring model's own threshold: what "model" means in [policy]
    points: Mapping[float, float] = field(default_factory=dict)  # its operating points: what "fpr:" levels mean


@dataclass(eq=False)
class _Request:
    seq: int
    tokens: list[int]
    future: asyncio.Future[Scored]
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Batch:
    requests: list[_Request]
    started: float

    @property
    def padded_tokens(self) -> int:
        return len(self.requests) * max(len(r.tokens) for r in self.requests)

    @property
    def real_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)


def plan_batch(
    lengths: Sequence[int],
    overdue: int,
    max_batch_size: int,
    max_batch_tokens: int,
    overhead_tokens: float = DEFAULT_OVERHEAD_TOKENS,
) -> list[int]:
    """Indices of the next batch among waiting messages (`lengths` in arrival order, the first `overdue` overdue).

    See the module docstring for the policy. Never empty when `lengths` is not; always holds index 0.
    """
    if not lengths:
        return []
    if overdue <= 0:
        return group_of(0, lengths[:PLAN_WINDOW], overhead_tokens, max_batch_size, max_batch_tokens)
    return _seeded(lengths, overdue, max_batch_size, max_batch_tokens)


def _seeded(lengths: Sequence[int], overdue: int, max_batch_size: int, max_batch_tokens: int) -> list[int]:
    """The overdue messages in arrival order, then the nearest in length while the budget allows."""
    fits = lambda count, longest: count <= max_batch_size and count * longest <= max_batch_tokens
    chosen = [0]  # the oldest always goes, alone if it exceeds the budget
    longest = lengths[0]
    for i in range(1, overdue):
        if not fits(len(chosen) + 1, max(longest, lengths[i])):
            break  # overdue ones stay in arrival order: the next batch starts from here
        chosen.append(i)
        longest = max(longest, lengths[i])
    taken = set(chosen)
    rest = sorted((i for i in range(len(lengths)) if i not in taken), key=lambda i: (lengths[i], i))
    hi = bisect.bisect_right([lengths[i] for i in rest], longest)  # rest[hi:] are longer than the batch
    lo = hi - 1  # rest[:hi] are not longer: adding them costs only their own padding
    while True:
        n = len(chosen)
        left = longest - lengths[rest[lo]] if lo >= 0 and fits(n + 1, longest) else None
        right = n * (lengths[rest[hi]] - longest) if hi < len(rest) and fits(n + 1, lengths[rest[hi]]) else None
        if left is None and right is None:
            return chosen
        if right is None or (left is not None and left <= right):
            chosen.append(rest[lo])
            lo -= 1
        else:
            chosen.append(rest[hi])
            longest = lengths[rest[hi]]
            hi += 1


def _timed_score(engine: ScoringEngine, sequences: list[list[int]]) -> tuple[list[float], float]:
    """Runs in the worker thread: the forward pass and how long it took."""
    t0 = time.perf_counter()
    scores = engine.score_tokens(sequences)
    return list(scores), time.perf_counter() - t0


class Batcher:
    """Asyncio micro-batcher in front of one engine; see the module docstring for the batching policy."""

    def __init__(
        self,
        engine_ref: Callable[[], ScoringEngine],
        *,
        max_batch_size: int = 64,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        observer: BatchObserver | None = None,
        starve_after_ms: float | None = None,
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size, max_batch_tokens and max_queue must be >= 1, max_wait_ms >= 0")
        self._engine_ref = engine_ref
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.starve_after_s = starve_after_ms / 1000 if starve_after_ms is not None else None
        self._observer = observer
        self._pending: dict[int, _Request] = {}  # insertion order = arrival order
        self._seq = itertools.count()
        self._arrived = asyncio.Event()  # a message arrived, or stop() began
        self._room = asyncio.Event()  # the queue shrank (wakes `submit` waiting for room)
        self._slot = asyncio.Semaphore(1)  # one batch in the worker thread at a time
        self._executor: ThreadPoolExecutor | None = None
        self._collector: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._closing = False

    # -- public API -------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Messages waiting for a batch (not counting the one in the worker thread)."""
        return len(self._pending)

    async def start(self) -> None:
        if self._collector is not None:
            return
        if self._closing:
            raise BatcherClosed("batcher was stopped")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="filterd-infer")
        self._collector = asyncio.create_task(self._collect(), name="filterd-batcher")

    def submit_nowait(self, tokens: list[int]) -> asyncio.Future[Scored]:
        """Queue one message; raises QueueFull at once when the queue is full."""
        self._check(tokens)
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} messages waiting (max_queue {self.max_queue})")
        return self._enqueue(tokens)

    async def submit(self, tokens: list[int]) -> Scored:
        """Queue one message, waiting for room when the queue is full (backpressure); then its result."""
        self._check(tokens)
        while len(self._pending) >= self.max_queue:
            self._room.clear()
            await self._room.wait()
            self._check(tokens)  # stop() may have begun meanwhile
        return await self._enqueue(tokens)

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting; with `drain` finish everything queued, else fail it with BatcherClosed.

        The batch already in the worker thread always finishes (a forward pass cannot be interrupted);
        then the worker thread is shut down.
        """
        self._closing = True
        self._room.set()  # wake `submit` waiters so they raise BatcherClosed
        if not drain or self._collector is None:
            self._fail_pending(BatcherClosed("batcher stopped before this message was scored"))
        self._arrived.set()
        if self._collector is not None:
            await asyncio.shield(self._collector)
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # idle by now: the collector waited for the last batch

    # -- intake -----------------------------------------------------------------------------------
    def _check(self, tokens: list[int]) -> None:
        if self._closing:
            raise BatcherClosed("batcher is stopping")
        if len(tokens) == 0:
            raise ValueError("empty token list: nothing to score")

    def _enqueue(self, tokens: list[int]) -> asyncio.Future[Scored]:
        req = _Request(next(self._seq), list(tokens), asyncio.get_running_loop().create_future())
        self._pending[req.seq] = req
        req.future.add_done_callback(lambda f, seq=req.seq: self._forget_cancelled(f, seq))
        self._arrived.set()
        self._depth_changed()
        return req.future

    def _forget_cancelled(self, fut: asyncio.Future[Scored], seq: int) -> None:
        # a caller that gave up frees its place at once, so it neither counts as depth nor joins a batch
        if fut.cancelled() and self._pending.pop(seq, None) is not None:
            self._depth_changed()

    def _fail_pending(self, exc: Exception) -> None:
        waiting, self._pending = list(self._pending.values()), {}
        for req in waiting:
            if not req.future.done():
                req.future.set_exception(exc)
        self._depth_changed()

    def _depth_changed(self) -> None:
        self._room.set()
        self._notify("on_depth", len(self._pending))

    def _notify(self, method: str, *args: float) -> None:
        if self._observer is None:
            return
        try:
            getattr(self._observer, method)(*args)
        except Exception:  # metrics must never stop scoring
            log.exception("batch observer %s failed", method)

    # -- the collector: forms batches on the event loop ---------------------------------------------
    async def _collect(self) -> None:
        while True:
            await self._wait_for_messages()
            if not self._pending:
                break  # closing and drained
            await self._slot.acquire()  # the previous batch leaves the worker thread; this one keeps filling
            await self._wait_until_ready()
            try:
                engine: ScoringEngine | Exception = self._engine_ref()  # once per batch: a hot swap lands between batches
            except Exception as exc:  # the batch fails with it when it runs; the batcher goes on
                engine = exc
            batch = self._take_batch(getattr(engine, "overhead_tokens", DEFAULT_OVERHEAD_TOKENS))
            if batch is None:  # every waiting caller gave up meanwhile
                self._slot.release()
                continue
            self._inflight = asyncio.create_task(self._run_batch(batch, engine))
        async with self._slot:  # the last batch is done
            pass

    async def _wait_for_messages(self) -> None:
        while not self._pending and not self._closing:
            self._arrived.clear()
            await self._arrived.wait()

    async def _wait_until_ready(self) -> None:
        while self._pending and not self._closing and not self._full():
            oldest = next(iter(self._pending.values()))
            delay = oldest.arrived + self.max_wait_s - time.monotonic()
            if delay <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), delay)
            except TimeoutError:
                return

    def _full(self) -> bool:
        """True when the waiting messages no longer fit one batch, i.e. the next batch is as full as it gets."""
        n = len(self._pending)
        if n >= self.max_batch_size:
            return True
        return n * max(len(r.tokens) for r in self._pending.values()) > self.max_batch_tokens

    def _take_batch(self, overhead_tokens: float) -> _Batch | None:
        waiting = list(self._pending.values())
        if not waiting:
            return None
        now = time.monotonic()
        limit = self.starve_after_s
        overdue = 0 if limit is None else sum(1 for _ in itertools.takewhile(lambda r: now - r.arrived >= limit, waiting))
        picks = plan_batch([len(r.tokens) for r in waiting], overdue, self.max_batch_size, self.max_batch_tokens, overhead_tokens)
        batch = _Batch([waiting[i] for i in picks], now)
        for req in batch.requests:
            del self._pending[req.seq]
        self._depth_changed()
        return batch

    # -- one forward pass ---------------------------------------------------------------------------
    async def _run_batch(self, batch: _Batch, engine: ScoringEngine | Exception) -> None:
        try:
            try:
                if isinstance(engine, Exception):
                    raise engine
                version, threshold = engine.version, engine.threshold
                points = getattr(engine, "operating_points", {})  # an engine without them: "fpr:" levels cannot resolve
                assert self._executor is not None
                scores, seconds = await asyncio.get_running_loop().run_in_executor(
                    self._executor, _timed_score, engine, [r.tokens for r in batch.requests]
                )
                if len(scores) != len(batch.requests):
                    raise RuntimeError(f"engine returned {len(scores)} scores for {len(batch.requests)} messages")
            except Exception as exc:
                log.error("batch of %d failed: %s", len(batch.requests), exc)
                for req in batch.requests:
                    if not req.future.done():
                        req.future.set_exception(exc)
                return
            self._notify("on_batch", len(batch.requests), batch.padded_tokens, batch.real_tokens, seconds)
            for req, score in zip(batch.requests, scores):
                if not req.future.done():  # a cancelled caller must not break the others
                    req.future.set_result(
                        Scored(score, version, len(req.tokens), batch.started - req.arrived, seconds, threshold, points)
                    )
        finally:
            self._slot.release()
