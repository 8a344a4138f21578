"""The label intake against a real redis-server: stored then acked, dead letters, claims after a crash, restarts."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis.asyncio.client
from redis.exceptions import ConnectionError as RedisConnectionError

from filterd.config import RedisConfig, TrainerConfig
from filterd.obs.metrics import TrainerMetrics
from trainer.intake import IntakeUnavailable, LabelIntake, parse_entry
from filterd.store.labels import LabelStore, message_id

STREAM, DEAD, GROUP = "filterd:labels", "filterd:dead", "filterd-trainer"
MAIL = b"From: a@example.org\nSubject: Cheap meds\nContent-Type: text/plain\n\nBuy now, 90% off!\n"


def configs(url: str, **redis_kw) -> tuple[RedisConfig, TrainerConfig]:
    return RedisConfig(url=url, block_ms=100, **redis_kw), TrainerConfig()


@pytest.fixture
def store(tmp_path):
    with LabelStore(tmp_path / "labels.sqlite") as s:
        yield s


def pending(r) -> int:
    return r.xpending(STREAM, GROUP)["pending"]


def add_labels(r, n: int, start: int = 0) -> list[str]:
    texts = [f"label stream message number {i}" for i in range(start, start + n)]
    for i, text in enumerate(texts):
        r.xadd(STREAM, {"label": "spam" if i % 2 else "ham", "text": text})
    return texts


def run_until(intake: LabelIntake, done, timeout: float = 20.0, during=None) -> None:
    """Run the intake until done() is true, calling during() once in a thread (e.g. to restart Redis)."""

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(intake.run(stop))
        if during:
            threading.Thread(target=during, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(done):
            assert time.monotonic() < deadline, "timed out"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_parse_entry():
    assert parse_entry(b"1-0", {b"label": b"spam", b"text": b"hi"}).text == "hi"
    assert parse_entry(b"1-0", {b"label": b" Ham\n", b"text": b"hi"}).label == "ham"
    assert "Cheap meds" in parse_entry(b"1-0", {b"label": b"spam", b"email": MAIL}).text
    reasons = {
        "missing-label": {b"text": b"hi"},
        "unknown-label": {b"label": b"junk", b"text": b"hi"},
        "missing-text": {b"label": b"spam", b"id": b"7"},
        "invalid-utf8": {b"label": b"spam", b"text": b"\xff\xfe"},
        "empty-text": {b"label": b"ham", b"text": b" \n "},
    }
    for reason, fields in reasons.items():
        assert parse_entry(b"1-0", fields).error == reason
    assert parse_entry(b"1-0", {b"label": b"ham", b"email": b"Subject:\n\n\n"}).error == "empty-text"


def test_stored_acked_and_dead_lettered(redis_server, store):
    r = redis_server.client()
    entries = [
        {"label": "spam", "text": "WIN a free cruise, reply YES", "id": "sms-1"},
        {"label": "junk", "text": "what label is this", "id": "sms-2"},
        {"label": "ham", "text": "see you at 6?"},
        {"label": "spam", "email": MAIL},
        {"text": "no label at all"},
        {"label": "ham", "id": "sms-3"},
        {"label": "ham", "text": b"\xff not utf-8"},
        {"label": "spam", "text": "   "},
        {"label": "ham", "text": "WIN a free cruise,  reply YES"},  # the first one, re-labelled
    ]
    for e in entries:
        r.xadd(STREAM, e)  # before the group exists: it is created from "0", nothing is skipped
    metrics = TrainerMetrics()
    intake = LabelIntake(*configs(redis_server.url), store, metrics=metrics, consumer="t1")
    assert asyncio.run(intake.drain_once(10)) == len(entries)

    assert store.counts() == {"spam": 1, "ham": 2} and store.flips() == 1
    assert store.get(message_id("WIN a free cruise, reply YES")).source == "redis"
    assert pending(r) == 0
    dead = [fields for _, fields in r.xrange(DEAD)]
    assert [d[b"error"] for d in dead] == [b"unknown-label", b"missing-label", b"missing-text", b"invalid-utf8", b"empty-text"]
    assert all(d[b"stream"] == STREAM.encode() for d in dead)
    assert dead[0][b"id"] == b"sms-2" and dead[0][b"text"] == b"what label is this" and dead[3][b"text"] == b"\xff not utf-8"
    assert metrics.labels.labels("spam")._value.get() == 2 and metrics.labels.labels("ham")._value.get() == 2
    assert asyncio.run(intake.drain_once(10)) == 0

    # and as a service: new entries flow while bad ones are dead-lettered
    texts = add_labels(r, 10)
    r.xadd(STREAM, {"label": "maybe", "text": "x"})
    run_until(intake, lambda: len(store) == 3 + 10 and pending(r) == 0)
    assert all(store.get(message_id(t)) for t in texts)
    assert r.xlen(DEAD) == 6


def test_claim_after_crash_and_redelivery_is_harmless(redis_server, store):
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    texts = add_labels(r, 6)
    # consumer A read three entries and died before acknowledging them; it had stored two of them already
    read = r.xreadgroup(GROUP, "A", {STREAM: ">"}, count=3)[0][1]
    assert len(read) == 3 and pending(r) == 3
    for i in (0, 1):
        store.add(texts[i], "spam" if i % 2 else "ham", "redis")

    b = LabelIntake(*configs(redis_server.url), store, consumer="B", claim_idle_ms=300)
    assert asyncio.run(b.drain_once(10)) == 3  # the three unread ones; A's are not idle long enough yet
    assert pending(r) == 3 and r.xpending_range(STREAM, GROUP, "-", "+", 10)[0]["consumer"] == b"A"
    time.sleep(0.4)
    assert asyncio.run(b.drain_once(10)) == 3  # claimed from A and finished
    assert pending(r) == 0
    assert len(store) == 6 and store.flips() == 0 and store.last_seq() == 6  # the redelivered two changed nothing

    # a consumer that comes back finishes its own pending entries first, idle or not
    more = add_labels(r, 2, start=6)
    assert len(r.xreadgroup(GROUP, "A", {STREAM: ">"}, count=2)[0][1]) == 2
    a = LabelIntake(*configs(redis_server.url), store, consumer="A", claim_idle_ms=60_000)
    assert asyncio.run(a.drain_once(10)) == 2 and pending(r) == 0
    assert all(store.get(message_id(t)) for t in more)


def test_killed_between_commit_and_ack(redis_server, store, monkeypatch):
    """The store commit comes first: losing the XACK (kill -9, Redis gone) means a harmless redelivery."""
    r = redis_server.client()
    texts = add_labels(r, 4)
    real_execute = redis.asyncio.client.Pipeline.execute

    async def lost(self, *args, **kwargs):
        raise RedisConnectionError("connection lost before EXEC")

    monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", lost)
    intake = LabelIntake(*configs(redis_server.url), store, consumer="k")
    with pytest.raises(IntakeUnavailable, match="connection lost"):
        asyncio.run(intake.drain_once(10))
    assert len(store) == 1 and pending(r) == 1  # the first chunk (one entry: sizes unknown yet) stored, not acknowledged

    monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", real_execute)
    assert asyncio.run(intake.drain_once(10)) == 4  # its own pending entries, delivered again
    assert pending(r) == 0 and len(store) == 4 and store.last_seq() == 4
    assert {row.text for row in store.rows()} == set(texts)


def test_redis_restart_loses_nothing(redis_server, store, monkeypatch):
    r = redis_server.client()
    first = add_labels(r, 20)
    slow_add_many = store.add_many
    monkeypatch.setattr(store, "add_many", lambda items: (time.sleep(0.05), slow_add_many(items))[1])  # 5 per 50 ms
    intake = LabelIntake(*configs(redis_server.url), store, consumer="svc", count=5)
    restarted = threading.Event()
    stored_at_restart = []

    def restart_then_add():
        with LabelStore(store.path) as reader:  # mid-stream: some labels in, some still waiting
            while len(reader) < 5:
                time.sleep(0.01)
            stored_at_restart.append(len(reader))
        redis_server.restart(downtime_s=0.5)  # AOF: the stream, the group and its acks survive
        add_labels(redis_server.client(), 20, start=20)
        restarted.set()

    def done() -> bool:
        return restarted.is_set() and len(store) == 40 and pending(redis_server.client()) == 0

    run_until(intake, done, timeout=25, during=restart_then_add)
    assert 5 <= stored_at_restart[0] < 20
    assert {row.text for row in store.rows()} == set(first) | {f"label stream message number {i}" for i in range(20, 40)}
    info = redis_server.client().xinfo_groups(STREAM)[0]
    assert info["pending"] == 0 and info["last-delivered-id"] == redis_server.client().xrevrange(STREAM, count=1)[0][0]


def test_a_label_stream_of_the_wrong_type_is_fatal(redis_server, store):
    """The service raises a one-line StreamError (the supervisor exits 1); drain_once reports it and stores nothing."""
    from filterd.net.streams import StreamError

    r = redis_server.client()
    r.set(STREAM, "not a stream")
    intake = LabelIntake(*configs(redis_server.url), store, consumer="w")
    with pytest.raises(StreamError, match="WRONGTYPE") as e:
        asyncio.run(asyncio.wait_for(intake.run(asyncio.Event()), 10))
    assert "\n" not in str(e.value)
    with pytest.raises(IntakeUnavailable, match="WRONGTYPE"):
        asyncio.run(intake.drain_once(5))
    assert len(store) == 0
