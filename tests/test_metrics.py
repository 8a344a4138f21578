"""Metrics: the names/types/labels of INTERFACES.md, promtool's verdict, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from filterd.obs.metrics import FilterdMetrics, MetricsServer, TrainerMetrics

PROMTOOL = "/usr/bin/promtool"

# The "Metrics" table of INTERFACES.md: name -> (type, label names).
FILTERD = {
    "filterd_messages_total": ("counter", {"source", "verdict"}),
    "filterd_classify_seconds": ("histogram", {"source"}),
    "filterd_inference_seconds": ("histogram", set()),
    "filterd_batch_size": ("histogram", set()),
    "filterd_batch_tokens": ("histogram", set()),
    "filterd_padding_ratio": ("histogram", set()),
    "filterd_queue_depth": ("gauge", set()),
    "filterd_spam_score": ("histogram", set()),
    "filterd_model_info": ("gauge", {"version", "base", "device", "dtype"}),
    "filterd_model_reloads_total": ("counter", {"outcome"}),
    "filterd_smtp_replies_total": ("counter", {"code"}),
    "filterd_dead_letters_total": ("counter", {"reason"}),
    "filterd_actions_total": ("counter", {"source", "action"}),
}
TRAINER = {
    "filterd_trainer_labels_total": ("counter", {"label"}),
    "filterd_trainer_refits_total": ("counter", {"outcome"}),
    "filterd_trainer_last_refit_timestamp_seconds": ("gauge", set()),
    "filterd_trainer_eval_accuracy": ("gauge", {"split", "model"}),
    "filterd_trainer_eval_ham_fpr": ("gauge", {"split", "model"}),
    "filterd_trainer_eval_spam_recall": ("gauge", {"split", "model"}),
    "filterd_trainer_refit_seconds": ("histogram", set()),
    "filterd_trainer_dataset_size": ("gauge", {"label"}),
}


def _traffic(m: FilterdMetrics) -> FilterdMetrics:
    m.prime(["smtp", "redis"])
    m.set_model("v1", "gpt2", "cpu", "float32")
    m.set_model("v2", "gpt2-medium", "cuda", "float16")
    m.observe_batch(size=4, padded_tokens=400, real_tokens=300, seconds=0.02)
    m.observe_result(source="smtp", verdict="spam", score=0.97, seconds=0.03)
    m.observe_result(source="redis", verdict="ham", score=0.01, seconds=0.004)
    m.observe_result(source="redis", verdict="error", score=None, seconds=0.5)
    m.queue_depth.set(3)
    m.model_reloads.labels("ok").inc()
    m.smtp_replies.labels("250").inc()
    m.dead_letters.labels("empty_text").inc()
    return m


def _trainer() -> TrainerMetrics:
    t = TrainerMetrics()
    t.count_label("spam", 3)
    t.count_label("ham")
    t.observe_refit("promoted", 42.0, now=1_700_000_000.0)
    t.observe_refit("failed", 1.0)
    t.set_eval("test", "candidate", accuracy=0.98, ham_fpr=0.01, spam_recall=0.95)
    t.set_eval("test", "current", accuracy=0.97, ham_fpr=0.02, spam_recall=0.93)
    t.set_dataset_size("ham", 1000)
    t.set_dataset_size("spam", 1000)
    return t


def _labels_by_metric(text: str) -> dict[str, set[str]]:
    """Label names seen per metric, with histogram sample suffixes and `le` folded away."""
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = re.sub(r"_(bucket|count|sum)$", "", sample.name)
            seen.setdefault(name, set()).update(set(sample.labels) - {"le"})
    return seen


def _assert_contract(text: str, table: dict[str, tuple[str, set[str]]]) -> None:
    labels = _labels_by_metric(text)
    for name, (kind, label_names) in table.items():
        assert f"# TYPE {name} {kind}\n" in text, f"{name} is not exposed as a {kind}"
        key = name if name in labels else re.sub(r"_total$", "", name)
        assert labels.get(key) == label_names, f"{name}: labels {labels.get(key)} != {label_names}"


def _promtool(exposition: bytes, promtool: str = PROMTOOL) -> None:
    """Fail (never skip) without promtool: CI installs it, and a skipped check would pass unnoticed."""
    if not Path(promtool).exists():
        pytest.fail(f"{promtool} is missing: install it with `apt-get install prometheus`")
    proc = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert proc.returncode == 0, f"promtool check metrics failed:\n{proc.stdout.decode()}{proc.stderr.decode()}"


def test_missing_promtool_fails_with_install_hint():
    with pytest.raises(pytest.fail.Exception, match="apt-get install prometheus"):
        _promtool(b"", promtool="/nonexistent/promtool")


# --- FilterdMetrics / TrainerMetrics ----------------------------------------------------------------


def test_filterd_exposition_matches_interfaces():
    m = _traffic(FilterdMetrics())
    text = generate_latest(m.registry).decode()
    _assert_contract(text, FILTERD)
    assert "filterd_trainer_" not in text  # the trainer's metrics live on the trainer's endpoint


def test_model_info_has_exactly_one_series():
    m = _traffic(FilterdMetrics())
    families = text_string_to_metric_families(generate_latest(m.registry).decode())
    series = [s for f in families for s in f.samples if s.name == "filterd_model_info"]
    assert len(series) == 1
    assert series[0].labels == {"version": "v2", "base": "gpt2-medium", "device": "cuda", "dtype": "float16"}
    assert series[0].value == 1.0


def test_observations_land_where_expected():
    m = _traffic(FilterdMetrics())
    reg = m.registry
    assert reg.get_sample_value("filterd_messages_total", {"source": "redis", "verdict": "error"}) == 1.0
    assert reg.get_sample_value("filterd_messages_total", {"source": "smtp", "verdict": "ham"}) == 0.0  # primed
    assert reg.get_sample_value("filterd_model_reloads_total", {"outcome": "failed"}) == 0.0  # primed
    assert reg.get_sample_value("filterd_spam_score_count") == 2.0  # the error has no score
    assert reg.get_sample_value("filterd_classify_seconds_count", {"source": "redis"}) == 2.0
    assert reg.get_sample_value("filterd_padding_ratio_sum") == pytest.approx(0.25)
    assert reg.get_sample_value("filterd_batch_tokens_bucket", {"le": "512.0"}) == 1.0
    m.on_batch(1, 64, 64, 0.001)  # the batcher's observer hooks
    m.on_depth(7)
    assert reg.get_sample_value("filterd_batch_size_count") == 2.0
    assert reg.get_sample_value("filterd_padding_ratio_bucket", {"le": "0.0"}) == 1.0
    assert reg.get_sample_value("filterd_queue_depth") == 7.0
    with pytest.raises(ValueError):
        m.observe_result(source="smtp", verdict="maybe", score=0.5, seconds=0.1)


def test_actions_per_door_primed_with_the_policys_actions_then_counted():
    m = FilterdMetrics()
    m.prime(["smtp", "redis"], {"smtp": ["pass", "tag", "reject", "accept-unknown"], "redis": ["pass", "tag"]})
    reg = m.registry
    value = lambda s, a: reg.get_sample_value("filterd_actions_total", {"source": s, "action": a})
    assert value("smtp", "reject") == 0.0 and value("redis", "tag") == 0.0  # primed
    assert value("redis", "reject") is None  # not a series the redis door can ever have
    m.count_action("smtp", "reject")
    m.count_action("smtp", "reject")
    m.count_action("redis", "pass")
    assert (value("smtp", "reject"), value("redis", "pass"), value("smtp", "pass")) == (2.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        m.count_action("smtp", "bounce")  # a fixed set: each value is a series
    every = FilterdMetrics()
    every.prime(["redis"])  # no policy given: every action
    assert every.registry.get_sample_value("filterd_actions_total", {"source": "redis", "action": "soft-reject"}) == 0.0


def test_two_instances_do_not_clash():
    a, b = FilterdMetrics(), FilterdMetrics()  # would raise "Duplicated timeseries" on a shared registry
    a.messages.labels("smtp", "spam").inc()
    assert a.registry is not b.registry
    assert b.registry.get_sample_value("filterd_messages_total", {"source": "smtp", "verdict": "spam"}) is None
    TrainerMetrics(), TrainerMetrics()


def test_promtool_accepts_filterd_exposition():
    _promtool(generate_latest(_traffic(FilterdMetrics()).registry))


def test_trainer_exposition_matches_interfaces_and_promtool():
    t = _trainer()
    text = generate_latest(t.registry)
    _assert_contract(text.decode(), TRAINER)
    _promtool(text)
    # The failed refit after the promoted one does not move the timestamp.
    assert t.registry.get_sample_value("filterd_trainer_last_refit_timestamp_seconds") == 1_700_000_000.0
    assert t.registry.get_sample_value("filterd_trainer_refits_total", {"outcome": "rejected"}) == 0.0


def test_trainer_textfile_is_accepted_by_promtool(tmp_path):
    path = tmp_path / "filterd_trainer.prom"
    _trainer().write_textfile(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    _promtool(path.read_bytes())
    with pytest.raises(ValueError, match=r"\.prom"):
        _trainer().write_textfile(tmp_path / "metrics.txt")


# --- MetricsServer -----------------------------------------------------------------------------------


async def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def _get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n".encode()


def _serve(scenario, health=lambda: (True, "")) -> None:
    """Run `scenario(server)` against a MetricsServer on 127.0.0.1:0 with a short read timeout."""

    async def main() -> None:
        m = _traffic(FilterdMetrics())
        server = MetricsServer(("127.0.0.1", 0), m.registry, health, timeout=0.3)
        await server.start()
        try:
            assert server.port != 0
            await scenario(server)
        finally:
            await server.stop()

    asyncio.run(main())


def test_server_metrics():
    async def scenario(server: MetricsServer) -> None:
        status, headers, body = await _exchange(server.port, _get("/metrics?x=1"))
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE_LATEST
        assert int(headers["content-length"]) == len(body)
        assert b"# TYPE filterd_messages_total counter" in body
        status, headers, body = await _exchange(server.port, _get("/metrics", "HEAD"))
        assert (status, body) == (200, b"") and int(headers["content-length"]) > 0

    _serve(scenario)


def test_server_healthz_follows_the_health_callable():
    state = {"ok": True}

    async def scenario(server: MetricsServer) -> None:
        assert (await _exchange(server.port, _get("/healthz")))[::2] == (200, b"ok\n")
        state["ok"] = False
        assert (await _exchange(server.port, _get("/healthz")))[::2] == (503, b"no model loaded\n")

    _serve(scenario, health=lambda: (state["ok"], "no model loaded"))


def test_server_healthz_is_503_when_the_health_callable_raises():
    def broken() -> tuple[bool, str]:
        raise RuntimeError("redis gone")

    async def scenario(server: MetricsServer) -> None:
        status, _, body = await _exchange(server.port, _get("/healthz"))
        assert status == 503 and b"redis gone" in body

    _serve(scenario, health=broken)


def test_server_rejects_what_it_does_not_serve():
    async def scenario(server: MetricsServer) -> None:
        assert (await _exchange(server.port, _get("/nope")))[0] == 404
        status, headers, _ = await _exchange(server.port, _get("/metrics", "POST"))
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert (await _exchange(server.port, b"\x16\x03\x01 garbage\r\n\r\n"))[0] == 400  # e.g. TLS to a plain port
        assert (await _exchange(server.port, b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n"))[0] == 400
        huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 10_000 + b"\r\n\r\n"
        assert (await _exchange(server.port, huge))[0] == 431
        many = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: aaaaaaaaaa\r\n" * 1000 + b"\r\n"
        assert (await _exchange(server.port, many))[0] == 431
        assert (await _exchange(server.port, b"\x00" * 200_000))[0] == 431  # binary flood, no newline at all

    _serve(scenario)


def test_server_drops_a_silent_client_after_the_timeout():
    async def scenario(server: MetricsServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        start = time.monotonic()
        raw = await asyncio.wait_for(reader.read(), 5)  # returns once the server hangs up
        elapsed = time.monotonic() - start
        writer.close()
        assert 0.2 < elapsed < 2.0
        assert raw.startswith(b"HTTP/1.1 408 ")
        # ...and a slow client doesn't hold it: the next scrape is answered at once.
        assert (await _exchange(server.port, _get("/metrics")))[0] == 200

    _serve(scenario)


def test_server_stop_closes_open_connections():
    async def main() -> None:
        server = MetricsServer(("127.0.0.1", 0), FilterdMetrics().registry, lambda: (True, ""), timeout=30)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.sleep(0.05)  # let the server accept it
        await asyncio.wait_for(server.stop(), 2)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()

    asyncio.run(main())


def test_stream_metrics_and_process_collector():
    """Issue 12, point 12: backlog, pending, ingress up, Redis errors, process_* (none existed before)."""
    m = FilterdMetrics()
    m.prime(["redis"])
    m.on_stream_stats("filterd:in", "filterd", 3784, 448)
    m.on_stream_up("redis", True)
    m.on_redis_error("write", "oom")
    text = generate_latest(m.registry).decode()
    assert 'filterd_stream_backlog{group="filterd",stream="filterd:in"} 3784.0' in text
    assert 'filterd_stream_pending{group="filterd",stream="filterd:in"} 448.0' in text
    assert 'filterd_ingress_up{ingress="redis"} 1.0' in text
    assert 'filterd_redis_errors_total{error="oom",op="write"} 1.0' in text
    assert "process_resident_memory_bytes" in text and "python_info" in text
    t = TrainerMetrics()
    t.on_stream_stats("filterd:labels", "filterd-trainer", 5, 1)
    assert 'filterd_stream_backlog{group="filterd-trainer",stream="filterd:labels"} 5.0' in generate_latest(t.registry).decode()


def test_request_latency_per_door_reaches_postfixs_milter_timeouts():
    from filterd.obs.metrics import REQUEST_BUCKETS, UNLISTED_METRICS

    m = FilterdMetrics()
    m.prime(["smtp", "milter", "http"])
    reg = m.registry
    count = lambda s: reg.get_sample_value("filterd_request_seconds_count", {"source": s})
    assert (count("milter"), count("http"), count("smtp")) == (0.0, 0.0, None)  # primed for the two doors it times
    m.observe_request("milter", 0.02)
    m.observe_request("http", 45.0)  # a p99 near Postfix's 30 s / 300 s must read as a number, not "> 10 s"
    bucket = lambda s, le: reg.get_sample_value("filterd_request_seconds_bucket", {"source": s, "le": le})
    assert (bucket("http", "30.0"), bucket("http", "60.0"), bucket("milter", "0.025")) == (0.0, 1.0, 1.0)
    assert REQUEST_BUCKETS[-1] == 300.0 and list(REQUEST_BUCKETS) == sorted(REQUEST_BUCKETS)
    with pytest.raises(ValueError):
        m.observe_request("smtp", 1.0)  # the content filter has filterd_classify_seconds and its SMTP replies
    text = generate_latest(reg).decode()
    assert "# TYPE filterd_request_seconds histogram\n" in text and UNLISTED_METRICS["filterd_request_seconds"] == "histogram"
    _promtool(text.encode())
