"""Redis Streams ingress against a real redis-server: results, acks, dead letters, claims, reconnects."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
import pytest

from filterd.doors.path import MessagePath
from filterd.config import RedisConfig, RoutesConfig
from filterd.doors.redis import RedisIngress, validate_entry


@dataclass(frozen=True)
class FakeScored:
    score: float
    verdict: str
    model: str
    threshold: float = 0.5


async def length_score(text: str) -> FakeScored:
    """A deterministic stand-in for the batcher: the ingress is what is under test here."""
    await asyncio.sleep(0.001)
    s = min(len(text) / 200, 1.0)
    return FakeScored(s, "spam" if s >= 0.5 else "ham", "v1")


def cfg(url: str, routes: dict[str, str] | None = None, **kw) -> RedisConfig:
    base = dict(url=url, block_ms=100, claim_idle_ms=500, routes=RoutesConfig(**(routes or {})))
    return RedisConfig(**(base | kw))


def run_until(ingress: RedisIngress, done, timeout: float = 30.0, during=None) -> None:
    """Run the ingress until done() is true (checked every 50 ms), calling during() once in a thread."""

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(ingress.run(stop))
        if during:
            threading.Thread(target=during, daemon=True).start()
        deadline = asyncio.get_running_loop().time() + timeout
        while not await asyncio.to_thread(done):
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_validate_entry():
    assert validate_entry({b"text": b"hi"}, 10) == ("hi", None)
    assert validate_entry({b"id": b"1"}, 10) == (None, "missing-text")
    assert validate_entry({b"text": b"\xff\xfe"}, 10) == (None, "invalid-utf8")
    assert validate_entry({b"text": b"x" * 11}, 10) == (None, "too-large")


def test_results_acks_routes_and_dead_letters(redis_server, sms_data):
    from trainer.data import read_split

    r = redis_server.client()
    texts = [e.text for e in read_split(sms_data / "test.csv")]
    ids = [r.xadd("filterd:in", {"text": t.encode(), "id": f"m{i}", "carrier": "x"}) for i, t in enumerate(texts)]
    bad = [r.xadd("filterd:in", f) for f in ({"id": "b1"}, {"text": b"\xff bad"}, {"text": "x" * 70000})]
    ingress = RedisIngress(cfg(redis_server.url, routes={"spam": "sms:spam"}), "c1", MessagePath.of(length_score))
    run_until(ingress, lambda: r.xlen("filterd:out") + r.xlen("filterd:dead") >= len(texts) + 3)

    out = r.xrange("filterd:out")
    assert len(out) == len(texts)
    by_entry = {f[b"entry"]: f for _, f in out}
    assert set(by_entry) == set(ids)
    for i, entry in enumerate(ids):
        f = by_entry[entry]
        assert f[b"id"] == f"m{i}".encode() and f[b"model"] == b"v1"
        assert float(f[b"score"]) == pytest.approx(min(len(texts[i]) / 200, 1.0), abs=1e-6)
        assert float(f[b"latency_ms"]) >= 0
    spam_routed = r.xrange("sms:spam")
    assert len(spam_routed) == sum(f[b"verdict"] == b"spam" for f in by_entry.values())
    assert all(f[b"carrier"] == b"x" for _, f in spam_routed)
    dead = sorted((f[b"error"], f.get(b"id")) for _, f in r.xrange("filterd:dead"))
    assert dead == [(b"invalid-utf8", None), (b"missing-text", b"b1"), (b"too-large", None)]
    assert r.xpending("filterd:in", "filterd")["pending"] == 0  # everything acknowledged
    assert len(bad) == 3


def test_pending_entries_of_a_dead_consumer_are_claimed(redis_server):
    r = redis_server.client()
    r.xgroup_create("filterd:in", "filterd", id="0", mkstream=True)
    for i in range(50):
        r.xadd("filterd:in", {"text": f"message {i}"})
    # a consumer that read 20 entries and died before acknowledging them
    r.xreadgroup("filterd", "dead-consumer", {"filterd:in": ">"}, count=20)
    ingress = RedisIngress(cfg(redis_server.url, claim_idle_ms=200), "live", MessagePath.of(length_score))
    run_until(ingress, lambda: r.xlen("filterd:out") >= 50)
    entries = [f[b"entry"] for _, f in r.xrange("filterd:out")]
    assert len(entries) == len(set(entries)) == 50
    assert r.xpending("filterd:in", "filterd")["pending"] == 0


def test_own_pending_entries_are_finished_after_a_restart(redis_server):
    r = redis_server.client()
    r.xgroup_create("filterd:in", "filterd", id="0", mkstream=True)
    for i in range(30):
        r.xadd("filterd:in", {"text": f"m{i}"})
    r.xreadgroup("filterd", "same-name", {"filterd:in": ">"}, count=10)  # read before a crash
    ingress = RedisIngress(cfg(redis_server.url, claim_idle_ms=60_000), "same-name", MessagePath.of(length_score))
    run_until(ingress, lambda: r.xlen("filterd:out") >= 30)
    assert len({f[b"entry"] for _, f in r.xrange("filterd:out")}) == 30


def test_redis_restart_mid_run_loses_nothing(redis_server):
    r = redis_server.client()
    n = 3000
    pipe = r.pipeline()
    for i in range(n):
        pipe.xadd("filterd:in", {"text": f"message number {i}", "id": str(i)})
    pipe.execute()

    def restart_when_busy():
        import time

        while redis_server.client().xlen("filterd:out") < 300:
            time.sleep(0.01)
        redis_server.restart(downtime_s=1.0)

    ingress = RedisIngress(cfg(redis_server.url), "c1", MessagePath.of(length_score))

    def finished():
        try:
            c = redis_server.client()
            return c.xpending("filterd:in", "filterd")["pending"] == 0 and len({f[b"id"] for _, f in c.xrange("filterd:out")}) == n
        except Exception:
            return False

    run_until(ingress, finished, timeout=60, during=restart_when_busy)
    out_ids = [f[b"id"] for _, f in redis_server.client().xrange("filterd:out")]
    assert set(out_ids) == {str(i).encode() for i in range(n)}


def test_entry_that_keeps_failing_is_dead_lettered_after_max_deliveries(redis_server):
    r = redis_server.client()
    for text in ("fine", "poison", "also fine"):
        r.xadd("filterd:in", {"text": text})

    async def flaky(text: str) -> FakeScored:
        if text == "poison":
            raise RuntimeError("model failed")
        return await length_score(text)

    ingress = RedisIngress(cfg(redis_server.url, claim_idle_ms=50, max_deliveries=3), "c1", MessagePath.of(flaky))
    run_until(ingress, lambda: r.xlen("filterd:dead") >= 1 and r.xlen("filterd:out") >= 2)
    dead = r.xrange("filterd:dead")
    assert len(dead) == 1 and dead[0][1][b"text"] == b"poison" and dead[0][1][b"error"] == b"classify-failed"
    assert r.xpending("filterd:in", "filterd")["pending"] == 0
