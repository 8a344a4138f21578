"""The reservoir of classified texts: bounded uniform sample, 0600, purge by age, restarts, the daemon's writer."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat

import pytest

from filterd.errors import DataError
from filterd.obs.metrics import FilterdMetrics
from filterd.store.reservoir import MAX_TEXT_CHARS, Reservoir, ReservoirWriter, read_reservoir

DAY = 86400.0


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _ids(path) -> list[int]:
    return sorted(int(s.text.split()[1]) for s in read_reservoir(path, now=0))


def test_bounded_uniform_sample_and_0600(tmp_path):
    path = tmp_path / "sub" / "reservoir.sqlite"
    clock = Clock()
    with Reservoir(path, size=100, max_age=30 * DAY, clock=clock, seed=1) as r:
        for start in range(0, 10_000, 500):  # 20 batches, as the daemon's writer hands them over
            r.add_many((f"message {i}", "smtp", None) for i in range(start, start + 500))
        assert len(r) == 100 and r.window == 10_000 and r.total == 10_000
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    ids = _ids(path)
    assert len(set(ids)) == 100
    # Uniform over the whole stream: about 25 in each quarter (a first-100 or last-100 sample fails this).
    quarters = [sum(q * 2500 <= i < (q + 1) * 2500 for i in ids) for q in range(4)]
    assert all(10 <= q <= 40 for q in quarters), quarters


def test_running_count_survives_reopen(tmp_path):
    """Half the stream before a restart, half after: the sample still spans both halves evenly."""
    path = tmp_path / "r.sqlite"
    with Reservoir(path, size=100, max_age=30 * DAY, clock=Clock(), seed=2) as r:
        r.add_many((f"message {i}", "redis", None) for i in range(5000))
    with Reservoir(path, size=100, max_age=30 * DAY, clock=Clock(), seed=3) as r:
        assert r.window == 5000  # restarting from 0 would let the next 100 texts replace nearly everything
        r.add_many((f"message {i}", "redis", None) for i in range(5000, 10_000))
        assert len(r) == 100 and r.window == 10_000
    first_half = sum(i < 5000 for i in _ids(path))
    assert 30 <= first_half <= 70, first_half


def test_purge_by_age_and_the_window_follows(tmp_path):
    path = tmp_path / "r.sqlite"
    clock = Clock()
    with Reservoir(path, size=50, max_age=DAY, clock=clock, seed=4) as r:
        r.add_many((f"old {i}", "smtp", clock.now - 2 * DAY) for i in range(30))  # arrived before max_age
        r.add_many((f"new {i}", "smtp", None) for i in range(10))
        assert len(r) == 40
        clock.now += 61  # purges run on add, at most once a minute
        r.add_many([("new 10", "redis", None)])
        assert len(r) == 11 and r.window == 11  # the old ones left the sample and its running count
        clock.now += 2 * DAY
        assert r.purge() == 11 and len(r) == 0 and r.window == 0
        r.add_many((f"again {i}", "smtp", None) for i in range(60))
        assert len(r) == 50  # slots freed by the purge are filled again, the bound holds


def test_reader_skips_texts_past_max_age_and_rejects_other_files(tmp_path):
    path = tmp_path / "r.sqlite"
    clock = Clock()
    with Reservoir(path, size=10, max_age=DAY, clock=clock) as r:
        r.add_many([("kept", "smtp", None), ("stale", "redis", clock.now - 2 * DAY)])  # not purged yet
    assert [s.text for s in read_reservoir(path, now=clock.now)] == ["kept"]
    other = tmp_path / "labels.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE labels (id TEXT)").connection.commit()
    with pytest.raises(DataError, match="labels.sqlite: not a reservoir"):
        list(read_reservoir(other))
    with pytest.raises(DataError, match="not a reservoir"):
        Reservoir(other, size=10, max_age=DAY)
    (tmp_path / "junk").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(DataError, match="junk: not a usable reservoir"):
        Reservoir(tmp_path / "junk", size=10, max_age=DAY)
    with pytest.raises(DataError, match="no such reservoir file"):
        list(read_reservoir(tmp_path / "missing.sqlite"))
    assert not (tmp_path / "missing.sqlite").exists()


def test_texts_are_clipped_and_cleaned(tmp_path):
    from trainer.data import MAX_TEXT_CHARS as STORE_MAX

    assert MAX_TEXT_CHARS == STORE_MAX  # capped like the label store
    path = tmp_path / "r.sqlite"
    with Reservoir(path, size=10, max_age=DAY) as r:
        r.add_many([("x" * (MAX_TEXT_CHARS + 500), "smtp", None), ("lone \ud800 surrogate", "redis", None)])
        with pytest.raises(ValueError, match="unknown source"):
            r.add_many([("text", "console", None)])  # every door's texts are taken (filterd.sources); nothing else
    texts = sorted(s.text for s in read_reservoir(path))
    assert texts == ["lone \ufffd surrogate", "x" * MAX_TEXT_CHARS]


def test_writer_never_blocks_drops_when_full_and_survives_write_errors(tmp_path, caplog):
    async def scenario() -> tuple[FilterdMetrics, Reservoir]:
        metrics = FilterdMetrics()
        reservoir = Reservoir(tmp_path / "r.sqlite", size=100, max_age=DAY)
        writer = ReservoirWriter(reservoir, metrics, max_queue=5)
        for i in range(8):  # no writer running: the queue fills, the rest are dropped at once
            writer.offer(f"text {i}", "smtp")
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        await asyncio.sleep(0.2)
        assert len(reservoir) == 5
        reservoir._db.execute("DROP TABLE texts")  # a broken file: writes fail from now on
        for i in range(3):
            writer.offer(f"lost {i}", "redis")
            await asyncio.sleep(0.05)
        assert not task.done()  # the writer lives on
        stop.set()
        await task
        await writer.close()
        return metrics, reservoir

    with caplog.at_level(logging.ERROR, logger="filterd"):
        metrics, _ = asyncio.run(scenario())
    value = metrics.registry.get_sample_value
    assert value("filterd_reservoir_written_total") == 5
    assert value("filterd_reservoir_dropped_total", {"reason": "queue-full"}) == 3
    assert value("filterd_reservoir_dropped_total", {"reason": "write-error"}) == 3
    errors = [r.getMessage() for r in caplog.records if "reservoir: write failed" in r.getMessage()]
    assert len(errors) == 1, errors  # once a minute, not once per batch


def test_deleting_the_file_is_safe(tmp_path):
    """The operator deletes the reservoir while the daemon runs: the next writes start a new file."""
    path = tmp_path / "r.sqlite"
    clock = Clock()
    with Reservoir(path, size=10, max_age=DAY, clock=clock) as r:
        r.add_many([("before", "smtp", None)])
        for p in tmp_path.iterdir():
            p.unlink()
        clock.now += 61
        r.add_many([("after", "smtp", None)])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [s.text for s in read_reservoir(path, now=clock.now)] == ["after"]


def test_a_lower_size_shrinks_the_file_at_start(tmp_path):
    path = tmp_path / "r.sqlite"
    with Reservoir(path, size=50, max_age=DAY, seed=5) as r:
        r.add_many((f"message {i}", "smtp", None) for i in range(50))
    with Reservoir(path, size=10, max_age=DAY, seed=6) as r:
        assert len(r) == 10
        r.add_many((f"message {i}", "smtp", None) for i in range(50, 100))
        assert len(r) == 10
    assert len(set(_ids(path))) == 10 and max(_ids(path)) > 9  # a random 10, not the first 10
