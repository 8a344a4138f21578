"""The Grafana dashboard (deploy/grafana/filterd.json) against a real Prometheus scraping a real
`filterd serve` that has served Redis, SMTP and HTTP traffic: every panel query must parse and return
data, so a renamed metric or label, or a typo in PromQL, fails here rather than as an empty panel in
production. Only the trainer panels may be empty (no trainer runs here): see NO_DATA_YET.

A panel may use a metric of the contract's table (docs/interfaces.md) or one of
`filterd.obs.metrics.UNLISTED_METRICS` (what the daemon exports beyond the contract's first version), and
only metrics the daemon or the trainer really export."""

from __future__ import annotations

from testing.metrics import exported_metrics

import contextlib
import json
import math
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from trainer.data import read_sms

from tests.conftest import REPO
from testing.services import free_port
from testing.smtp_sink import SmtpSink
from testing.daemon import FilterdProcess
from tests.e2e.test_serve_redis import add_all, complete, wait_for
from tests.e2e.test_serve_smtp import corpus_files, send_all

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "filterd.json"
CONTRACT = REPO / "docs" / "interfaces.md"
OPERATIONS = REPO / "docs" / "operations.md"  # the metrics table with what each metric means
PROMETHEUS = "/usr/bin/prometheus"

# Panels allowed to return no data here, with why. Must be exactly the panels reading filterd_trainer_*.
_NO_TRAINER = "filterd_trainer_* come from filterd-trainer (serve or a refit's textfile), which this test does not run"
NO_DATA_YET = {
    "Trainer accuracy": _NO_TRAINER,
    "Trainer spam recall": _NO_TRAINER,
    "Trainer ham false-positive rate": _NO_TRAINER,
    "Refits by outcome": _NO_TRAINER,
    "Time since last refit": _NO_TRAINER,
    "Refit duration": _NO_TRAINER,
    "Labels received": _NO_TRAINER,
    "Training data set size": _NO_TRAINER,
}
PROMETHEUS_OWN = {"up"}  # series Prometheus itself writes for every target, not in filterd's contract

SCRAPE_INTERVAL = "1s"
# What Grafana would put in: $__rate_interval is at least 4 scrape intervals; 30 s spans all the traffic
# of this test, so rates are not only present but non-zero.
MACROS = {"$__rate_interval": "30s", "$__interval": "15s", "$__range": "1m"}
N_SMS, N_MAIL, N_BAD, N_HTTP = 200, 20, 2, 5


# --- the dashboard -------------------------------------------------------------------------------


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    """Every panel, rows included, and those folded inside collapsed rows."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def query_panels(dash: dict) -> list[dict]:
    return [p for p in all_panels(dash) if p["type"] != "row"]


def trainer_titles(dash: dict) -> set[str]:
    return {p["title"] for p in query_panels(dash) if any("filterd_trainer_" in t["expr"] for t in p["targets"])}


def contract_metrics() -> dict[str, str]:
    """{metric name: type} from the Metrics table of docs/interfaces.md."""
    section = CONTRACT.read_text().split("## Metrics", 1)[1]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`filterd_"):
            for name in re.findall(r"`(filterd_\w+)`", cells[0]):
                out[name] = cells[1].split()[0]  # "gauge (=1)" -> gauge
    return out


def repo_metrics() -> dict[str, str]:
    """{metric name: type} added beyond the contract's first version (filterd/obs/metrics.py, docs/operations.md's table)."""
    from filterd.obs.metrics import UNLISTED_METRICS

    return dict(UNLISTED_METRICS)


def test_metrics_beyond_the_contract_are_exported_and_documented():
    contract, repo, exported = contract_metrics(), repo_metrics(), exported_metrics()
    operations = OPERATIONS.read_text()
    for name, kind in repo.items():
        assert exported.get(name) == kind, f"UNLISTED_METRICS names {name} ({kind}), the daemon exports {exported.get(name)}"
        assert f"| `{name}` | {kind} |" in operations, f"{name} is missing from docs/operations.md's metrics table"
        # The contract now lives in this repository and lists them too; where it does, the types must agree.
        assert contract.get(name, kind) == kind, f"{name}: docs/interfaces.md says {contract[name]}, UNLISTED_METRICS {kind}"
    unlisted = {n for n in exported if n.startswith("filterd_")} - contract.keys() - repo.keys()
    assert not unlisted, f"exported but neither in docs/interfaces.md nor in UNLISTED_METRICS: {sorted(unlisted)}"


def series_names(metrics: dict[str, str]) -> set[str]:
    """The names a query can select: a histogram is only visible as _bucket, _sum and _count."""
    names = set()
    for name, kind in metrics.items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def names_in(expr: str) -> set[str]:
    """Metric names an expression selects: filterd_* anywhere (no label starts so), and any name before `{`."""
    return set(re.findall(r"\bfilterd_\w+", expr)) | set(re.findall(r"\b([a-zA-Z_:][\w:]*)\{", expr))


def substitute(expr: str, variables: dict[str, str]) -> str:
    """What Grafana sends: macros and template variables (both $name and ${name}) filled in."""
    for name, value in [*variables.items(), *MACROS.items()]:  # variables first: they may override a macro
        expr = expr.replace("${" + name.lstrip("$") + "}", value).replace(name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def test_dashboard_is_well_formed():
    dash = load_dashboard()
    assert dash["uid"] == "filterd" and 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"job", "instance"} <= variables.keys()
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    allowed = series_names({**contract_metrics(), **repo_metrics()}) | PROMETHEUS_OWN
    exported = series_names(exported_metrics()) | PROMETHEUS_OWN  # the daemon must really export what a panel shows
    for p in query_panels(dash):
        assert p.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", p["title"]
        assert p.get("targets"), f"{p['title']}: no target"
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        for t in p["targets"]:
            assert t.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}" and t["expr"].strip(), p["title"]
            assert names_in(t["expr"]) <= allowed, f"{p['title']}: not in the contract: {names_in(t['expr']) - allowed}"
            assert names_in(t["expr"]) <= exported, f"{p['title']}: not exported: {names_in(t['expr']) - exported}"
            # rate() over a fixed short window breaks when the scrape interval changes; Grafana's macro adapts.
            for window in re.findall(r"\brate\([^\[]*\[([^\]]+)\]", t["expr"]):
                assert window == "$__rate_interval", f"{p['title']}: rate over [{window}]"
    assert set(NO_DATA_YET) == trainer_titles(dash), "NO_DATA_YET must name exactly the trainer panels"


def test_provisioning_files():
    yaml = pytest.importorskip("yaml")
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    boards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "filterd.yaml").read_text())
    [provider] = boards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# --- a real Prometheus ---------------------------------------------------------------------------


class PrometheusServer:
    """/usr/bin/prometheus scraping one target every second, its storage under `directory`."""

    def __init__(self, directory: Path, target: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.dir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL}\n"
            f"scrape_configs:\n  - job_name: filterd\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "PrometheusServer":
        if not Path(PROMETHEUS).exists():
            pytest.skip("prometheus not installed: apt-get install -y prometheus (make services does it)")
        self._log = open(self.dir / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT)  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a clean TSDB shutdown
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {(self.dir / 'prometheus.log').read_text()[-2000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready: {(self.dir / 'prometheus.log').read_text()[-2000:]}")

    def api(self, path: str, **params: str) -> dict:
        """POST to the HTTP API (long expressions); a 400 (bad PromQL) returns its JSON error body."""
        data = urllib.parse.urlencode(params).encode()
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}", data=data, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def value(self, expr: str) -> float:
        """The single value of a scalar-valued vector expression; NaN when empty."""
        response = self.query(expr)
        assert response["status"] == "success", (expr, response)
        result = response["data"]["result"]
        return float(result[0]["value"][1]) if result else math.nan


def has_data(response: dict) -> bool:
    """A non-empty result with at least one real number: what a panel needs to draw something."""
    data = response["data"]
    if data["resultType"] == "scalar":
        return not math.isnan(float(data["result"][1]))
    return any(not math.isnan(float(s["value"][1])) for s in data["result"])


def label_values(prom: PrometheusServer, definition: str, variables: dict[str, str]) -> set[str]:
    """Grafana's `label_values(selector, label)` variable query, through the series API as Grafana does."""
    selector, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", definition).groups()
    response = prom.api("series", **{"match[]": substitute(selector, variables), "start": str(time.time() - 300)})
    assert response["status"] == "success", (definition, response)
    return {s[label] for s in response["data"] if label in s}


# --- the end-to-end test -------------------------------------------------------------------------


def test_every_panel_query_returns_data(redis_server, tiny_model, sms_file, spamassassin_dir, tmp_path):
    t0 = time.monotonic()
    dash = load_dashboard()
    r = redis_server.client()
    texts = [e.text for e in read_sms(sms_file)[:N_SMS]]
    raws = [p.read_bytes() for p in corpus_files(spamassassin_dir, N_MAIL // 2, N_MAIL // 2)]
    smtp_port, http_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(SmtpSink())
        d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "filterd.log", smtp__enabled="true",
                           smtp__listen=f"127.0.0.1:{smtp_port}", smtp__next_hop=sink.address, http__enabled="true",
                           http__listen=f"127.0.0.1:{http_port}")  # fmt: skip
        target = f"127.0.0.1:{d.metrics_port}"
        # Prometheus first, so it has samples from before the traffic: rates then show the traffic itself.
        prom = stack.enter_context(PrometheusServer(tmp_path / "prometheus", target))
        stack.callback(lambda: d.proc is not None and d.proc.poll() is None and d.stop())
        d.start()
        prom.wait_ready()
        # Traffic only once Prometheus has a sample of the idle daemon (its first scrape waits for target
        # discovery, ~5 s): counters that appear already at their final value have a rate of 0.
        sel = f'job="filterd", instance="{target}"'
        wait_for(lambda: prom.value(f"up{{{sel}}}") == 1, timeout=30, what="prometheus' first scrape")
        # ... and of the counters at zero: the daemon primes them only once the model is loaded, which a
        # first scrape can precede; traffic done within one scrape interval then showed no rate at all.
        wait_for(lambda: prom.value(f"count(filterd_messages_total{{{sel}}} == 0)") >= 3 * 3, timeout=30,
                 what="prometheus to scrape the primed counters")  # fmt: skip

        traffic_start = time.time()
        add_all(r, texts)
        r.xadd("filterd:in", {"no_text": "1"})  # -> dead letter, reason missing-text
        r.xadd("filterd:in", {"text": b"\xff\xfe not utf-8"})  # -> dead letter, reason invalid-utf8
        wait_for(complete(r, N_SMS), timeout=60, what="Redis results")
        wait_for(lambda: r.xlen("filterd:dead") >= N_BAD, timeout=30, what="dead letters")
        assert send_all(smtp_port, raws) == [250] * N_MAIL
        sink.wait_for(N_MAIL)
        for raw in raws[:N_HTTP]:  # the HTTP door: actions and request latency per door
            request = urllib.request.Request(f"http://127.0.0.1:{http_port}/checkv2", data=raw, method="POST")
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.status == 200
        d.proc.send_signal(signal.SIGHUP)  # a reload: reloads_total{outcome="ok"} and the annotation get a sample
        wait_for(lambda: d.metric('filterd_model_reloads_total{outcome="ok"}') >= 1, timeout=30, what="SIGHUP reload")

        # Wait until Prometheus has scraped the final state, then two scrapes more: every series, the
        # newest included, has >= 3 samples in the window, and rate() needs at least 2.
        wait_for(lambda: prom.value(f"sum(filterd_messages_total{{{sel}}})") == N_SMS + N_MAIL + N_BAD + N_HTTP
                 and prom.value(f'sum(filterd_model_reloads_total{{{sel}, outcome="ok"}})') >= 1,
                 timeout=30, what="prometheus to scrape the final state")  # fmt: skip
        final = prom.value(f"max(timestamp(filterd_messages_total{{{sel}}}))")
        wait_for(lambda: prom.value(f"timestamp(up{{{sel}}})") >= final + 2, timeout=30, what="two more scrapes")

        # Template variables resolve to this target; "All" of the trainer job is its allValue.
        variables = {v["name"]: v for v in dash["templating"]["list"] if v["type"] == "query"}
        assert label_values(prom, variables["job"]["definition"], {}) == {"filterd"}
        assert label_values(prom, variables["instance"]["definition"], {"$job": "filterd"}) == {target}
        assert label_values(prom, variables["trainer_job"]["definition"], {}) == set()
        values = {"$job": "filterd", "$instance": target, "$trainer_job": variables["trainer_job"]["allValue"]}
        # On a loaded machine the traffic can take longer than 30 s: the window then grows to span all
        # of it, so a rate is never empty only because its first samples fell out of the window.
        values["$__rate_interval"] = f"{max(30, math.ceil(time.time() - traffic_start) + 5)}s"

        failures, empty, n_empty = [], set(), 0
        checks = [(p["title"], t["expr"]) for p in query_panels(dash) for t in p["targets"]]
        checks += [(f"annotation: {a['name']}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
        for title, expr in checks:
            response = prom.query(substitute(expr, values))
            if response["status"] != "success":
                failures.append(f"{title}: {expr}: {response.get('error')}")
            elif not has_data(response):
                empty.add(title)
                n_empty += 1
                if title not in NO_DATA_YET:
                    failures.append(f"{title}: no data: {expr}")
            elif title in NO_DATA_YET:
                failures.append(f"{title}: has data now; take it out of NO_DATA_YET: {expr}")
        assert not failures, "\n".join(failures)
        assert empty == set(NO_DATA_YET) == trainer_titles(dash)
        assert d.stop() == 0
    print(f"{len(checks)} queries, {len(checks) - n_empty} with data, {n_empty} in NO_DATA_YET; {time.monotonic() - t0:.1f} s")
