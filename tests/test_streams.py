"""filterd.net.streams.StreamConsumer and filterd.net.supervise against a real redis-server (issue 12, points 7-12)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from filterd.doors.path import MessagePath
from filterd.config import RedisConfig
from filterd.doors.redis import RedisIngress
from filterd.obs.metrics import FilterdMetrics
from filterd.net.streams import StreamConsumer, StreamError, StreamSettings, error_code, without_large_fields
from filterd.net.supervise import TaskFailed, supervise

IN, OUT, DEAD, GROUP = "filterd:in", "filterd:out", "filterd:dead", "filterd"


@dataclass(frozen=True)
class FakeScored:
    score: float
    verdict: str
    model: str
    threshold: float = 0.5


def scorer(delay: float = 0.001):
    async def score(text: str) -> FakeScored:
        await asyncio.sleep(delay)
        return FakeScored(0.25, "ham", "v1")

    return score


def rcfg(url: str, **kw) -> RedisConfig:
    return RedisConfig(**(dict(url=url, block_ms=100, claim_idle_ms=500) | kw))


def metric(m: FilterdMetrics, name: str, labels: dict[str, str]) -> float | None:
    return m.registry.get_sample_value(name, labels)


async def run_while(coros: list, until, timeout: float = 20.0) -> None:
    """Run consumers until until() (a blocking check, run in a thread) is true, then stop them and wait."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c(stop)) for c in coros]
    deadline = time.monotonic() + timeout
    try:
        while not await asyncio.to_thread(until):
            for t in tasks:
                if t.done():
                    t.result()
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)


def out_entries(r) -> list[bytes]:
    return [f[b"entry"] for _, f in r.xrange(OUT)]


# -- 7: errors and supervision ------------------------------------------------------------------
def test_error_codes():
    from redis import exceptions as rx

    assert error_code(rx.OutOfMemoryError("command not allowed")) == "oom"
    assert error_code(rx.ResponseError("WRONGTYPE Operation against a key")) == "wrongtype"
    assert error_code(rx.ResponseError("NOGROUP No such key")) == "nogroup"
    assert error_code(rx.AuthenticationError("invalid username-password pair")) == "auth"
    assert error_code(rx.ConnectionError("Connection refused")) == "connection"


def test_stream_deleted_under_a_running_ingress_is_recreated(redis_server):
    """Old code: NOGROUP escaped run() and the ingress task died, leaving the process up and deaf."""
    r = redis_server.client()
    ingress = RedisIngress(rcfg(redis_server.url), "c1", MessagePath.of(scorer()))

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(ingress.run(stop))
        r.xadd(IN, {"text": "before"})
        first = time.monotonic() + 20
        while r.xlen(OUT) < 1:
            assert time.monotonic() < first, "the first entry was not answered within 20 s"
            await asyncio.sleep(0.05)
        r.delete(IN)  # stream and group gone
        await asyncio.sleep(0.3)
        ids = [r.xadd(IN, {"text": f"after {i}"}) for i in range(5)]
        deadline = time.monotonic() + 20
        while not set(ids) <= set(out_entries(r)):
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "entries after the deletion not answered within 20 s"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert r.xpending(IN, GROUP)["pending"] == 0


def test_wrong_type_raises_one_line_stream_error(redis_server):
    r = redis_server.client()
    r.set(IN, "x")
    ingress = RedisIngress(rcfg(redis_server.url), "c1", MessagePath.of(scorer()))
    with pytest.raises(StreamError, match="WRONGTYPE") as e:
        asyncio.run(asyncio.wait_for(ingress.run(asyncio.Event()), 10))
    assert "\n" not in str(e.value) and IN in str(e.value)


def test_supervise_ends_everything_when_one_task_dies():
    finished: list[str] = []

    async def worker(stop: asyncio.Event) -> None:
        await stop.wait()
        await asyncio.sleep(0.05)  # in-flight work finished after stop
        finished.append("worker")

    async def dies() -> None:
        await asyncio.sleep(0.05)
        raise StreamError("redis: reading filterd:in at redis://x: WRONGTYPE Operation")

    async def main():
        stop = asyncio.Event()
        await supervise({"worker": worker(stop), "redis-ingress": dies()}, stop)

    with pytest.raises(TaskFailed, match=r"^redis-ingress failed: redis: reading .*WRONGTYPE"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert finished == ["worker"]


# -- 8: crash recovery ---------------------------------------------------------------------------
def test_dead_consumers_entries_are_claimed_in_one_pass_and_empty_consumers_deleted(redis_server):
    """Old code claimed COUNT entries per claim_idle_ms/2 (here 4 per 0.5 s: 25 s for 200)."""
    r = redis_server.client()
    r.xgroup_create(IN, GROUP, id="0", mkstream=True)
    for i in range(200):
        r.xadd(IN, {"text": f"m{i}"})
    r.xreadgroup(GROUP, "crashed-1", {IN: ">"}, count=200)  # read, never acknowledged
    r.xreadgroup(GROUP, "gone-empty", {IN: ">"}, count=1)  # nothing left to read: a consumer with no pending entries
    time.sleep(0.6)
    ingress = RedisIngress(rcfg(redis_server.url, claim_idle_ms=500, count=4, dead_consumer_idle=0.5), "live", MessagePath.of(scorer()))

    def done() -> bool:
        names = {c["name"] for c in r.xinfo_consumers(IN, GROUP)}
        return len(out_entries(r)) >= 200 and r.xpending(IN, GROUP)["pending"] == 0 and names <= {b"live"}

    # crashed-1 (empty once claimed from, idle) and gone-empty are deleted; 10 s is generous (old code: 25 s)
    asyncio.run(run_while([ingress.run], done, timeout=10))
    assert len(set(out_entries(r))) == 200
    assert r.xinfo_consumers(IN, GROUP) == []  # and "live" left the group on its clean exit


def test_restart_with_the_same_name_finishes_own_pending_at_once(redis_server):
    r = redis_server.client()
    r.xgroup_create(IN, GROUP, id="0", mkstream=True)
    for i in range(100):
        r.xadd(IN, {"text": f"m{i}"})
    r.xreadgroup(GROUP, "host-a", {IN: ">"}, count=100)  # then kill -9
    ingress = RedisIngress(rcfg(redis_server.url, claim_idle_ms=600_000), "host-a", MessagePath.of(scorer()))
    asyncio.run(run_while([ingress.run], lambda: r.xpending(IN, GROUP)["pending"] == 0 and r.xlen(OUT) >= 100, timeout=10))
    assert len(set(out_entries(r))) == 100


# -- 9: no stealing between live consumers ---------------------------------------------------------
def test_live_consumers_never_claim_each_others_queued_entries(redis_server):
    """Entries wait 2.5 s in each consumer (a slow model), 2.5 times claim_idle_ms: none is scored twice.

    Old code: the other consumer claimed them once idle for claim_idle_ms and scored them again."""
    r = redis_server.client()
    for i in range(120):
        r.xadd(IN, {"text": f"m{i}", "id": str(i)})
    cfg = rcfg(redis_server.url, claim_idle_ms=1000, count=8)  # refreshed every 0.33 s: slack for a busy machine
    a = RedisIngress(cfg, "a", MessagePath.of(scorer(2.5)))
    b = RedisIngress(cfg, "b", MessagePath.of(scorer(2.5)))
    asyncio.run(run_while([a.run, b.run], lambda: len(set(out_entries(r))) >= 120 and r.xpending(IN, GROUP)["pending"] == 0))
    entries = out_entries(r)
    assert len(entries) - len(set(entries)) == 0, f"{len(entries) - len(set(entries))} duplicates"


# -- 10: honest health when writes are refused -------------------------------------------------------
def test_oom_on_result_writes_stops_reading_and_recovers(redis_server):
    r = redis_server.client()
    r.xgroup_create(IN, GROUP, id="0", mkstream=True)
    for i in range(100):
        r.xadd(IN, {"text": f"m{i}", "id": str(i)})
    m = FilterdMetrics()
    ingress = RedisIngress(rcfg(redis_server.url, count=16), "c1", MessagePath.of(scorer(), metrics=m), m)
    lags: list[int] = []

    async def main():
        stop = asyncio.Event()
        r.config_set("maxmemory", "1")  # every XADD refused: OOM
        task = asyncio.create_task(ingress.run(stop))
        deadline = time.monotonic() + 10
        while metric(m, "filterd_redis_errors_total", {"op": "write", "error": "oom"}) in (None, 0.0):
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert not ingress.up and "refused" in ingress.reason and "maxmemory" in ingress.reason
        assert metric(m, "filterd_ingress_up", {"ingress": "redis"}) == 0
        for _ in range(3):  # reading stopped: the backlog stays where it was
            lags.append(r.xinfo_groups(IN)[0]["lag"])
            await asyncio.sleep(0.3)
        assert r.xlen(OUT) == 0
        r.config_set("maxmemory", "0")
        deadline = time.monotonic() + 20
        while not (r.xlen(OUT) >= 100 and r.xpending(IN, GROUP)["pending"] == 0):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert ingress.up and metric(m, "filterd_ingress_up", {"ingress": "redis"}) == 1
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert lags[0] > 0 and len(set(lags)) == 1, lags
    assert sorted(int(f[b"id"]) for _, f in r.xrange(OUT)) == list(range(100))  # nothing lost, nothing doubled


# -- 11: bounded by bytes ---------------------------------------------------------------------------
def test_reads_are_bounded_by_bytes_and_big_dead_letters_keep_only_the_size(redis_server):
    """8 entries of 2 MiB with a 1 MiB budget: waiting at start, then arriving among small ones while it runs.
    Old code read COUNT (64) entries whatever their size and copied each payload into the dead letter."""
    r = redis_server.client()
    big = 2 << 20
    for i in range(8):
        r.xadd(IN, {"text": b"y" * big, "id": f"b{i}"})
    ingress = RedisIngress(rcfg(redis_server.url, max_inflight_bytes=1 << 20, max_text_bytes=65536), "c1", MessagePath.of(scorer()))

    def then_while_running() -> bool:
        if r.xlen(DEAD) < 8:
            return False
        if r.xlen(IN) == 8:  # phase 2: small entries flowing, then big ones among them
            for i in range(8):
                r.xadd(IN, {"text": b"x" * 100, "id": f"s{i}"})
                r.xadd(IN, {"text": b"y" * big, "id": f"c{i}"})
        return r.xlen(DEAD) >= 16 and r.xlen(OUT) >= 8

    asyncio.run(run_while([ingress.run], then_while_running))
    # one big entry per read (two at most, if a second arrived while the first was read), never COUNT of them
    assert ingress.stream.max_chunk_bytes <= 2 * (big + 64), ingress.stream.max_chunk_bytes
    dead = r.xrange(DEAD)
    assert len(dead) == 16
    for _, f in dead:
        assert f[b"error"] == b"too-large" and b"text" not in f
        assert f[b"text_bytes"] == str(big).encode() and f[b"id"][:1] in (b"b", b"c")
    assert without_large_fields({b"a": b"12345", b"b": b"1"}, 4) == {b"a_bytes": b"5", b"b": b"1"}


# -- 12: backlog and pending -------------------------------------------------------------------------
def test_backlog_and_pending_gauges_show_the_whole_stream(redis_server):
    """Old code had only queue depth, bounded by what one process holds (<= 448 for a 3,784 backlog)."""
    r = redis_server.client()
    for i in range(1000):
        r.xadd(IN, {"text": f"m{i}"})
    m = FilterdMetrics()
    release = asyncio.Event()

    async def held(entries):  # the model is stuck: what was read stays in flight
        await release.wait()

    s = StreamSettings(url=redis_server.url, stream=IN, group=GROUP, consumer="c1", count=16, block_ms=100,
                       max_inflight=64, stats_every_s=0.2)  # fmt: skip
    consumer = StreamConsumer(s, held, m)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        labels = {"stream": IN, "group": GROUP}
        deadline = time.monotonic() + 10
        while metric(m, "filterd_stream_pending", labels) != 64 or metric(m, "filterd_stream_backlog", labels) != 936:
            assert time.monotonic() < deadline, (
                metric(m, "filterd_stream_pending", labels),
                metric(m, "filterd_stream_backlog", labels),
            )
            await asyncio.sleep(0.05)
        assert metric(m, "filterd_ingress_up", {"ingress": "redis"}) == 1
        stop.set()
        release.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
