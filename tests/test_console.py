"""The web console (filterd/console/) served on loopback over a real history file and label store: the
password, cross-site request protection, escaping, and the pages; in headless Chromium where a browser
is what is being tested (scripts that must not run, a form posted from another site)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import re
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

from filterd.config import load_config
from filterd.console import Console, highlight
from filterd.store.history import History

from testing.services import free_port
from tests.test_http import parse

CHROMIUM = "/usr/bin/chromium"
XSS = '<script>document.title="pwned";window.pwned=1</script><img src=x onerror="window.pwned=2">&amp; "quoted"'
EXPLANATION = {"score": 0.97, "method": "test", "words": [{"word": "FREE", "start": 4, "end": 8, "weight": 0.5},
                                                          {"word": "meeting", "start": 20, "end": 27, "weight": -0.2}]}  # fmt: skip
TEXT = "Get FREE money now, meeting at noon"


def rows(at: float) -> list[dict]:
    base = {"at": at, "source": "smtp", "ref": "Q1", "sender": "a@example.net", "recipients": ("b@example.com",),
            "subject": "hello", "score": 0.97, "verdict": "spam", "action": "tag", "model": "v-test", "listed": ""}  # fmt: skip
    return [
        {**base, "explanation": json.dumps(EXPLANATION), "text": TEXT},  # 1: text stored, explained
        {**base, "ref": "Q2", "subject": XSS, "sender": XSS, "explanation": None, "text": XSS},  # 2: hostile
        {**base, "ref": "1700000000000-0", "source": "redis", "verdict": "ham", "score": 0.02, "action": "pass",
         "explanation": json.dumps(EXPLANATION), "text": None},  # 3: no text stored  # fmt: skip
    ]


class ConsoleServed:
    """A Console on a free loopback port, its event loop in a thread; a stub scorer (the model is not under test here)."""

    def __init__(self, tmp_path: Path, *sets: str, explain=None) -> None:
        self.explain = explain
        self.port = free_port()
        self.store = tmp_path / "labels.sqlite"
        self.cfg = load_config(None, ["console.enabled=true", f"console.listen=127.0.0.1:{self.port}", "history.enabled=true",
                                      f"history.path={tmp_path / 'history.sqlite'}", f"trainer.store={self.store}",
                                      f"trainer.models_dir={tmp_path / 'models'}", "console.grafana_url=http://grafana.example:3000/d/filterd", *sets])  # fmt: skip
        with History(self.cfg.history.path) as h:
            h.add_many(rows(time.time()))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def score(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(score=0.25, model="stub", threshold=0.5)

    def __enter__(self) -> ConsoleServed:
        self.thread.start()
        self.console = Console(self.cfg, lambda: "v-test", self.score, self.explain)
        self.run(self.console.start())
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def run(self, coro, timeout: float = 20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc) -> None:
        self.run(self.console.stop(drain_timeout=2))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict, bytes]:
        import socket

        headers = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        head = f"{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(head.encode() + body)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return parse(out)

    def session(self, path: str = "/verdict/1", **headers: str) -> tuple[str, str]:
        """A session cookie and the form token a page of this console gives it."""
        status, h, body = self.request("GET", path, headers=headers)
        assert status == 200, body
        cookie = h["set-cookie"].split(";")[0]
        token = re.search(rb'name="csrf" value="([0-9a-f]+)"', body)[1].decode()
        return cookie, token

    def labels(self) -> list[tuple]:
        if not self.store.exists():
            return []
        from filterd.store.labels import LabelStore

        with LabelStore(self.store) as s:
            return [(r.label, r.source, r.text) for r in s.rows()]


def basic(password: str, user: str = "admin") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_highlight_marks_words_by_sign_and_escapes_everything_else():
    out = highlight("<b>FREE</b> & meeting", [{"start": 3, "end": 7, "weight": 0.9}, {"start": 14, "end": 21, "weight": -0.1},
                                              {"start": 5, "end": 6, "weight": 0.5}, {"start": 90, "end": 99, "weight": 1}])  # fmt: skip
    assert out == ('&lt;b&gt;<mark class="up3" title="+0.9000">FREE</mark>&lt;/b&gt; &amp; '
                   '<mark class="dn1" title="-0.1000">meeting</mark>')  # overlapping and out-of-range spans dropped  # fmt: skip


def test_every_request_needs_the_password_when_one_is_set(tmp_path):
    with ConsoleServed(tmp_path, "console.password=s3cret") as c:
        for path in ("/history", "/verdict/1", "/models", "/console.css"):
            status, h, _ = c.request("GET", path)
            assert status == 401 and h["www-authenticate"].startswith("Basic realm=")
        assert c.request("GET", "/history", headers={"Authorization": basic("wrong")})[0] == 401
        assert c.request("GET", "/history", headers={"Authorization": "Bearer s3cret"})[0] == 401
        status, h, body = c.request("GET", "/history", headers={"Authorization": basic("s3cret")})
        assert status == 200 and b"hello" in body
        # a POST with a valid session and token but no password is refused too
        cookie, token = c.session(Authorization=basic("s3cret"))
        status, _, _ = c.request("POST", "/verdict/1/learn", f"csrf={token}&label=ham".encode(),
                                 {"Cookie": cookie, "Origin": c.url, "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert status == 401 and c.labels() == []


def test_without_a_password_only_loopback_host_names_are_served(tmp_path):
    with ConsoleServed(tmp_path) as c:
        assert c.request("GET", "/history")[0] == 200
        assert c.request("GET", "/history", headers={"Host": "localhost:1"})[0] == 200
        status, _, body = c.request("GET", "/history", headers={"Host": "evil.example:11334"})  # DNS rebinding
        assert status == 403 and b"not a loopback name" in body


def test_cross_site_posts_are_refused_and_a_same_site_one_learns(tmp_path):
    with ConsoleServed(tmp_path) as c:
        cookie, token = c.session()
        form = "application/x-www-form-urlencoded"
        attempts = {
            "no token": ({"Cookie": cookie, "Origin": c.url}, "label=ham"),
            "wrong token": ({"Cookie": cookie, "Origin": c.url}, "csrf=" + "0" * 64 + "&label=ham"),
            "token of another session": ({"Cookie": "filterd_console=" + "A" * 43, "Origin": c.url}, f"csrf={token}&label=ham"),
            "foreign Origin": ({"Cookie": cookie, "Origin": "http://evil.example"}, f"csrf={token}&label=ham"),
            "foreign Referer, no Origin": ({"Cookie": cookie, "Referer": "http://evil.example/x"}, f"csrf={token}&label=ham"),
            "no Origin nor Referer": ({"Cookie": cookie}, f"csrf={token}&label=ham"),
        }
        for why, (headers, body) in attempts.items():
            status, _, page = c.request("POST", "/verdict/1/learn", body.encode(), {**headers, "Content-Type": form})
            assert status == 403 and b"cross-site request refused" in page, why
            assert c.request("POST", "/models/rollback", body.replace("label=ham", "").encode(), {**headers, "Content-Type": form})[0] == 403, why
        assert c.labels() == []
        status, h, _ = c.request("POST", "/verdict/1/learn", f"csrf={token}&label=ham".encode(),
                                 {"Cookie": cookie, "Origin": c.url, "Content-Type": form})  # fmt: skip
        assert status == 303 and h["location"] == "/verdict/1?learned=ham"
        assert c.labels() == [("ham", "console", TEXT)]  # as `filterd-trainer learn` stores it
        status, _, page = c.request("GET", "/verdict/1?learned=ham", headers={"Cookie": cookie})
        assert b"In the label store as <b>ham (by console)</b>" in page


def test_learning_needs_the_stored_text(tmp_path):
    with ConsoleServed(tmp_path) as c:
        cookie, token = c.session("/classify")
        status, _, page = c.request("GET", "/verdict/3", headers={"Cookie": cookie})
        assert b'id="learn-disabled"' in page and b"store_text = false" in page and b"<button disabled" in page
        assert b'<mark class="up2">FREE</mark>' in page  # the word list instead of the text
        status, _, page = c.request("POST", "/verdict/3/learn", f"csrf={token}&label=spam".encode(),
                                    {"Cookie": cookie, "Origin": c.url, "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert status == 409 and c.labels() == []


def test_pages_carry_a_strict_policy_and_escape_hostile_text(tmp_path):
    with ConsoleServed(tmp_path) as c:
        for path in ("/history", "/verdict/2", "/models", "/classify"):
            status, h, body = c.request("GET", path)
            assert status == 200, (path, body)
            assert "script-src" not in h["content-security-policy"] and "default-src 'none'" in h["content-security-policy"]
            assert h["x-content-type-options"] == "nosniff" and "SameSite=Strict" in h["set-cookie"] and "HttpOnly" in h["set-cookie"]
            assert b"<script" not in body.lower() and b"onerror=" not in body.replace(b"onerror=&quot;", b"")
        status, _, body = c.request("GET", "/verdict/2")
        assert b"&lt;script&gt;document.title=&quot;pwned&quot;" in body and b"&amp;amp; &quot;quoted&quot;" in body
        status, _, body = c.request("GET", "/history?verdict=spam&source=%3Cscript%3E&since=%22%3E%3Cscript%3E")
        assert status == 400  # a bad time is an error page, the value is not echoed unescaped
        assert b"<script>" not in body


def test_history_filters_and_paging(tmp_path):
    with ConsoleServed(tmp_path) as c:
        with History(c.cfg.history.path) as h:
            h.add_many([{**rows(time.time())[0], "ref": f"P{i}"} for i in range(60)])
        _, _, page = c.request("GET", "/history?verdict=ham")
        assert page.count(b'<tr class="row-') == 1 and b"1700000000000-0" in page
        _, _, page = c.request("GET", "/history")
        assert page.count(b'<tr class="row-') == 50 and b'id="older"' in page and b"P59" in page
        older = re.search(rb'id="older" href="([^"]+)"', page)[1].decode().replace("&amp;", "&")
        _, _, page = c.request("GET", older)
        assert page.count(b'<tr class="row-') == 13 and b"P59" not in page and b"P9<" in page
        since = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() + 3600))
        _, _, page = c.request("GET", f"/history?since={since}")
        assert b"No decisions match" in page


def test_classify_box_scores_and_says_when_explanations_are_unavailable(tmp_path):
    with ConsoleServed(tmp_path) as c:
        cookie, token = c.session("/classify")
        body = urllib.parse.urlencode({"csrf": token, "text": "hello <i>there</i>"}).encode()
        status, _, page = c.request("POST", "/classify", body, {"Cookie": cookie, "Origin": c.url,
                                                                "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert status == 200 and b'<b id="p-spam">0.2500</b>' in page and b"hello &lt;i&gt;there&lt;/i&gt;" in page
        try:
            import filterd.model.explain  # noqa: F401
        except ImportError:
            assert b"explanations not available" in page


def test_classify_box_explains_only_through_the_bounded_explainer(tmp_path):
    """The console's explanations wait in the daemon's explainer like any door's: its queue bound, deadline and
    nice apply, and a skip is counted (here the queue is full: one explanation is already running)."""
    import dataclasses

    from filterd.config import ExplainConfig
    from filterd.model.explainer import Explainer
    from filterd.obs.metrics import FilterdMetrics

    metrics = FilterdMetrics()
    explainer = Explainer(dataclasses.replace(ExplainConfig(), max_queue=1), lambda: None, metrics)
    explainer.pending = 1  # an explanation is already running: the queue (max_queue 1) is full
    with ConsoleServed(tmp_path, explain=lambda text: explainer.on_demand("console", text)) as c:
        cookie, token = c.session("/classify")
        body = urllib.parse.urlencode({"csrf": token, "text": "cheap pills"}).encode()
        status, _, page = c.request("POST", "/classify", body, {"Cookie": cookie, "Origin": c.url,
                                                                "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert status == 200 and b'id="no-explain"' in page
    assert metrics.registry.get_sample_value("filterd_explanations_total", {"source": "console", "outcome": "queue-full"}) == 1


# --- in a real browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_hostile_text_is_shown_literally_and_no_script_runs(tmp_path, browser):
    with ConsoleServed(tmp_path) as c:
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text))
        for path in ("/history", "/verdict/2"):
            page.goto(c.url + path)
            assert page.evaluate("window.pwned === undefined") and page.title() != "pwned"
            assert page.locator("img").count() == 0  # the <img onerror> is text, not an element
        assert page.inner_text("#text") == XSS  # exactly the text, shown as text
        assert XSS in page.inner_text("#fields")
        page.goto(c.url + "/verdict/1")
        marks = page.locator("#text mark")
        assert marks.all_inner_texts() == ["FREE", "meeting"]
        assert marks.first.get_attribute("class") == "up3" and marks.nth(1).get_attribute("class") == "dn2"
        # the stylesheet loads under the policy (red marks), nothing was blocked
        assert page.evaluate("getComputedStyle(document.querySelector('#text mark')).backgroundColor") == "rgb(229, 115, 115)"
        assert not [e for e in errors if "Content Security Policy" in e]
        page.close()


def test_a_form_posted_from_another_site_is_refused_in_the_browser(tmp_path, browser):
    """An attacker's page (another origin) auto-submits a learn form at the console while the operator's browser has
    a console session: the browser sends it, the console refuses it, and the label store is untouched."""
    with ConsoleServed(tmp_path) as c:
        evil = f"""<form id=f method=post action="{c.url}/verdict/1/learn"><input name=label value=spam>
                   <input name=csrf value=guess></form><script>document.getElementById('f').submit()</script>"""

        class Evil(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = evil.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.2", 0), Evil)  # another origin (also another site name)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            context = browser.new_context()
            page = context.new_page()
            page.goto(c.url + "/verdict/1")  # the operator has a session
            with page.expect_navigation():
                page.goto(f"http://127.0.0.2:{server.server_port}/")
            assert "cross-site request refused" in page.content()
            context.close()
        finally:
            server.shutdown()
        assert c.labels() == []


def test_models_page_lists_refit_outcomes_escaped(tmp_path):
    from trainer.publish import ModelStore

    models = ModelStore(tmp_path / "models")
    models.record_refit({"outcome": "promoted", "reason": "better", "mode": "head", "current_version": "v1", "version": "v2",
                         "candidate": {"test": {"accuracy": 0.97}}, "current": {"test": {"accuracy": 0.95}}, "seconds": 12.0})  # fmt: skip
    models.record_refit({"outcome": "rejected", "reason": "golden accuracy <script>x</script>", "mode": "head",
                         "current_version": "v2", "version": None, "candidate": {"golden": {"ham_fpr": 0.2}},
                         "current": {"golden": {"ham_fpr": 0.01}}, "seconds": 3.5})  # fmt: skip
    with ConsoleServed(tmp_path) as c:
        status, _, body = c.request("GET", "/models")
    assert status == 200
    table = body.split(b'id="refits"')[1]
    assert table.index(b"refit-rejected") < table.index(b"refit-promoted")  # newest first
    assert b"97.00% / 95.00%" in table and b"20.00% / 1.00%" in table
    assert b"golden accuracy &lt;script&gt;x&lt;/script&gt;" in table and b"<script>" not in body
