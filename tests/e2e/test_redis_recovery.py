"""`filterd serve` over a real redis-server when things go wrong (issue 12, points 7, 8, 10, 12).

kill -9 with entries in flight, the stream deleted under it, a key of the wrong type, a wrong
password, an ACL that forbids writing results. Each either recovers by itself or exits 1 with one
line saying why; none leaves a running process that answers nothing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from testing.daemon import FilterdProcess
from tests.e2e.test_serve_redis import add_all, results, wait_for


def spawn(d: FilterdProcess) -> subprocess.Popen:
    argv = [sys.executable, "-m", "filterd", "serve"]
    for k, v in d.sets.items():
        argv += ["--set", f"{k}={v}"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def exits(d: FilterdProcess, timeout: float = 60) -> tuple[int, str]:
    """Run filterd to its exit: (exit status, last line of stderr)."""
    p = spawn(d)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"filterd still running after {timeout}s: {err.decode()[-2000:]}") from None
    lines = [line for line in err.decode().splitlines() if line.strip()]
    return p.returncode, lines[-1] if lines else ""


def pending(r) -> int:
    return r.xpending("filterd:in", "filterd")["pending"]


def test_kill_9_twice_then_every_entry_answered_within_30s(redis_server, tiny_model, tmp_path):
    """Old code: a restart was a new consumer (hostname-pid) and waited claim_idle_ms (60 s) per 64 entries."""
    r = redis_server.client()
    n = 0
    for cycle in range(2):
        add_all(r, [f"crash recovery message {i} " + "word " * (i % 40) for i in range(n, n + 300)], start=n)
        n += 300
        d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / f"k{cycle}.log", batching__max_batch_size=4).start()
        wait_for(lambda: pending(r) >= 50, timeout=30, what="entries in flight")
        in_flight = pending(r)
        d.stop(signal.SIGKILL)
        d2 = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / f"r{cycle}.log").start()
        t0 = time.monotonic()
        try:
            wait_for(lambda n=n: len({x["id"] for x in results(r)}) >= n and pending(r) == 0, timeout=30, what="all results")
            print(f"cycle {cycle}: {in_flight} in flight at kill -9, all answered {time.monotonic() - t0:.1f}s after ready")
        finally:
            assert d2.stop() == 0
    assert {x["id"] for x in results(r)} == {str(i) for i in range(n)}
    assert len(r.xinfo_consumers("filterd:in", "filterd")) <= 1  # a stable name, removed on clean exit


def test_stream_deleted_under_a_running_daemon(redis_server, tiny_model, tmp_path):
    r = redis_server.client()
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "d.log").start()
    try:
        add_all(r, ["first message"])
        wait_for(lambda: r.xlen("filterd:out") >= 1, what="first result")
        r.delete("filterd:in")
        time.sleep(0.5)
        ids = [r.xadd("filterd:in", {"text": f"after the deletion {i}", "id": f"a{i}"}) for i in range(10)]
        wait_for(lambda: {f[b"entry"] for _, f in r.xrange("filterd:out")} >= set(ids), timeout=20, what="answers after deletion")
        assert d.get("/healthz")[0] == 200
    finally:
        assert d.stop() == 0
    assert "is gone" in (tmp_path / "d.log").read_text()


def test_wrong_type_exits_1_with_one_line(redis_server, tiny_model, tmp_path):
    """Old code: the ingress task died silently, the process stayed up with /healthz 503 forever."""
    redis_server.client().set("filterd:in", "x")
    rc, line = exits(FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "w.log"))
    assert rc == 1, line
    assert "redis-ingress failed" in line and "WRONGTYPE" in line


def test_wrong_password_exits_1_with_one_line(redis_server, tiny_model, tmp_path):
    redis_server.client().config_set("requirepass", "s3cret")
    url = f"redis://:wrong@127.0.0.1:{redis_server.port}/0"
    rc, line = exits(FilterdProcess(tiny_model.model_dir, url, tmp_path / "p.log"))
    assert rc == 1, line
    assert "failed" in line and ("WRONGPASS" in line or "invalid username-password" in line)
    assert ":wrong@" not in line  # the password is never printed


def test_acl_forbidding_result_writes_stops_reading_and_says_so(redis_server, tiny_model, tmp_path):
    """Old code: /healthz stayed 200, no error counted, and every entry was read and left pending."""
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "filterd", "on", ">pw", "~filterd:in", "~filterd:dead", "&*", "+@all")
    url = f"redis://filterd:pw@127.0.0.1:{redis_server.port}/0"
    d = FilterdProcess(tiny_model.model_dir, url, tmp_path / "a.log").start()
    try:
        add_all(admin, [f"message {i}" for i in range(300)])
        wait_for(lambda: d.get("/healthz")[0] == 503, timeout=20, what="/healthz 503")
        status, body = d.get("/healthz")
        assert "refused" in body and "xadd" in body.lower(), body
        assert d.metric('filterd_redis_errors_total{error="noperm",op="write"}') >= 1
        assert d.metric('filterd_ingress_up{ingress="redis"}') == 0
        add_all(admin, [f"message {i}" for i in range(300, 400)], start=300)
        time.sleep(0.5)  # a read blocked when the refusal came may still take one chunk; then reading stops
        lag = admin.xinfo_groups("filterd:in")[0]["lag"]
        time.sleep(1.0)
        assert lag >= 100 - 64 and admin.xinfo_groups("filterd:in")[0]["lag"] == lag  # the new ones wait in the stream
        assert admin.xlen("filterd:out") == 0
        admin.execute_command("ACL", "SETUSER", "filterd", "~*")  # the operator fixes the ACL
        wait_for(lambda: len({x["id"] for x in results(admin)}) == 400 and pending(admin) == 0, timeout=60, what="results")
        wait_for(lambda: d.get("/healthz")[0] == 200, timeout=10, what="/healthz 200")
        assert d.metric('filterd_ingress_up{ingress="redis"}') == 1
        wait_for(
            lambda: d.metric('filterd_stream_backlog{group="filterd",stream="filterd:in"}') == 0, timeout=15, what="backlog 0"
        )
    finally:
        assert d.stop() == 0
    assert len(results(admin)) == 400  # nothing doubled


def test_backlog_gauge_sees_the_whole_stream(redis_server, tiny_model, tmp_path):
    """Old code: only filterd_queue_depth, bounded by what one process holds (<= 448 for a 3,784 backlog)."""
    r = redis_server.client()
    add_all(r, [f"backlog message {i} " + "x " * 50 for i in range(20000)])
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "b.log", batching__max_batch_size=1).start()
    try:
        labels = '{group="filterd",stream="filterd:in"}'
        wait_for(lambda: d.metric(f"filterd_stream_backlog{labels}") > 10000 and d.metric(f"filterd_stream_pending{labels}") > 0,
                 timeout=15, what="backlog and pending gauges")  # fmt: skip
        assert d.metric("filterd_queue_depth") <= 512  # what one process holds: the old, only, signal
        text = d.get("/metrics")[1]
        assert "process_resident_memory_bytes" in text and 'filterd_ingress_up{ingress="redis"} 1.0' in text
    finally:
        assert d.stop() == 0
