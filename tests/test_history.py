"""The verdict history (filterd/store/history.py) on real SQLite files, and the doors that record into it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import stat
import time
from types import SimpleNamespace

import pytest

from filterd.doors.path import MessagePath
from filterd.policy.decision import Decision, Message
from filterd.store.history import Filter, History, HistoryWriter, subject_of
from filterd.doors.milter import MilterDoor, MilterMessage
from filterd.obs.metrics import FilterdMetrics

from tests.test_http import Served, mail

EXPLANATION = {"score": 0.97, "method": "occlusion", "words": [{"word": "FREE", "start": 0, "end": 4, "weight": 0.41}]}


def row(i: int, *, at: float | None = None, verdict: str = "spam", source: str = "smtp", action: str = "tag") -> dict:
    return {"at": time.time() if at is None else at, "source": source, "ref": f"Q{i}", "sender": f"s{i}@example.net",
            "recipients": ("a@example.com", "b@example.com"), "subject": f"subject {i}", "score": 0.9 if verdict == "spam" else 0.1,
            "verdict": verdict, "action": action, "model": "v1", "listed": "", "explanation": json.dumps(EXPLANATION),
            "text": f"text {i}"}  # fmt: skip


def dropped(metrics: FilterdMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("filterd_history_dropped_total", {"reason": reason}) or 0.0


def test_rows_filters_paging_and_a_private_file(tmp_path):
    path = tmp_path / "sub" / "history.sqlite"
    t0 = time.time() - 1000
    with History(path) as h:
        h.add_many([row(i, verdict="spam" if i % 2 else "ham", source="redis" if i % 3 == 0 else "smtp",
                        action="tag" if i % 2 else "pass", at=t0 + i) for i in range(1, 11)])  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # addresses and subjects: not world-readable
        assert len(h) == 10
        newest = h.query(Filter(limit=4))
        assert [v.id for v in newest] == [10, 9, 8, 7]
        assert [v.id for v in h.query(Filter(limit=4, before=7))] == [6, 5, 4, 3]  # paging by id
        assert {v.verdict for v in h.query(Filter(verdict="spam"))} == {"spam"}
        assert [v.id for v in h.query(Filter(source="redis"))] == [9, 6, 3]
        assert [v.id for v in h.query(Filter(action="pass", since=t0 + 4, until=t0 + 9))] == [8, 6, 4]
        v = h.get(5)
        assert v is not None and v.ref == "Q5" and v.recipients == ("a@example.com", "b@example.com")
        assert v.explanation == EXPLANATION and v.text == "text 5" and v.subject == "subject 5"
        assert h.get(99) is None
    with History(path, writer=False) as reader:  # the console's side: read-only
        assert len(reader) == 10


def test_retention_by_row_count_and_by_age(tmp_path):
    now = [10_000_000.0]
    with History(tmp_path / "h.sqlite", max_rows=5, max_age_days=1, clock=lambda: now[0]) as h:
        h.add_many([row(i, at=now[0] - 2 * 86400) for i in range(3)])  # two days old
        assert len(h) == 0  # purged in the same write: older than max_age_days
        h.add_many([row(i, at=now[0]) for i in range(8)])
        h.purge()
        assert len(h) == 5 and [v.ref for v in h.query()][-1] == "Q3"  # the newest five kept


def test_subject_is_decoded_and_missing_or_broken_headers_cost_nothing():
    assert subject_of(b"Subject: =?utf-8?q?caf=C3=A9?= au\r\n lait\r\n\r\nbody") == "caf\u00e9 au lait"
    assert subject_of(b"From: a@b\r\n\r\n") == ""
    assert subject_of(b"\xff\xfe garbage") == ""


async def _drain(writer: HistoryWriter) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    await asyncio.sleep(0.2)
    stop.set()
    await task


def test_writer_keeps_the_text_only_when_store_text_is_on(tmp_path):
    d = Decision("spam", "tag", 0.93, ("score",), 0.5)
    message = Message("smtp", "x@example.net", ("y@example.com",))
    head = b"Subject: Win <b>now</b>\r\nFrom: x@example.net\r\n\r\n"
    for store_text in (False, True):
        path = tmp_path / f"h-{store_text}.sqlite"

        async def go(path=path, store_text=store_text) -> None:
            writer = HistoryWriter(History(path), FilterdMetrics(), store_text=store_text)
            writer.record("smtp", message, d, "v7", "quarantine", ref="ABC123", text="Win now", head=head, explanation=EXPLANATION)
            await _drain(writer)
            await writer.close()

        asyncio.run(go())
        with History(path, writer=False) as h:
            (v,) = h.query()
        assert (v.source, v.ref, v.sender, v.recipients, v.subject) == ("smtp", "ABC123", "x@example.net", ("y@example.com",),
                                                                        "Win <b>now</b>")  # fmt: skip
        assert (v.score, v.verdict, v.action, v.model, v.explanation) == (0.93, "spam", "quarantine", "v7", EXPLANATION)
        assert v.text == ("Win now" if store_text else None)


def test_a_failed_write_is_logged_and_counted_and_never_reaches_the_caller(tmp_path, caplog):
    metrics = FilterdMetrics()
    d = Decision("ham", "pass", 0.1, ("score",), 0.5)

    async def go() -> None:
        history = History(tmp_path / "h.sqlite")
        writer = HistoryWriter(history, metrics, max_queue=2)
        history.close()  # the file's connection is gone: every write fails
        for _ in range(3):  # the third one finds the queue full
            writer.record("redis", Message("redis"), d, "v1", ref="1-0", text="hello")
        await _drain(writer)

    with caplog.at_level(logging.ERROR, logger="filterd"):
        asyncio.run(go())
    assert dropped(metrics, "queue-full") == 1
    assert dropped(metrics, "write-error") == 2
    assert any("history: write failed, 2 verdicts not recorded" in r.getMessage() for r in caplog.records)


def test_http_door_records_each_decision_with_the_envelope(tmp_path):
    metrics = FilterdMetrics()
    with Served() as s:
        writer = HistoryWriter(History(tmp_path / "h.sqlite"), metrics, store_text=True)
        s.server.door.path.history = writer
        status, _, _ = s.request("POST", "/checkv2", mail(0.95, subject="cheap pills"),
                                 {"From": "spammer@example.net", "Rcpt": "a@example.com", "Queue-Id": "4XyZ"})  # fmt: skip
        assert status == 200
        status, _, _ = s.request("POST", "/classify", json.dumps({"text": "hi SCORE=0.1"}).encode())
        assert status == 200
        s.run(_drain(writer))
        s.run(writer.close())
    with History(tmp_path / "h.sqlite", writer=False) as h:
        ham, spam = h.query()
    assert (spam.source, spam.ref, spam.sender, spam.recipients, spam.subject) == ("http", "4XyZ", "spammer@example.net",
                                                                                   ("a@example.com",), "cheap pills")  # fmt: skip
    assert (spam.verdict, spam.score, spam.model) == ("spam", 0.95, "stub-1") and "SCORE=0.95" in spam.text
    assert (ham.verdict, ham.action, ham.text) == ("ham", "pass", "hi SCORE=0.1")


def test_milter_door_records_the_queue_id_and_the_action_it_took(tmp_path):
    from filterd.config import load_config
    from filterd.policy.decision import Policy

    cfg = load_config(None, ["milter.enabled=true", "policy.reject_score=0.9"])

    async def score(text: str) -> SimpleNamespace:
        return SimpleNamespace(score=0.97, model="stub-2", threshold=0.5)

    async def go() -> None:
        writer = HistoryWriter(History(tmp_path / "h.sqlite"), FilterdMetrics())
        door = MilterDoor(cfg.milter, MessagePath.of(score, Policy.from_config(cfg)), "[SPAM] ")
        door.path.history = writer
        msg = MilterMessage(sender="bad@example.net", recipients=["u@example.com"], queue_id="3F2A1",
                            header_lines=[b"Subject: buy now", b"From: bad@example.net"], body=b"buy now\r\n")  # fmt: skip
        await door.on_message(msg)
        await _drain(writer)
        await writer.close()

    asyncio.run(go())
    with History(tmp_path / "h.sqlite", writer=False) as h:
        (v,) = h.query()
    assert (v.source, v.ref, v.sender, v.subject, v.action, v.model, v.text) == (
        "milter", "3F2A1", "bad@example.net", "buy now", "reject", "stub-2", None)


@pytest.mark.parametrize("sets, error", [
    (["console.enabled=true", "console.listen=0.0.0.0:11334"], "[console] password: required"),
    (["console.grafana_url=javascript:alert(1)"], "must be an http(s) URL"),
    (["history.max_rows=0"], "[history] max_rows"),
])  # fmt: skip
def test_config_refuses_an_open_console_and_bad_values(sets, error):
    from filterd.config import check_config
    from filterd.errors import ConfigError

    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        check_config(None, sets)


def test_an_unusable_history_file_or_console_port_is_a_one_line_start_failure(tmp_path):
    import socket
    import subprocess
    import sys

    from testing.services import free_port

    base = [sys.executable, "-m", "filterd", "serve", "--set", "smtp.enabled=false", "--set", "redis.enabled=false",
            "--set", "http.enabled=true", "--set", f"http.listen=127.0.0.1:{free_port()}",
            "--set", f"metrics.listen=127.0.0.1:{free_port()}", "--set", f"model.path={tmp_path / 'none'}"]  # fmt: skip
    (tmp_path / "file").write_text("")
    r = subprocess.run(base + ["--set", "history.enabled=true", "--set", f"history.path={tmp_path / 'file' / 'h.sqlite'}"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("filterd: error: [history] path: "), r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(base + ["--set", "console.enabled=true", "--set", f"console.listen=127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"filterd: error: cannot listen on 127.0.0.1:{port} for the console: address already in use"), r.stderr


def test_an_explanation_object_is_stored_as_its_json_and_a_broken_one_as_none(tmp_path):
    class Explained:  # the shape of filterd.model.explain.Explanation
        def to_json(self) -> dict:
            return EXPLANATION

    d = Decision("spam", "tag", 0.97, ("score",), 0.5)

    async def go() -> None:
        writer = HistoryWriter(History(tmp_path / "h.sqlite"), FilterdMetrics())
        writer.record("redis", Message("redis"), d, "v1", ref="1-0", explanation=Explained())
        writer.record("redis", Message("redis"), d, "v1", ref="2-0", explanation={"score": float("nan"), "words": [object()]})
        await _drain(writer)
        await writer.close()

    asyncio.run(go())
    with History(tmp_path / "h.sqlite", writer=False) as h:
        broken, ok = h.query()
    assert ok.explanation == EXPLANATION and broken.explanation is None and broken.ref == "2-0"


def test_smtp_door_records_the_relayed_decision_with_the_text_the_model_read(tmp_path):
    from testing.smtp_sink import SmtpSink
    from tests.test_smtp_ingress import message, send, serve, smtp_cfg

    with SmtpSink() as sink:

        async def body(ingress) -> None:
            writer = HistoryWriter(History(tmp_path / "h.sqlite"), FilterdMetrics(), store_text=True)
            ingress.handler.path.history = writer
            assert (await send(ingress.port, message("You are a winner", "claim your prize")))[0] == 250
            assert (await send(ingress.port, message("minutes", "see attached"), rcpts=("c@example.net", "d@example.net")))[0] == 250
            await _drain(writer)
            await writer.close()

        serve(smtp_cfg(sink))(body)
    with History(tmp_path / "h.sqlite", writer=False) as h:
        ham, spam = h.query()
    assert (spam.source, spam.sender, spam.recipients, spam.subject, spam.verdict, spam.action, spam.model) == (
        "smtp", "a@example.org", ("b@example.net",), "You are a winner", "spam", "tag", "v-test")
    assert "claim your prize" in spam.text
    assert (ham.verdict, ham.recipients, ham.subject) == ("ham", ("c@example.net", "d@example.net"), "minutes")


def _modes(path) -> dict[str, int]:
    """The mode of the history file and of SQLite's -wal and -shm beside it (those that exist)."""
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.glob(path.name + "*")}


@pytest.mark.parametrize("leftovers", [False, True], ids=["file-only", "with-wal-and-shm"])
def test_a_history_file_deleted_while_writing_is_started_again(tmp_path, leftovers):
    """The operator removes the history under a running daemon: the next batch goes into a new file, not the deleted one."""
    path = tmp_path / "h.sqlite"
    with History(path) as h:
        h.add_many([row(1)])
        assert (tmp_path / "h.sqlite-wal").exists()
        for p in tmp_path.glob("h.sqlite*") if leftovers else [path]:
            p.unlink()
        assert h.add_many([row(2), row(3)]) == 2
        assert _modes(path)["h.sqlite"] == 0o600
        with History(path, writer=False) as reader:  # the console, while the daemon still holds its connection
            assert [v.ref for v in reader.query()] == ["Q3", "Q2"]
        h.add_many([row(4)])
    with History(path, writer=False) as reader:
        assert [v.ref for v in reader.query()] == ["Q4", "Q3", "Q2"]


def test_the_written_metric_counts_only_verdicts_that_reached_the_file(tmp_path):
    metrics = FilterdMetrics()
    d = Decision("ham", "pass", 0.1, ("score",), 0.5)
    state = tmp_path / "state"
    path = state / "h.sqlite"

    def written() -> float:
        return metrics.registry.get_sample_value("filterd_history_written_total") or 0.0

    async def until(check, what: str) -> None:
        for _ in range(200):
            if check():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    async def go() -> None:
        writer = HistoryWriter(History(path), metrics)
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        writer.record("redis", Message("redis"), d, "v1", ref="1-0")
        await until(lambda: written() == 1, "the first verdict")
        path.unlink()
        writer.record("redis", Message("redis"), d, "v1", ref="2-0")
        await until(lambda: written() == 2, "the second verdict")
        with History(path, writer=False) as h:
            assert [v.ref for v in h.query()] == ["2-0"]
        shutil.rmtree(state)
        state.write_text("")  # the directory cannot come back: the verdict is lost, and counted as lost
        writer.record("redis", Message("redis"), d, "v1", ref="3-0")
        await until(lambda: dropped(metrics, "write-error") == 1, "the failed write")
        assert written() == 2
        stop.set()
        await task
        await writer.close()

    asyncio.run(go())


def test_a_world_readable_history_and_its_wal_and_shm_are_made_private(tmp_path, caplog):
    path = tmp_path / "h.sqlite"
    with History(path) as h:
        h.add_many([row(1)])
    os.chmod(path, 0o644)  # as an older filterd, or a copy, may have left it
    other = sqlite3.connect(path)  # keeps -wal and -shm open; SQLite creates them with the main file's mode
    other.execute("SELECT COUNT(*) FROM verdicts").fetchone()
    assert _modes(path) == {"h.sqlite": 0o644, "h.sqlite-wal": 0o644, "h.sqlite-shm": 0o644}
    try:
        with caplog.at_level(logging.WARNING, logger="filterd"), History(path) as h:
            h.add_many([row(2)])
            assert _modes(path) == {"h.sqlite": 0o600, "h.sqlite-wal": 0o600, "h.sqlite-shm": 0o600}
    finally:
        other.close()
    fixed = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(fixed) == 1 and fixed[0].startswith(f"{path}: was readable by others (file 0644, "), fixed
    assert "-shm 0644" in fixed[0] and fixed[0].endswith("made it 0600"), fixed  # -wal: SQLite fixes an empty one itself
    os.chmod(path, 0o644)  # no -wal or -shm this time: SQLite must create them private
    with History(path) as h:
        h.add_many([row(3)])
        assert _modes(path) == {"h.sqlite": 0o600, "h.sqlite-wal": 0o600, "h.sqlite-shm": 0o600}
