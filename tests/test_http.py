"""The HTTP scan door (filterd/doors/http.py) over real sockets: Rspamd's /checkv2 and the legacy
RSPAMC line protocol Exim speaks, /ping, /classify, the bounds, the password. The scorer is a stub
that reads the P(spam) to return from the message ("SCORE=0.93"), so each level is reached on
purpose; the real model and batcher are in tests/e2e/test_serve_http.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from filterd.doors.path import MessagePath
from filterd.model.batcher import QueueFull
from filterd.config import check_config, load_config
from filterd.policy.decision import Policy
from filterd.errors import ConfigError
from filterd.doors.http import HttpDoor, HttpServer, rspamd_score
from filterd.obs.metrics import FilterdMetrics

from testing.services import free_port

LEVELS = ["policy.tag_score=0.5", "policy.subject_score=0.6", "policy.quarantine_score=0.7", "policy.discard_score=0.8",
          "policy.reject_score=0.9", "policy.soft_reject_score=0.4", "policy.allow_senders=[\"friend@example.org\"]",
          "policy.deny_recipients=[\"trap@example.com\"]"]  # fmt: skip


def mail(score: float | str, subject: str = "hello", mid: str = "m1@example.com") -> bytes:
    return (f"From: a@example.net\r\nTo: b@example.com\r\nSubject: {subject}\r\nMessage-ID: <{mid}>\r\n\r\n"
            f"body SCORE={score}\r\n").encode()  # fmt: skip


class Served:
    """An HttpServer on a free loopback port, its event loop in a thread, a stub scorer."""

    def __init__(self, *sets: str, behaviour: str = "score") -> None:
        self.cfg = load_config(None, ["http.enabled=true", f"http.listen=127.0.0.1:{free_port()}", *LEVELS, *sets])
        self.behaviour = behaviour
        self.metrics = FilterdMetrics()
        self.calls = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def score(self, text: str) -> SimpleNamespace:
        self.calls += 1
        if self.behaviour == "busy":
            raise QueueFull("full")
        if self.behaviour == "fail":
            raise RuntimeError("model exploded")
        if self.behaviour == "slow":
            await asyncio.sleep(0.5)
        p = float(re.search(r"SCORE=([0-9.]+)", text).group(1))
        return SimpleNamespace(score=p, model="stub-1", threshold=0.5)

    def __enter__(self) -> Served:
        self.thread.start()
        policy = Policy.from_config(self.cfg)
        door = HttpDoor(self.cfg.http, MessagePath.of(self.score, policy, metrics=self.metrics), policy, self.cfg.smtp.subject_prefix,
                        self.metrics)  # fmt: skip
        self.server = HttpServer(self.cfg.http, door)
        self.run(self.server.start())
        self.port = self.server.port
        return self

    def run(self, coro, timeout: float = 20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc) -> None:
        self.run(self.server.stop(drain_timeout=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def raw(self, data: bytes, *, timeout: float = 10) -> bytes:
        """Send bytes, read until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | list | None = None) -> tuple[int, dict, bytes]:
        items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in items) + "\r\n"
        return parse(self.raw(head.encode() + body))

    def checkv2(self, body: bytes, **headers: str) -> dict:
        status, _, data = self.request("POST", "/checkv2", body, {k.replace("_", "-"): v for k, v in headers.items()})
        assert status == 200, data
        return json.loads(data)


def parse(resp: bytes) -> tuple[int, dict, bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_checkv2_reply_shape_and_every_action_in_rspamds_words():
    with Served() as srv:
        expect = {0.1: ("no action", "pass"), 0.45: ("soft reject", "soft-reject"), 0.55: ("add header", "tag"),
                  0.65: ("rewrite subject", "subject"), 0.75: ("add header", "quarantine"),
                  0.85: ("reject", "discard"), 0.95: ("reject", "reject")}  # fmt: skip
        for p, (rspamd, ours) in expect.items():
            r = srv.checkv2(mail(p), From="<x@example.net>", Rcpt="<b@example.com>", IP="192.0.2.1", Helo="mx", Queue_Id="Q1")
            assert (r["action"], r["filterd"]["action"]) == (rspamd, ours), p
            assert r["required_score"] == 15.0 and r["is_skipped"] is False
            assert r["score"] == pytest.approx(rspamd_score(p, 0.5, 15.0), abs=1e-3)
            assert (r["score"] >= r["required_score"]) == (p >= 0.5)  # Exim's `spam = user` is true exactly for spam
            sym = r["symbols"]["FILTERD_GPT2"]
            assert sym["name"] == "FILTERD_GPT2" and sym["score"] == r["score"] and f"P(spam)={p:.4f}" in sym["description"]
            assert r["message-id"] == "m1@example.com" and r["filterd"]["model"] == "stub-1"
        r = srv.checkv2(mail(0.65, subject="cheap pills"))
        assert r["subject"] == "[SPAM] cheap pills"
        assert srv.metrics.actions.labels("http", "reject")._value.get() == 1
        assert srv.metrics.messages.labels("http", "spam")._value.get() == 6


def test_lists_skip_the_model():
    with Served() as srv:
        r = srv.checkv2(mail(0.99), From="<Friend@Example.org>", Rcpt="<b@example.com>")
        assert r["is_skipped"] is True and r["action"] == "no action" and r["score"] == 0.0
        r = srv.checkv2(mail(0.01), From="<x@example.net>", Rcpt="<b@example.com>, <trap@example.com>")
        assert r["action"] == "reject" and r["filterd"]["listed"] == "deny_recipients" and r["score"] >= 15
        assert srv.calls == 0


def test_ping_and_keep_alive():
    with Served() as srv:
        req = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(req)
            first = s.recv(65536)
            s.sendall(b"POST /checkv2 HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(mail(0.1)), mail(0.1)))
            second = b""
            while chunk := s.recv(65536):
                second += chunk
        status, headers, body = parse(first)
        assert (status, body, headers["connection"]) == (200, b"pong\r\n", "keep-alive")
        status, _, body = parse(second)
        assert status == 200 and json.loads(body)["action"] == "no action"


def test_classify_text_and_email():
    with Served() as srv:
        status, _, body = srv.request("POST", "/classify", json.dumps({"text": "win now SCORE=0.97"}).encode())
        r = json.loads(body)
        assert status == 200 and (r["verdict"], r["action"], r["score"], r["model"]) == ("spam", "reject", 0.97, "stub-1")
        assert r["reasons"] and r["threshold"] == 0.5
        email_b64 = base64.b64encode(mail(0.2)).decode()
        status, _, body = srv.request("POST", "/classify", json.dumps({"email": email_b64, "sender": "x@example.net",
                                                                        "recipients": ["b@example.com"]}).encode())  # fmt: skip
        assert status == 200 and json.loads(body)["verdict"] == "ham" and json.loads(body)["action"] == "pass"
        status, _, body = srv.request("POST", "/classify", json.dumps({"text": "x SCORE=0.9", "recipients": ["trap@example.com"]}).encode())
        assert json.loads(body)["listed"] == "deny_recipients"


@pytest.mark.parametrize("body, why", [
    (b"{not json", "not JSON"), (b"[1]", "JSON object"), (b'{"text": 1}', '"text"'), (b'{"email": "***"}', "base64"),
    (b'{"text": "a", "email": "YQ=="}', "exactly one"), (b'{"txt": "a"}', "unknown field"),
])  # fmt: skip
def test_classify_bad_json_is_400_with_a_one_line_json_error(body, why):
    with Served() as srv:
        status, headers, data = srv.request("POST", "/classify", body)
        assert status == 400 and headers["content-type"] == "application/json"
        assert why in json.loads(data)["error"] and data.count(b"\n") == 1


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400), (b"GET /ping HTTP/2\r\n\r\n", 400), (b"GET /ping HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"POST /checkv2 HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400), (b"GET /nope HTTP/1.0\r\n\r\n", 404),
    (b"GET /checkv2 HTTP/1.0\r\n\r\n", 405), (b"POST /checkv2 HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET /ping HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
])  # fmt: skip
def test_malformed_requests_get_an_error_never_a_traceback(request_bytes, status):
    with Served() as srv:
        got, _, body = parse(srv.raw(request_bytes))
        assert got == status and "error" in json.loads(body)


def test_body_over_max_body_bytes_is_413_without_reading_it():
    with Served("http.max_body_bytes=2048") as srv:
        status, headers, body = srv.request("POST", "/checkv2", mail(0.1) + b"x" * 4096)
        assert status == 413 and "max_body_bytes" in json.loads(body)["error"] and headers["connection"] == "close"
        chunked = b"POST /checkv2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(3))
        assert parse(srv.raw(chunked + b"0\r\n\r\n"))[0] == 413
        assert srv.calls == 0


def test_chunked_body_is_read():
    with Served() as srv:
        m = mail(0.95)
        req = b"POST /checkv2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        req += b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, m[:10], len(m) - 10, m[10:])
        status, _, body = parse(srv.raw(req))
        assert status == 200 and json.loads(body)["action"] == "reject"


def test_slow_client_gets_408():
    with Served("http.read_timeout=500ms") as srv:
        t0 = time.monotonic()
        status, _, body = parse(srv.raw(b"POST /checkv2 HTTP/1.1\r\nContent-Length: 100\r\n\r\npartial"))
        assert status == 408 and "read_timeout" in json.loads(body)["error"]
        assert time.monotonic() - t0 < 8  # generous: answered, not left hanging


def test_password_required_and_checked_but_not_for_ping():
    with Served('http.password="s3cret"') as srv:
        assert srv.request("POST", "/checkv2", mail(0.1))[0] == 401
        assert srv.request("POST", "/checkv2", mail(0.1), {"Password": "s3creT"})[0] == 403
        assert srv.request("POST", "/classify", b'{"text": "SCORE=0.1"}', {"Password": "wrong"})[0] == 403
        assert srv.request("POST", "/checkv2", mail(0.1), {"Password": "s3cret"})[0] == 200
        assert srv.request("GET", "/ping")[0] == 200
        assert srv.calls == 1


def test_off_loopback_without_password_is_refused_at_config_load():
    with pytest.raises(ConfigError, match=r"\[http\] password: required when \[http\] listen = \"0.0.0.0:11333\""):
        check_config(None, ["http.enabled=true", "http.listen=0.0.0.0:11333"])
    check_config(None, ["http.enabled=true", "http.listen=0.0.0.0:11333", 'http.password="x"'])  # with one: fine
    check_config(None, ["http.enabled=true", "smtp.enabled=false", "redis.enabled=false"])  # http alone is an ingress
    cfg = load_config(None, ['http.password="s3cret"'])
    assert "s3cret" not in cfg.to_toml() and 'password = "***"' in cfg.to_toml()
    with pytest.raises(ConfigError) as e:
        load_config(None, ['http.password="s3cret\\n"'])
    assert "s3cret" not in str(e.value)


def test_busy_is_503_with_retry_after_and_failure_is_500():
    with Served(behaviour="busy") as srv:
        status, headers, body = srv.request("POST", "/checkv2", mail(0.5))
        assert status == 503 and headers["retry-after"] == "1" and "busy" in json.loads(body)["error"]
    with Served(behaviour="fail") as srv:
        status, _, body = srv.request("POST", "/classify", b'{"text": "SCORE=0.5"}')
        assert status == 500 and json.loads(body) == {"error": "classification failed (RuntimeError)"}
        assert srv.metrics.messages.labels("http", "error")._value.get() == 1


def test_exim_variant_rspamd_request_gets_a_reply_exim_parses():
    """Byte for byte what Exim's spam.c sends for `spamd_address = ... variant=rspamd`, and its sscanf on the reply."""
    m = mail(0.95)
    req = (b"CHECK RSPAMC/1.3\r\nContent-length: %d\r\nQueue-Id: 1abcDE-000001-XY\r\nFrom: <x@example.net>\r\n"
           b"Recipient-Number: 2\r\nRcpt: <b@example.com>\r\nRcpt: <c@example.com>\r\nHelo: mx.example.net\r\n"
           b"IP: 192.0.2.7\r\n\r\n" % len(m)) + m  # fmt: skip
    with Served() as srv:
        reply = srv.raw(req)  # Exim reads until the server closes
        # "RSPAMD/%7s 0 EX_OK\r\nMetric: default; %7s %lf / %lf / %lf\r\n%n", then "Action: " up to \r
        got = re.match(rb"RSPAMD/(\S{1,7}) 0 EX_OK\r\nMetric: default; (\S{1,7}) ([-0-9.]+) / ([-0-9.]+) / ([-0-9.]+)\r\nAction: ([^\r]*)\r\n", reply)
        assert got, reply
        assert got.group(2) == b"True;" and float(got.group(3)) >= float(got.group(4)) == 15.0
        assert got.group(6) == b"reject" and b"Symbol: FILTERD_GPT2(" in reply
        ham = srv.raw(req.replace(b"SCORE=0.95", b"SCORE=0.05"))
        assert b"Metric: default; False; 1.50 / 15.00 / " in ham and b"Action: no action\r\n" in ham
        assert srv.raw(b"PING RSPAMC/1.3\r\n\r\n").startswith(b"RSPAMD/1.3 0 PONG")


def test_curl_as_an_independent_client():
    curl = subprocess.run(["which", "curl"], capture_output=True)
    if curl.returncode:
        pytest.skip("curl not installed")
    with Served('http.password="pw"') as srv:
        out = subprocess.run(["curl", "-sS", "--max-time", "10", "-H", "Password: pw", "-H", "From: x@example.net",
                              "-H", "Rcpt: b@example.com", "--data-binary", "@-", f"http://127.0.0.1:{srv.port}/checkv2"],
                             input=mail(0.75) + b"z" * 3000, capture_output=True, check=True)  # fmt: skip
        assert json.loads(out.stdout)["filterd"]["action"] == "quarantine"  # >1 KiB: curl sends Expect: 100-continue
        out = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{srv.port}/ping"], capture_output=True, check=True)
        assert out.stdout == b"pong\r\n"


def test_stop_drains_the_request_being_decided():
    with Served(behaviour="slow") as srv:
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=srv.request("POST", "/checkv2", mail(0.95))))
        t.start()
        deadline = time.monotonic() + 5
        while srv.server.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.run(srv.server.stop(drain_timeout=5))  # the reply still goes out
        t.join(10)
        assert result["r"][0] == 200 and json.loads(result["r"][2])["action"] == "reject"


def test_exim_snippet_matches_the_default_port_and_handles_every_action_we_send():
    from pathlib import Path

    from filterd.doors.http import RSPAMD_ACTION

    snippet = (Path(__file__).parent.parent / "deploy/exim/filterd.conf").read_text()
    assert f"spamd_address = 127.0.0.1 {load_config(None).http.listen.port} variant=rspamd" in snippet
    for word in set(RSPAMD_ACTION.values()):
        assert word in snippet, word
    assert "spam          = nobody:true/defer_ok" in snippet


def test_http_listen_clashing_with_metrics_is_refused():
    with pytest.raises(ConfigError, match=r"\[http\] listen: 127.0.0.1:9464 is also \[metrics\] listen"):
        check_config(None, ["http.enabled=true", "http.listen=127.0.0.1:9464"])


def test_off_loopback_with_password_warns_about_cleartext():
    cfg = check_config(None, ["http.enabled=true", "http.listen=0.0.0.0:11333", 'http.password="x"'])
    assert any(w.startswith('[http] listen = "0.0.0.0:11333" is not a loopback address: the Password header') for w in cfg.warnings())
    assert not any("[http]" in w for w in check_config(None, ["http.enabled=true"]).warnings())


def test_connections_over_max_connections_get_503_with_retry_after_and_close():
    with Served("http.max_connections=2") as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
        try:
            for s in held:  # both are in (a keep-alive request answered on each)
                s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                assert parse(s.recv(65536))[0] == 200
            body = mail(0.93) * 2000  # ~200 KB the server does not read: still a clean 503, not a reset
            status, headers, data = parse(srv.raw(b"POST /checkv2 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
            assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
            assert "too many connections" in json.loads(data)["error"]
            assert srv.calls == 0 and srv.server.refused == 1
            held[0].sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")  # the connections in are still served
            assert parse(held[0].recv(65536))[0] == 200
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while srv.request("GET", "/ping")[0] != 200:  # a freed place is taken again
            assert time.monotonic() < deadline, "the cap was not freed"
            time.sleep(0.05)
        assert srv.checkv2(mail(0.55))["action"] == "add header"


def test_request_latency_is_observed_for_scans_not_for_ping():
    with Served() as srv:
        srv.checkv2(mail(0.93))
        assert srv.request("POST", "/classify", b'{"text": "SCORE=0.2"}')[0] == 200
        assert srv.request("GET", "/ping")[0] == 200
        assert srv.request("POST", "/checkv2", b"no score here")[0] == 500  # a failed scan is a request too
        count = srv.metrics.registry.get_sample_value("filterd_request_seconds_count", {"source": "http"})
        assert count == 3


def test_read_timeout_is_one_deadline_for_request_line_head_and_body():
    """A client dribbling its request: closed with 408 at read_timeout from its first byte, not once per part."""
    with Served("http.read_timeout=2s") as srv:
        request = b"POST /checkv2 HTTP/1.1\r\n" + b"Host: x\r\nX-Pad: " + b"a" * 100 + b"\r\n\r\n"  # line done at ~1.4 s
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:

            def dribble() -> None:
                with contextlib.suppress(OSError):
                    for i in range(len(request)):
                        s.send(request[i : i + 1])
                        time.sleep(0.06)

            t0 = time.monotonic()
            threading.Thread(target=dribble, daemon=True).start()
            reply = s.recv(65536)
            elapsed = time.monotonic() - t0
        status, headers, body = parse(reply)
        assert status == 408 and "read_timeout" in json.loads(body)["error"] and headers["connection"] == "close"
        assert 1.8 < elapsed < 2.9, elapsed  # the old per-part timeouts answered at ~3.4 s


def zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def test_zstd_body_is_decompressed_and_scored_as_the_plain_one():
    with Served() as srv:
        plain = srv.checkv2(mail(0.93))
        for header in ("Compression", "Content-Encoding"):  # rspamc --compressed sends Compression: zstd
            status, _, body = srv.request("POST", "/checkv2", zstd(mail(0.93)), {header: "zstd"})
            r = json.loads(body)
            assert status == 200 and (r["score"], r["action"]) == (plain["score"], "reject")
            assert r["message-id"] == "m1@example.com"
        status, _, body = srv.request("POST", "/classify", zstd(b'{"text": "SCORE=0.2"}'), {"Compression": "zstd"})
        assert status == 200 and json.loads(body)["score"] == 0.2


def test_zstd_bomb_is_413_without_the_memory_and_bad_codings_are_refused():
    import resource

    import zstandard

    cobj = zstandard.ZstdCompressor().compressobj()  # streamed: the frame does not declare its size
    bomb = b"".join(cobj.compress(bytes(1 << 20)) for _ in range(1024)) + cobj.flush()  # 1 GiB of zeros
    declared = zstd(bytes(64 << 20))  # this one declares 64 MiB
    with Served("http.max_body_bytes=1048576") as srv:
        assert len(bomb) < 1 << 20 and len(declared) < 1 << 20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        for body in (bomb, declared):
            status, headers, data = srv.request("POST", "/checkv2", body, {"Compression": "zstd"})
            assert status == 413 and "max_body_bytes" in json.loads(data)["error"] and headers["connection"] == "close"
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 << 10  # far less than the 1 GiB
        for body in (b"not zstd at all", zstd(mail(0.9))[:-7], zstd(mail(0.9)) + b"junk"):  # garbage, cut, trailing junk
            status, _, data = srv.request("POST", "/checkv2", body, {"Compression": "zstd"})
            assert status == 400 and "zstd" in json.loads(data)["error"], body
        for header, value in (("Compression", "gzip"), ("Content-Encoding", "br"), ("Content-Encoding", "zstd, gzip")):
            status, _, data = srv.request("POST", "/checkv2", mail(0.9), {header: value})
            assert status == 415 and "not supported" in json.loads(data)["error"], value
        assert srv.request("POST", "/checkv2", mail(0.1), {"Content-Encoding": "identity"})[0] == 200
        assert srv.calls == 1  # nothing undecodable reached the model
