"""The micro-batcher: correct per-caller results, batch limits, length grouping, backpressure,
failures, hot swap, draining, and an event loop that stays free during inference."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

import pytest

from filterd.model.batcher import Batcher, BatcherClosed, QueueFull, Scored, plan_batch
from filterd.model.engine import Engine
from filterd.model.bases import build_model, resolve_base
from filterd.model.weights import ModelMeta, publish_directory, staging_dir, write_model_files


# -- helpers ----------------------------------------------------------------------------------------
def _tiny_engine(root, name: str, seed: int) -> Engine:
    model = build_model(resolve_base("random:tiny"), seed=seed)
    meta = ModelMeta(version="", base="random:tiny", base_kind="random", config=model.config, max_length=64)
    staged = staging_dir(root / name)
    write_model_files(model, meta, staged)
    publish_directory(staged, root / name)
    return Engine.load(root / name, "cpu")


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> tuple[Engine, Engine]:
    root = tmp_path_factory.mktemp("batcher-models")
    return _tiny_engine(root, "a", seed=5), _tiny_engine(root, "b", seed=6)


@dataclass
class FakeEngine:
    """Records each batch (the token lists it saw); can sleep in its thread or raise."""

    version: str = "fake-1"
    threshold: float = 0.5
    delay: float = 0.0
    fail_batches: set[int] = field(default_factory=set)  # indices of batches that raise
    batches: list[list[list[int]]] = field(default_factory=list)

    def score_tokens(self, sequences):
        index = len(self.batches)
        self.batches.append([list(s) for s in sequences])
        if self.delay:
            time.sleep(self.delay)
        if index in self.fail_batches:
            raise RuntimeError(f"boom in batch {index}")
        return [(sum(s) % 997) / 997 for s in sequences]  # deterministic per message


@dataclass
class Recorder:
    """A BatchObserver keeping what the metrics module would see."""

    batches: list[tuple[int, int, int, float]] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)

    def on_batch(self, size, padded_tokens, real_tokens, seconds):
        self.batches.append((size, padded_tokens, real_tokens, seconds))

    def on_depth(self, depth):
        self.depths.append(depth)

    @property
    def mean_size(self) -> float:
        return sum(b[0] for b in self.batches) / len(self.batches)

    @property
    def mean_padding_ratio(self) -> float:
        return sum(1 - real / padded for _, padded, real, _ in self.batches) / len(self.batches)


def _padding_ratio(batches: list[list[list[int]]]) -> float:
    ratios = [1 - sum(map(len, b)) / (len(b) * max(map(len, b))) for b in batches]
    return sum(ratios) / len(ratios)


def _arrival_order_batches(messages: list[list[int]], max_size: int, max_tokens: int) -> list[list[list[int]]]:
    """What batching in arrival order under the same limits would do (the baseline grouping must beat)."""
    batches: list[list[list[int]]] = [[]]
    for m in messages:
        b = batches[-1]
        if b and (len(b) + 1 > max_size or (len(b) + 1) * max(len(m), *map(len, b)) > max_tokens):
            batches.append(b := [])
        b.append(m)
    return batches


async def _with_batcher(engine_ref, body, **kw):
    batcher = Batcher(engine_ref, **kw)
    await batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(50257) for _ in range(n)]


# -- results and limits -----------------------------------------------------------------------------
def test_every_caller_gets_its_own_score_within_limits(engines):
    engine = engines[0]
    rng = random.Random(1)
    messages = [_tokens(rng, rng.randint(1, 64)) for _ in range(300)]
    obs = Recorder()

    async def body(b):
        return await asyncio.gather(*(b.submit(m) for m in messages))

    results = asyncio.run(_with_batcher(lambda: engine, body, max_batch_size=32, max_batch_tokens=1024, observer=obs))
    for m, r in zip(messages, results):
        alone = engine.score_tokens([m])[0]
        assert abs(r.score - alone) <= 1e-5
        assert r.tokens == len(m) and r.model == engine.version
        assert r.threshold == engine.threshold  # a score and the model's own threshold, no verdict (filterd.policy.decision)
        assert not hasattr(r, "verdict")
        assert r.queued_s >= 0 and r.inference_s > 0
    print(
        f"300 real-model submits: {len(obs.batches)} batches, mean size {obs.mean_size:.1f}, padding {obs.mean_padding_ratio:.3f}"
    )
    assert sum(b[0] for b in obs.batches) == 300
    assert all(size <= 32 and padded <= 1024 for size, padded, _, _ in obs.batches)
    assert len(obs.batches) < 300 / 4  # they were batched
    assert obs.depths[-1] == 0


def test_batches_respect_size_and_token_budget_and_oversized_goes_alone():
    fake = FakeEngine()
    rng = random.Random(2)
    messages = [_tokens(rng, rng.randint(1, 100)) for _ in range(300)] + [_tokens(rng, 500)]

    async def body(b):
        return await asyncio.gather(*(b.submit(m) for m in messages))

    results = asyncio.run(_with_batcher(lambda: fake, body, max_batch_size=16, max_batch_tokens=400))
    assert [r.score for r in results] == [(sum(m) % 997) / 997 for m in messages]
    for batch in fake.batches:
        assert len(batch) <= 16
        assert len(batch) * max(map(len, batch)) <= 400 or len(batch) == 1
    assert [[500]] == [[len(s) for s in b] for b in fake.batches if any(len(s) == 500 for s in b)]


def test_concurrent_single_message_callers_share_batches():
    fake = FakeEngine(delay=0.002)
    obs = Recorder()

    async def caller(b, rng):
        for _ in range(5):
            await asyncio.sleep(rng.random() * 0.02)  # arrivals spread over 4x max_wait
            await b.submit(_tokens(rng, rng.randint(5, 40)))

    async def body(b):
        await asyncio.gather(*(caller(b, random.Random(i)) for i in range(64)))

    asyncio.run(_with_batcher(lambda: fake, body, max_wait_ms=5.0, observer=obs))
    print(f"64 callers x 5 messages: {len(obs.batches)} batches, mean batch size {obs.mean_size:.1f}")
    assert sum(b[0] for b in obs.batches) == 320
    assert obs.mean_size > 8


def test_lone_message_does_not_wait_for_a_full_batch():
    fake = FakeEngine()

    async def body(b):
        await b.submit([1, 2, 3])  # warm the worker thread
        t0 = time.perf_counter()
        await b.submit([4, 5, 6])
        return time.perf_counter() - t0

    elapsed = asyncio.run(_with_batcher(lambda: fake, body, max_wait_ms=5.0))
    print(f"lone message answered in {elapsed * 1000:.1f} ms (max_wait_ms 5)")
    assert 0.004 <= elapsed < 0.05


# -- length grouping --------------------------------------------------------------------------------
def test_length_grouping_beats_arrival_order_padding():
    rng = random.Random(3)
    short = [_tokens(rng, rng.randint(4, 8)) for _ in range(64)]
    long = [_tokens(rng, rng.randint(56, 64)) for _ in range(64)]
    messages = [m for pair in zip(short, long) for m in pair]  # interleaved arrivals
    fake, obs = FakeEngine(), Recorder()

    async def body(b):
        return await asyncio.gather(*(b.submit(m) for m in messages))

    asyncio.run(_with_batcher(lambda: fake, body, max_batch_size=64, max_batch_tokens=640, observer=obs))
    ours = obs.mean_padding_ratio
    naive = _padding_ratio(_arrival_order_batches(messages, 64, 640))
    assert ours == pytest.approx(_padding_ratio(fake.batches))
    print(f"padding ratio: grouped {ours:.3f} over {len(fake.batches)} batches, arrival order {naive:.3f}")
    assert ours < 0.5 * naive


def test_plan_batch_groups_by_length_and_seeds_with_the_oldest():
    lengths = [60, 5, 61, 6, 62, 7]
    assert sorted(plan_batch(lengths, 0, 64, 200)) == [0, 2, 4]  # the oldest (60) and its neighbours in length
    assert sorted(plan_batch(lengths[1:], 0, 64, 200)) == [0, 2, 4]  # oldest is short: the shorts
    assert plan_batch([500, 1, 1], 0, 64, 100) == [0]  # over the budget: alone, never stuck
    # everything fits: cheap passes (a CPU) split shorts from longs, 2*64 + 3*7 + 3*62 < 64 + 6*62 ...
    assert sorted(plan_batch(lengths, 0, 64, 10_000, overhead_tokens=64)) == [0, 2, 4]
    # ... costly ones (a GPU) take everything: 200 + 6*62 < 2*200 + 3*7 + 3*62
    assert sorted(plan_batch(lengths, 0, 64, 10_000, overhead_tokens=200)) == list(range(6))
    assert len(plan_batch([3] * 10, 0, 4, 10_000)) == 4


def test_overdue_messages_go_in_the_next_batch():
    # 0 (long) and 1 (short) are overdue; grouping alone would take 0 with the fresh longs and leave 1 behind
    lengths = [60, 5] + [60] * 10
    assert 1 not in plan_batch(lengths, 0, 64, 600, overhead_tokens=10)  # a pass is cheaper than its padding
    batch = plan_batch(lengths, 2, 64, 600)
    assert {0, 1} <= set(batch) and len(batch) == 10


# -- backpressure, failures, cancellation -----------------------------------------------------------
def test_backpressure_queue_full_and_waiting_submit():
    fake = FakeEngine(delay=0.2)

    async def body(b):
        first = b.submit_nowait([1])
        await asyncio.sleep(0.02)  # now in the worker thread; the next ones wait in the queue
        queued = [b.submit_nowait([i, i]) for i in range(4)]
        assert b.depth == 4
        with pytest.raises(QueueFull):
            b.submit_nowait([9])
        waiter = asyncio.create_task(b.submit([7, 7, 7]))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # held back, not rejected
        results = await asyncio.gather(first, *queued, waiter)
        return waiter, results

    waiter, results = asyncio.run(_with_batcher(lambda: fake, body, max_queue=4))
    assert all(isinstance(r, Scored) for r in results) and waiter.result().tokens == 3


def test_engine_failure_fails_only_that_batch():
    fake = FakeEngine(fail_batches={0})

    async def body(b):
        doomed = [b.submit_nowait([i + 1]) for i in range(3)]
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        later = await asyncio.gather(b.submit([1, 2]), b.submit([3]))
        return outcomes, later

    outcomes, later = asyncio.run(_with_batcher(lambda: fake, body))
    assert len(fake.batches[0]) == 3
    assert all(isinstance(o, RuntimeError) and "boom" in str(o) for o in outcomes)
    assert [r.score for r in later] == [3 / 997, 3 / 997]


def test_engine_ref_failure_fails_the_batch_not_the_batcher():
    fake = FakeEngine()
    calls = iter([RuntimeError("no model loaded")])

    def ref():
        err = next(calls, None)
        if err:
            raise err
        return fake

    async def body(b):
        with pytest.raises(RuntimeError, match="no model loaded"):
            await b.submit([1])
        return await b.submit([2])

    assert asyncio.run(_with_batcher(ref, body)).model == "fake-1"


def test_cancelled_callers_do_not_break_the_batch():
    fake = FakeEngine(delay=0.05)

    async def body(b):
        waiting = [b.submit_nowait([i + 1]) for i in range(4)]
        waiting[1].cancel()  # gives up before its batch
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration
        assert b.depth == 3
        await asyncio.sleep(0.02)  # the batch is in the worker thread now
        waiting[2].cancel()  # gives up during the forward pass
        return await asyncio.gather(waiting[0], waiting[3]), await b.submit([5])

    done, after = asyncio.run(_with_batcher(lambda: fake, body))
    assert [len(b) for b in fake.batches[:1]] == [3]
    assert [r.score for r in done] == [1 / 997, 4 / 997] and after.score == 5 / 997


def test_empty_token_list_is_rejected():
    async def body(b):
        with pytest.raises(ValueError):
            await b.submit([])
        with pytest.raises(ValueError):
            b.submit_nowait([])

    asyncio.run(_with_batcher(lambda: FakeEngine(), body))


# -- hot swap, draining, responsiveness ------------------------------------------------------------
class Recording:
    """A real engine that also records the batches it scored."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.batches = engine, []
        self.version, self.threshold = engine.version, engine.threshold

    def score_tokens(self, sequences):
        self.batches.append([tuple(s) for s in sequences])
        return self.engine.score_tokens(sequences)


def test_hot_swap_between_batches(engines):
    a, b = Recording(engines[0]), Recording(engines[1])
    assert a.version != b.version
    refs = iter([a, a, a])

    def engine_ref():
        return next(refs, b)  # three batches on A, then the "reloaded" B

    rng = random.Random(4)
    messages = [_tokens(rng, rng.randint(1, 30)) for _ in range(120)]

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit(m) for m in messages))

    results = asyncio.run(_with_batcher(engine_ref, body, max_batch_size=16))
    by_version = {a.version: a, b.version: b}
    scored_by = {seq: eng.version for eng in (a, b) for batch in eng.batches for seq in batch}
    assert len(a.batches) == 3 and b.batches
    for m, r in zip(messages, results):
        assert scored_by[tuple(m)] == r.model  # the version reported is the one that scored it
        assert abs(r.score - by_version[r.model].engine.score_tokens([m])[0]) <= 1e-5
    # a batch is one engine's forward pass, so all its messages report that engine's version
    for eng in (a, b):
        for batch in eng.batches:
            assert {scored_by[s] for s in batch} == {eng.version}


def test_stop_drains_then_refuses():
    fake = FakeEngine(delay=0.01)

    async def main():
        b = Batcher(lambda: fake, max_batch_size=8, max_wait_ms=50)
        await b.start()
        futures = [b.submit_nowait([i + 1]) for i in range(50)]
        await b.stop(drain=True)
        assert all(f.done() and not f.cancelled() and f.exception() is None for f in futures)
        with pytest.raises(BatcherClosed):
            await b.submit([1])
        with pytest.raises(BatcherClosed):
            b.submit_nowait([1])
        return futures

    futures = asyncio.run(main())
    assert sorted(f.result().score for f in futures) == sorted((i + 1) / 997 for i in range(50))
    assert sum(len(b) for b in fake.batches) == 50
    assert not [t for t in threading.enumerate() if t.name.startswith("filterd-infer")]


def test_stop_without_drain_fails_queued_work_and_wakes_waiters():
    fake = FakeEngine(delay=0.1)

    async def main():
        b = Batcher(lambda: fake, max_queue=2)
        await b.start()
        inflight = b.submit_nowait([1])
        await asyncio.sleep(0.02)
        queued = [b.submit_nowait([2]), b.submit_nowait([3])]
        waiter = asyncio.create_task(b.submit([4]))
        await asyncio.sleep(0.01)
        await b.stop(drain=False)
        with pytest.raises(BatcherClosed):
            await waiter
        assert inflight.result().score == 1 / 997  # the forward pass already running finishes
        assert all(isinstance(f.exception(), BatcherClosed) for f in queued)

    asyncio.run(main())


def test_event_loop_stays_responsive_during_inference():
    fake = FakeEngine(delay=0.2)  # a forward pass that holds its thread for 200 ms

    async def body(b):
        gaps: list[float] = []
        stop = asyncio.Event()

        async def heartbeat():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        await asyncio.gather(*(b.submit([i + 1] * (i + 1)) for i in range(3)))
        await asyncio.gather(*(b.submit([i + 1]) for i in range(3)))
        stop.set()
        await beat
        return max(gaps)

    worst = asyncio.run(_with_batcher(lambda: fake, body))
    print(f"worst heartbeat gap {worst * 1000:.1f} ms during 200 ms forward passes")
    assert len(fake.batches) >= 2
    assert worst < 0.05
