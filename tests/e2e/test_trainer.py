"""The trainer with real processes: labels over Redis -> `refit --once` -> a running `filterd serve`
swaps the new model in while messages flow; a poisoned refit is rejected; rollback; the intake
survives kill -9 of the trainer and a Redis restart."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from trainer.data import read_sms
from filterd.store.labels import LabelStore, message_id

from testing.services import free_port
from testing.daemon import FilterdProcess


def wait_for(cond, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def trainer(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uci(sms_file):
    """Distinct UCI texts by label, in file order."""
    seen, out = set(), {"spam": [], "ham": []}
    for e in read_sms(sms_file):
        if message_id(e.text) not in seen:
            seen.add(message_id(e.text))
            out[e.label].append(e.text)
    return out


def write_config(tmp: Path, redis_url: str, golden: Path | None = None, **trainer_keys) -> Path:
    keys = {"store": str(tmp / "labels.sqlite"), "models_dir": str(tmp / "models"), "interval": "1h",
            "metrics_listen": f"127.0.0.1:{free_port()}",
            "min_per_class": 20, "max_regression": 0.02, "max_ham_fpr": 0.10} | trainer_keys  # fmt: skip
    if golden is not None:
        keys["golden_set"] = str(golden)
    # a dead consumer's entries are claimed after 2 s rather than a minute, to keep the test short
    lines = ["[redis]", f'url = "{redis_url}"', "claim_idle_ms = 2000", "[trainer]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path = tmp / "filterd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def push_labels(r, pairs) -> None:
    pipe = r.pipeline(transaction=False)
    for label, text in pairs:
        pipe.xadd("filterd:labels", {"label": label, "text": text})
    pipe.execute()


class Feeder(threading.Thread):
    """Adds an SMS to filterd:in every few ms until stopped: traffic before, during and after a swap."""

    def __init__(self, r, texts: list[str]) -> None:
        super().__init__(daemon=True)
        self.r, self.texts, self.sent = r, texts, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.r.xadd("filterd:in", {"text": self.texts[self.sent % len(self.texts)], "id": str(self.sent)})
            self.sent += 1
            time.sleep(0.01)


def model_version(d: FilterdProcess) -> str | None:
    for line in d.get("/metrics")[1].splitlines():
        if line.startswith("filterd_model_info{"):
            return line.split('version="')[1].split('"')[0]
    return None


def test_labels_refit_hot_swap_poisoned_refit_rejected_and_rollback(tmp_path, redis_server, tiny_model, uci):
    r = redis_server.client()
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_model.model_dir, models / "current")  # the model an operator put in place first
    golden = tmp_path / "golden.csv"  # a fixed set the operator trusts: never trained on, guards against poisoned labels
    with open(golden, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "text"])
        for label in ("spam", "ham"):
            for i, text in enumerate(uci[label][300:360]):
                w.writerow([f"golden-{label}-{i}", label, text])
    # No replay: ~1,000 replayed messages per class outvote 400 flipped labels, so the poisoned candidate barely
    # moves, is no worse on the golden set and is promoted (harmlessly; bench/RESULTS.md "Refit"). Here the
    # candidate must learn the flips for the golden set to show them.
    config = write_config(tmp_path, redis_server.url, golden, replay=0)
    labelled = [("spam", t) for t in uci["spam"][:200]] + [("ham", t) for t in uci["ham"][:200]]

    d = FilterdProcess(models / "current", redis_server.url, tmp_path / "filterd.log").start()
    feeder = Feeder(r, uci["ham"][1000:1100] + uci["spam"][400:450])
    try:
        first = model_version(d)
        assert first == tiny_model.meta.version
        feeder.start()
        push_labels(r, labelled)
        t0 = time.monotonic()
        out = trainer("refit", "--config", str(config), "--once")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["outcome"] == "promoted", result
        new = result["version"]
        wait_for(lambda: model_version(d) == new, timeout=30, what="filterd to serve the new model")
        swap_s = time.monotonic() - t0
        assert (models / "current").resolve().name == new

        # poisoned labels: the same 400 texts with spam and ham swapped -> the golden set catches it
        push_labels(r, [("ham" if lab == "spam" else "spam", t) for lab, t in labelled])
        out = trainer("refit", "--config", str(config), "--once", "--textfile", str(tmp_path / "trainer.prom"))
        assert out.returncode == 0, out.stderr
        rejected = json.loads(out.stdout)
        assert rejected["outcome"] == "rejected", rejected
        assert (models / "current").resolve().name == new and model_version(d) == new
        prom = (tmp_path / "trainer.prom").read_text()
        assert 'filterd_trainer_refits_total{outcome="rejected"} 1.0' in prom
        assert "filterd_trainer_last_refit_timestamp_seconds" in prom

        out = trainer("rollback", "--config", str(config))
        assert out.returncode == 0, out.stderr
        wait_for(lambda: model_version(d) == first, timeout=30, what="filterd to serve the rolled-back model")
        time.sleep(0.5)
    finally:
        feeder.halt.set()
        feeder.join()
        wait_for(lambda: r.xlen("filterd:out") >= feeder.sent and r.xpending("filterd:in", "filterd")["pending"] == 0,
                 timeout=60, what="every fed message to get a result")  # fmt: skip
        assert d.stop() == 0
    ids = [int(f[b"id"]) for _, f in r.xrange("filterd:out")]
    assert sorted(set(ids)) == list(range(feeder.sent)), "every message before, during and after the swaps has a result"
    assert r.xlen("filterd:dead") == 0
    versions = {f[b"model"].decode() for _, f in r.xrange("filterd:out")}
    assert {first, new} <= versions  # results came from both models
    print(f"\nrefit --once + swap seen by filterd in {swap_s:.1f}s; {feeder.sent} messages fed; "
          f"candidate test acc {result['candidate']['test']['accuracy']:.4f} vs current {result['current']['test']['accuracy']:.4f}")


def test_intake_survives_kill_9_and_redis_restart(tmp_path, redis_server, uci):
    r = redis_server.client()
    config = write_config(tmp_path, redis_server.url, min_per_class=100000)  # refits skip: only the intake is under test
    metrics_url = "http://" + next(ln.split('"')[1] for ln in config.read_text().splitlines() if ln.startswith("metrics_listen")) + "/metrics"
    texts = [("spam", t) for t in uci["spam"][:600]] + [("ham", t) for t in uci["ham"][:1400]]
    cmd = [sys.executable, "-m", "trainer", "serve", "--config", str(config)]
    log = open(tmp_path / "trainer.log", "ab")
    store_path = tmp_path / "labels.sqlite"

    def stored() -> int:
        if not store_path.exists():
            return 0
        with LabelStore(store_path) as s:
            return len(s)

    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: r.exists("filterd:labels") and r.xinfo_groups("filterd:labels"), what="the intake's group")
        push_labels(r, texts[:1500])
        wait_for(lambda: stored() > 0, what="the first labels stored")
        p.send_signal(signal.SIGKILL)  # mid-intake
        p.wait()
        at_kill = (stored(), r.xpending("filterd:labels", "filterd-trainer")["pending"])
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: stored() >= 1200, what="intake to resume")
        redis_server.restart()  # AOF: the stream and the group survive
        push_labels(redis_server.client(), texts[1500:])
        r = redis_server.client()
        wait_for(lambda: stored() == 2000 and r.xpending("filterd:labels", "filterd-trainer")["pending"] == 0
                 and r.xinfo_groups("filterd:labels")[0]["lag"] == 0, timeout=120, what="all 2000 labels stored")  # fmt: skip
        with urllib.request.urlopen(metrics_url, timeout=5) as resp:  # the restarted process counted what it took in
            text = resp.read().decode()
        assert 'filterd_trainer_labels_total{label="ham"}' in text and "filterd_trainer_refit_seconds" in text
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        log.close()
    with LabelStore(store_path) as s:
        assert s.counts() == {"spam": 600, "ham": 1400}
        assert {row.id for row in s.rows()} == {message_id(t) for _, t in texts}
    print(f"\nat kill -9: {at_kill[0]} stored, {at_kill[1]} read but not acknowledged; all 2000 stored after restarts")


def test_trainer_serve_exits_1_when_the_intake_cannot_work(tmp_path, redis_server):
    """A label stream key of the wrong type: one line and exit 1 (old code: exit 70, "internal error")."""
    redis_server.client().set("filterd:labels", "not a stream")
    config = write_config(tmp_path, redis_server.url, min_per_class=100000)
    p = subprocess.run([sys.executable, "-m", "trainer", "serve", "--config", str(config)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1]
    assert p.returncode == 1, p.stderr[-2000:]
    assert "label-intake failed" in last and "WRONGTYPE" in last
