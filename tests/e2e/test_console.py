"""The web console of a real `filterd serve` (SMTP and Redis doors, a real Redis, a real SMTP sink), driven in
headless Chromium: mail and SMS show up in the history, an explanation's words are highlighted, "learn as
ham" on a false positive reaches the label store, rollback switches the live model, and the password is
required. With FILTERD_SCREENSHOTS=DIR the main pages are saved there (docs/screenshots in the README).
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import pytest

from filterd.store.history import History

from testing.services import free_port
from testing.smtp_sink import SmtpSink
from testing.daemon import FilterdProcess

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "console-test-pw"
HAM = "Are we still meeting for lunch tomorrow? I booked the usual table for noon."
SMS = "WINNER!! You have won a 1000 cash prize. Call 09061701461 to claim now, T&C apply"


def make_versions(model: Path, root: Path) -> Path:
    """models_dir as the trainer leaves it: two published versions (copies of one model), current -> the newer."""
    for i, version in enumerate(("old-1", "new-2")):
        target = root / "versions" / version
        shutil.copytree(model, target)
        meta = json.loads((target / "filterd.json").read_text())
        meta["version"] = version
        meta["created"] = f"2026-11-0{i + 1}T12:00:00.000000+00:00"
        if version == "new-2":
            meta.setdefault("extra", {})["refit"] = {"parent": "old-1", "mode": "head", "final_fit": "all labels",
                                                     "counts": {"spam": 40, "ham": 60}}  # fmt: skip
        (target / "filterd.json").write_text(json.dumps(meta))
    os.symlink("versions/new-2", root / "current")
    return root


def wait_until(check, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_console_history_explanation_learn_rollback_in_a_browser(tiny_model, redis_server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from filterd.config import load_config
    from trainer.refit_data import load_data
    from filterd.store.labels import LabelStore

    models = make_versions(tiny_model.model_dir, tmp_path / "models")
    history_path, store_path = tmp_path / "history.sqlite", tmp_path / "labels.sqlite"
    smtp_port, console_port = free_port(), free_port()
    shots = os.environ.get("FILTERD_SCREENSHOTS")
    with SmtpSink() as sink:
        d = FilterdProcess(
            models / "current", redis_server.url, tmp_path / "filterd.log", smtp__enabled="true",
            smtp__listen=f"127.0.0.1:{smtp_port}", smtp__next_hop=sink.address, model__min_reload_interval="0s",
            policy__tag_score="0.0001",  # everything is spam: the ham message below is a false positive
            history__enabled="true", history__path=history_path, history__store_text="true",
            explain__enabled="all", explain__deadline="60s",  # a loaded CI machine must not skip them
            console__enabled="true", console__listen=f"127.0.0.1:{console_port}", console__password=PASSWORD,
            console__grafana_url="http://127.0.0.1:3000/d/filterd", trainer__store=store_path, trainer__models_dir=models,
        ).start()  # fmt: skip
        url = f"http://127.0.0.1:{console_port}"
        try:
            # a mail through SMTP, an SMS through Redis
            mail = EmailMessage()
            mail["From"], mail["To"], mail["Subject"] = "alice@example.org", "bob@example.com", "Lunch tomorrow?"
            mail.set_content(HAM)
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
                s.send_message(mail)
            client = redis_server.client()
            entry = client.xadd("filterd:in", {"text": SMS, "id": "sms-1"}).decode()
            wait_until(lambda: client.xlen("filterd:out") == 1, what="the Redis result")
            sink.wait_for(1)

            def recorded():
                with History(history_path, writer=False) as h:
                    rows = h.query()
                return rows if len(rows) == 2 else None

            rows = wait_until(recorded, what="two recorded verdicts")
            by_source = {v.source: v for v in rows}
            assert set(by_source) == {"smtp", "redis"} and by_source["redis"].ref == entry
            mail_row = by_source["smtp"]
            assert (mail_row.sender, mail_row.recipients, mail_row.subject, mail_row.verdict, mail_row.model) == (
                "alice@example.org", ("bob@example.com",), "Lunch tomorrow?", "spam", "new-2")
            assert HAM in mail_row.text
            # [explain] enabled = "all": the daemon explained both, and the history keeps the words
            for v in rows:
                assert v.explanation is not None and v.explanation["words"], v
                assert all(w["weight"] != 0 for w in v.explanation["words"])
            words = {(w["start"], w["end"]): w for w in by_source["redis"].explanation["words"]}
            assert all(SMS[a:b] == w["word"] for (a, b), w in words.items())  # offsets index the SMS as sent
            explained = by_source["redis"].id

            # no password: refused
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + "/history", timeout=10)
            assert refused.value.code == 401

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_context(http_credentials={"username": "admin", "password": PASSWORD},
                                           viewport={"width": 1280, "height": 800}).new_page()  # fmt: skip
                page.goto(url + "/history")
                table = page.inner_text("#history")
                assert "Lunch tomorrow?" in table and "alice@example.org" in table and entry in table
                assert page.locator("#history tr").count() == 3  # header + SMTP + Redis
                page.select_option("select[name=source]", "smtp")
                page.click("button[type=submit]")
                assert page.locator("#history tr").count() == 2 and "source=smtp" in page.url
                if shots:
                    page.goto(url + "/history")
                    page.screenshot(path=f"{shots}/history.png", full_page=True)

                page.goto(f"{url}/verdict/{explained}")
                marks = page.locator("#text mark")
                ordered = [words[k] for k in sorted(words)]  # the explanation's words in text order (they never overlap)
                assert marks.all_inner_texts() == [w["word"] for w in ordered]
                signs = [marks.nth(i).get_attribute("class")[:2] for i in range(len(ordered))]
                assert signs == ["up" if w["weight"] > 0 else "dn" for w in ordered]  # red raised P(spam), green lowered it
                assert page.inner_text("#text") == SMS
                if shots:
                    page.screenshot(path=f"{shots}/verdict.png", full_page=True)

                # the false positive: learn as ham
                page.goto(f"{url}/verdict/{mail_row.id}")
                page.click("#learn-ham")
                assert page.url.endswith(f"/verdict/{mail_row.id}?learned=ham")
                assert "In the label store as ham (by console)" in page.inner_text("main")
                with LabelStore(store_path) as store:
                    assert store.new_since(0) == 1  # what the refit service counts as new labels
                    (row,) = list(store.rows())  # and the rows it trains on
                assert (row.label, row.source) == ("ham", "console") and HAM in row.text
                # ...and the next refit's data set has it as ham (its loading, without the training: one spam beside it)
                with LabelStore(store_path) as store:
                    store.add(SMS, "spam", "test")
                    cfg = load_config(None, [f"trainer.store={store_path}", "trainer.min_per_class=1", "trainer.balance=weight"])
                    data = load_data(cfg, store, seed=123)
                assert not isinstance(data, str), data
                assert [(e.label, HAM in e.text) for e in data.labelled if e.label == "ham"] == [("ham", True)]

                # rollback: the daemon's model watcher loads the older version
                page.goto(url + "/models")
                assert page.locator("#models tr").count() == 3 and "(current)" in page.inner_text("#models tr:nth-child(2)")
                if shots:
                    page.screenshot(path=f"{shots}/models.png", full_page=True)
                page.click("#rollback")
                assert "rolled=old-1" in page.url
                model_info = lambda: [x for x in d.get("/metrics")[1].splitlines() if x.startswith("filterd_model_info{")]  # noqa: E731
                wait_until(lambda: any('version="old-1"' in x and x.endswith(" 1.0") for x in model_info()), what="old-1 live")
                assert not any('version="new-2"' in x and x.endswith(" 1.0") for x in model_info())

                def live() -> str:
                    page.goto(url + "/models")
                    return page.inner_text("#live-model") == "old-1"

                wait_until(live, what="the console to show old-1 live")
                assert "(current)" in page.inner_text("#models tr:nth-child(3)")

                page.goto(url + "/classify")
                page.fill("#paste", "Congratulations, claim your FREE prize <script>window.pwned=1</script>")
                page.click("#score")
                assert 0.0 <= float(page.inner_text("#p-spam")) <= 1.0 and page.evaluate("window.pwned === undefined")
                if shots:
                    page.screenshot(path=f"{shots}/classify.png", full_page=True)
                browser.close()
        finally:
            assert d.stop() == 0
