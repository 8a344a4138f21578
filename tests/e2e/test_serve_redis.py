"""`filterd serve` over a real redis-server: completeness, crashes, restarts, reloads, metrics, batching."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from filterd.model.weights import publish_directory, staging_dir
from trainer.data import read_sms

from testing.daemon import FilterdProcess

N = 2000


@pytest.fixture(scope="module")
def sms_texts(sms_file) -> list[str]:
    return [e.text for e in read_sms(sms_file)[:N]]


def add_all(r, texts: list[str], start: int = 0) -> None:
    pipe = r.pipeline(transaction=False)
    for i, t in enumerate(texts, start):
        pipe.xadd("filterd:in", {"text": t.encode(), "id": str(i)})
    pipe.execute()


def results(r) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange("filterd:out")]


def wait_for(cond, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def complete(r, n: int):
    return lambda: len({x["id"] for x in results(r)}) >= n and r.xpending("filterd:in", "filterd")["pending"] == 0


def test_2000_messages_scores_match_classify(redis_server, tiny_model, sms_texts, tmp_path):
    r = redis_server.client()
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "filterd.log").start()
    try:
        add_all(r, sms_texts)
        wait_for(complete(r, N), what="2000 results")
    finally:
        assert d.stop() == 0
    out = results(r)
    assert len(out) == N and sorted(int(x["id"]) for x in out) == list(range(N))
    cli = subprocess.run([sys.executable, "-m", "filterd", "classify", "--model", str(tiny_model.model_dir)],
                         input="\n".join(sms_texts).encode(), capture_output=True, check=True)  # fmt: skip
    expected = [json.loads(line)["score"] for line in cli.stdout.splitlines()]
    assert len(expected) == N
    worst = max(abs(float(x["score"]) - expected[int(x["id"])]) for x in out)
    print(f"max |daemon - classify| score difference over {N}: {worst:.2e}")
    assert worst <= 1e-4


def test_kill_9_then_restart_loses_nothing(redis_server, tiny_model, sms_texts, tmp_path):
    r = redis_server.client()
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "a.log", redis__claim_idle_ms=1000,
                       batching__max_batch_size=16).start()  # fmt: skip
    add_all(r, sms_texts)
    wait_for(lambda: r.xlen("filterd:out") >= 500, what="500 results")
    d.stop(signal.SIGKILL)
    at_kill = r.xlen("filterd:out")
    d2 = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "b.log", redis__claim_idle_ms=1000).start()
    try:
        wait_for(complete(r, N), what="all results after restart")
    finally:
        assert d2.stop() == 0
    ids = [x["id"] for x in results(r)]
    duplicates = len(ids) - len(set(ids))
    print(f"kill -9 at {at_kill} results; after restart {len(ids)} results, {duplicates} duplicates")
    assert set(ids) == {str(i) for i in range(N)}
    assert duplicates <= 2 * 64  # only what was in flight: at most two chunks of COUNT entries


def test_two_processes_share_the_group(redis_server, tiny_model, sms_texts, tmp_path):
    r = redis_server.client()
    ds = [FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / f"{i}.log", redis__count=16).start() for i in range(2)]
    try:
        add_all(r, sms_texts)
        wait_for(complete(r, N), what="results from two consumers")
        per_process = [d.metric("filterd_messages_total") for d in ds]
    finally:
        assert [d.stop() for d in ds] == [0, 0]
    ids = [x["id"] for x in results(r)]
    assert len(ids) == len(set(ids)) == N
    print(f"two consumers: {per_process[0]:.0f} + {per_process[1]:.0f} messages")
    assert all(n > 0 for n in per_process) and sum(per_process) == N


def test_redis_restart_mid_run(redis_server, tiny_model, sms_texts, tmp_path):
    r = redis_server.client()
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "f.log", batching__max_batch_size=8).start()
    try:
        add_all(r, sms_texts)
        wait_for(lambda: r.xlen("filterd:out") >= 300, what="300 results")
        redis_server.restart(downtime_s=1.5)
        r = redis_server.client()
        wait_for(complete(r, N), what="results after redis restart")
        assert d.get("/healthz")[0] == 200
    finally:
        assert d.stop() == 0
    assert {x["id"] for x in results(r)} == {str(i) for i in range(N)}
    assert "connection lost" in (tmp_path / "f.log").read_text()


def test_hot_reload_while_flowing_and_corrupt_model_refused(redis_server, tiny_model, sms_texts, tmp_path):
    import shutil

    live = tmp_path / "current"
    shutil.copytree(tiny_model.model_dir, live)
    r = redis_server.client()
    d = FilterdProcess(live, redis_server.url, tmp_path / "h.log", batching__max_batch_size=8).start()
    try:
        old = tiny_model.meta.version
        assert f'version="{old}"' in d.get("/metrics")[1]
        stop = threading.Event()

        def produce():
            i = 0
            while not stop.is_set():
                r.xadd("filterd:in", {"text": sms_texts[i % N], "id": str(i)})
                i += 1
                time.sleep(0.002)

        t = threading.Thread(target=produce)
        t.start()
        time.sleep(0.5)
        # a new version: same weights, new metadata version, published atomically
        staged = staging_dir(live)
        shutil.copytree(tiny_model.model_dir, staged, dirs_exist_ok=True)
        meta = json.loads((staged / "filterd.json").read_text())
        meta["version"] = "reloaded-v2"
        (staged / "filterd.json").write_text(json.dumps(meta))
        publish_directory(staged, live)
        wait_for(lambda: 'version="reloaded-v2"' in d.get("/metrics")[1], timeout=30, what="reload")
        time.sleep(0.5)
        # a corrupt model: truncated weights
        staged = staging_dir(live)
        shutil.copytree(live, staged, dirs_exist_ok=True)
        data = (staged / "model.safetensors").read_bytes()
        (staged / "model.safetensors").write_bytes(data[: len(data) // 3])
        meta["version"] = "corrupt-v3"
        (staged / "filterd.json").write_text(json.dumps(meta))
        publish_directory(staged, live)
        wait_for(lambda: d.metric('filterd_model_reloads_total{outcome="failed"}') >= 1, timeout=30, what="refusal")
        time.sleep(0.5)
        stop.set()
        t.join()
        sent = int(r.xlen("filterd:in"))
        wait_for(complete(r, sent), what="results for everything sent")
        text = d.get("/metrics")[1]
        assert 'version="reloaded-v2"' in text and "corrupt-v3" not in text
        assert d.metric('filterd_messages_total{source="redis",verdict="error"}') == 0
        assert d.metric('filterd_model_reloads_total{outcome="ok"}') == 1
    finally:
        assert d.stop() == 0
    models = {x["model"] for x in results(r)}
    assert models == {old, "reloaded-v2"}


def test_metrics_after_traffic_and_promtool(redis_server, tiny_model, sms_texts, tmp_path):
    r = redis_server.client()
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "m.log").start()
    try:
        add_all(r, sms_texts[:200])
        r.xadd("filterd:in", {"no_text": "1"})
        wait_for(complete(r, 200), what="200 results")
        d.proc.send_signal(signal.SIGHUP)  # a reload, so reloads_total{outcome="ok"} has a sample
        wait_for(lambda: d.metric('filterd_model_reloads_total{outcome="ok"}') >= 1, what="SIGHUP reload")
        text = d.get("/metrics")[1]
    finally:
        assert d.stop() == 0
    for name in ("filterd_messages_total", "filterd_classify_seconds", "filterd_inference_seconds", "filterd_batch_size",
                 "filterd_batch_tokens", "filterd_padding_ratio", "filterd_queue_depth", "filterd_spam_score",
                 "filterd_model_info", "filterd_model_reloads_total", "filterd_smtp_replies_total",
                 "filterd_dead_letters_total"):  # fmt: skip
        assert re.search(rf"^# TYPE {name} ", text, re.M), name
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_64_concurrent_single_message_callers_are_batched(redis_server, tiny_model, sms_texts, tmp_path):
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "c.log").start()
    try:
        barrier = threading.Barrier(64)
        done: dict[bytes, threading.Event] = {}
        latencies: list[float] = []
        stop = threading.Event()

        def collector() -> None:  # one reader of the result stream wakes the waiting callers
            c, last = redis_server.client(), "0"
            while not stop.is_set():
                for _, entries in c.xread({"filterd:out": last}, block=100) or []:
                    for entry_id, f in entries:
                        last = entry_id
                        done.setdefault(f[b"entry"], threading.Event()).set()

        def caller(i: int) -> None:
            c = redis_server.client()
            barrier.wait()
            t0 = time.perf_counter()
            entry = c.xadd("filterd:in", {"text": sms_texts[i], "id": str(i)})
            assert done.setdefault(entry, threading.Event()).wait(30)
            latencies.append(time.perf_counter() - t0)

        watcher = threading.Thread(target=collector)
        watcher.start()
        for _ in range(3):  # three waves of 64 callers, one message each
            threads = [threading.Thread(target=caller, args=(i,)) for i in range(64)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            barrier.reset()
        stop.set()
        watcher.join()
        mean = d.metric("filterd_batch_size_sum") / d.metric("filterd_batch_size_count")
    finally:
        assert d.stop() == 0
    print(f"64 concurrent callers x 3: mean batch size {mean:.1f}, max latency {max(latencies) * 1000:.0f} ms")
    assert mean > 8
