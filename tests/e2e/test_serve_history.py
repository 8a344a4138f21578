"""`filterd serve` with `[history] enabled`: the history file deleted while the daemon runs is started again
with the next verdict (the console shows it without a restart), and the new file is private."""

from __future__ import annotations

import asyncio
import json
import stat

from filterd.store.history import History

from testing.services import free_port
from tests.e2e.test_serve_http import http_daemon, post
from tests.e2e.test_serve_redis import wait_for


def _texts(path) -> list[str]:
    with History(path, writer=False) as h:
        return [v.text or "" for v in h.query()]


def test_a_history_deleted_while_serving_gets_the_next_verdict(tiny_model, tmp_path):
    path = tmp_path / "state" / "history.sqlite"
    port = free_port()
    d = http_daemon(tiny_model.model_dir, tmp_path, port, "history", history__enabled="true", history__path=str(path),
                    history__store_text="true").start()  # fmt: skip
    try:
        status, _ = asyncio.run(post(port, "/classify", json.dumps({"text": "before the file was deleted"}).encode()))
        assert status == 200
        wait_for(lambda: d.metric("filterd_history_written_total") == 1, timeout=30, what="the first verdict written")
        assert _texts(path) == ["before the file was deleted"]
        path.unlink()  # the operator clears the history; SQLite's -wal and -shm stay behind
        status, _ = asyncio.run(post(port, "/classify", json.dumps({"text": "after the file was deleted"}).encode()))
        assert status == 200
        wait_for(lambda: d.metric("filterd_history_written_total") == 2, timeout=30, what="the second verdict written")
        wait_for(path.exists, timeout=10, what="a new history file")
        assert _texts(path) == ["after the file was deleted"]  # the console reads it while the daemon runs
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.glob("history.sqlite*")}
        assert modes and set(modes.values()) == {0o600}, modes
        dropped = d.metric("filterd_history_dropped_total")
    finally:
        assert d.stop() == 0
    assert dropped == 0
    assert _texts(path) == ["after the file was deleted"]
    assert "was deleted or replaced" in (tmp_path / "filterd-history.log").read_text()
