"""The deployment files: systemd units (systemd/), Prometheus configuration and alerts (deploy/prometheus/).

- `systemd-analyze verify` checks that every command a unit runs exists. Rather than rewrite the
  units' /usr/local/bin paths, each test builds a scratch root (`--root`): a copy of the host's
  unit directory (sysinit.target & co.), the units under etc/systemd/system, and stub executables
  at the units' command paths. The units are thus verified byte for byte as shipped.
- `systemd-analyze security --offline=yes` scores each service (lower is better).
- There is no systemd as PID 1 here, so `systemd-run` cannot start the real units. The seccomp
  part of their sandbox (SystemCallFilter=, SystemCallErrorNumber=, RestrictAddressFamilies=,
  MemoryDenyWriteExecute=) is emulated with libseccomp in a child process, which then runs
  `filterd serve` or a refit: what torch needs at run time is found here, not on a server.
- promtool checks the scrape configuration, checks the rules and runs their unit tests.
- Every metric (and label value) the rules use exists in filterd.obs.metrics' registries.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED

SYSTEMD = REPO / "systemd"
PROMETHEUS = REPO / "deploy" / "prometheus"
UNITS = ["filterd.service", "filterd-trainer.service", "filterd-trainer-refit.service", "filterd-trainer-refit.timer"]
SERVICES = [u for u in UNITS if u.endswith(".service")]
GPU_DROPIN = SYSTEMD / "filterd.service.d" / "gpu.conf.example"
# Exposure levels (0 = locked down, 10 = unprotected). filterd.service: the contract; the trainer's: what they reach.
MAX_EXPOSURE = {"filterd.service": 2.5, "filterd-trainer.service": 1.5, "filterd-trainer-refit.service": 1.5}
MAX_EXPOSURE_GPU = 2.5

needs_systemd_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
needs_promtool = pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (apt-get install prometheus)")


def _host_unit_dir() -> Path:
    for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (d / "sysinit.target").is_file():
            return d
    pytest.skip("no systemd unit directory with sysinit.target on this host")


def _unit_settings(path: Path) -> list[tuple[str, str]]:
    """(key, value) of every assignment in a unit file, in order (no line continuations in ours)."""
    pairs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def _commands(path: Path) -> list[str]:
    """The executables of Exec*= lines, without systemd's prefixes (-, +, !, @, :)."""
    return [value.lstrip("-+!@:").split()[0] for key, value in _unit_settings(path) if key.startswith("Exec") and value]


def _scratch_root(tmp_path: Path, dropins: dict[str, Path] | None = None) -> Path:
    root = tmp_path / "root"
    host = _host_unit_dir()
    shutil.copytree(host, root / host.relative_to("/"), symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(SYSTEMD / unit, etc / unit)
        for command in _commands(SYSTEMD / unit):
            stub = root / command.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    for name, source in (dropins or {}).items():  # "filterd.service.d/gpu.conf" -> file
        (etc / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, etc / name)
    return root


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", unit],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(tmp_path, unit):
    result = _verify(_scratch_root(tmp_path), unit)
    # verify warns (unknown key, bad value) on stderr and still exits 0: any output is a failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@needs_systemd_analyze
def test_gpu_dropin_verifies(tmp_path):
    root = _scratch_root(tmp_path, {"filterd.service.d/gpu.conf": GPU_DROPIN})
    result = _verify(root, "filterd.service")
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@needs_systemd_analyze
def test_verify_catches_a_missing_command(tmp_path):
    """The scratch root is what makes verify pass: without the stubs it must fail (else it checks nothing)."""
    root = _scratch_root(tmp_path)
    (root / "usr/local/bin/filterd").unlink()
    result = _verify(root, "filterd.service")
    assert "/usr/local/bin/filterd" in result.stdout + result.stderr


def _exposure(unit_path: Path) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    return float(m.group(1))


@needs_systemd_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure(unit, record_property):
    level = _exposure(SYSTEMD / unit)
    print(f"{unit}: exposure {level}")
    record_property("exposure", level)
    assert level <= MAX_EXPOSURE[unit]


@needs_systemd_analyze
def test_security_exposure_with_gpu_dropin(tmp_path, record_property):
    """security --offline reads a unit's .d/ directory beside it: the GPU variant is scored as installed."""
    shutil.copy(SYSTEMD / "filterd.service", tmp_path / "filterd.service")
    (tmp_path / "filterd.service.d").mkdir()
    shutil.copy(GPU_DROPIN, tmp_path / "filterd.service.d" / "gpu.conf")
    level = _exposure(tmp_path / "filterd.service")
    print(f"filterd.service + gpu.conf: exposure {level}")
    record_property("exposure", level)
    assert level <= MAX_EXPOSURE_GPU


def test_units_agree_on_what_they_share():
    """User, config path and sandbox lines the README promises are the same in every service."""
    daemon = dict(_unit_settings(SYSTEMD / "filterd.service"))
    for unit in SERVICES:
        settings = _unit_settings(SYSTEMD / unit)
        d = dict(settings)
        assert (d["User"], d["Group"], d.get("DynamicUser")) == ("filterd", "filterd", "no"), unit
        assert "--config /etc/filterd/filterd.toml" in d["ExecStart"], unit
        for key in ("ProtectSystem", "PrivateDevices", "MemoryDenyWriteExecute", "RestrictAddressFamilies",
                    "IPAddressDeny", "IPAddressAllow", "CapabilityBoundingSet", "SystemCallErrorNumber"):  # fmt: skip
            assert d.get(key) == daemon.get(key), (unit, key)
        assert _syscall_filter_lines(SYSTEMD / unit) == _syscall_filter_lines(SYSTEMD / "filterd.service"), unit
    assert "StateDirectory" not in daemon and "ReadWritePaths" not in daemon  # the daemon only reads /var/lib/filterd


# --- Prometheus ---------------------------------------------------------------------------------


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@needs_promtool
def test_prometheus_config(tmp_path):
    result = _promtool("check", "config", str(PROMETHEUS / "prometheus.yml"), cwd=tmp_path)  # rule_files: relative to the file
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rules_check():
    result = _promtool("check", "rules", str(PROMETHEUS / "filterd.rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rules_unit_tests(tmp_path):
    result = _promtool("test", "rules", str(PROMETHEUS / "filterd.rules.test.yml"), cwd=tmp_path)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def _rules() -> list[dict]:
    import yaml

    doc = yaml.safe_load((PROMETHEUS / "filterd.rules.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_has_for_severity_and_annotations():
    alerts = [r for r in _rules() if "alert" in r]
    names = {r["alert"] for r in alerts}
    assert {"FilterdDown", "FilterdErrorVerdictsRising", "FilterdClassifyLatencyHigh", "FilterdQueueDepthHigh",
            "FilterdSpamShareJump", "FilterdDeadLetters", "FilterdTrainerNoSuccessfulRefit",
            "FilterdTrainerRefitRejected", "FilterdModelReloadFailed", "FilterdStreamBacklogHigh",
            "FilterdIngressDown", "FilterdRequestLatencyHigh", "FilterdDeferralsHigh"} <= names  # fmt: skip
    for r in alerts:
        assert r.get("for"), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"].get("summary") and r["annotations"].get("description"), r["alert"]
    tested = (PROMETHEUS / "filterd.rules.test.yml").read_text()
    for name in names:  # every alert has a case in the promtool tests where it fires
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tested), f"{name} never fires in the tests"


def _exposition() -> dict[str, dict[str, set[str]]]:
    """{sample name: {label: values seen}} from both registries, every labelled metric exercised once."""
    from prometheus_client import generate_latest

    from filterd.policy.decision import SOURCES
    from filterd.obs.metrics import EVAL_MODELS, FilterdMetrics, TrainerMetrics

    daemon = FilterdMetrics()
    daemon.prime(SOURCES)  # every door: messages, classify_seconds, actions, request_seconds (milter, http), reloads
    daemon.set_model("v1", "gpt2", "cpu", "float32")
    daemon.smtp_replies.labels("250").inc()
    daemon.dead_letters.labels("too-large").inc()
    daemon.on_stream_stats("filterd:in", "filterd", 10, 2)
    daemon.on_stream_up("redis", True)
    daemon.on_redis_error("write", "oom")
    trainer = TrainerMetrics()  # refits x outcome and labels x label are pre-created
    for model in EVAL_MODELS:
        trainer.set_eval("test", model, 0.9, 0.01, 0.9)
    trainer.set_dataset_size("ham", 1)
    trainer.observe_refit("promoted", 1.0)
    names: dict[str, dict[str, set[str]]] = {}
    for registry in (daemon.registry, trainer.registry):
        text = generate_latest(registry).decode()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                if kind == "histogram":
                    for suffix in ("_bucket", "_count", "_sum"):
                        names.setdefault(name + suffix, {})
                elif not name.endswith("_created"):
                    names.setdefault(name, {})
            elif line and not line.startswith("#"):
                m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", line)
                if m and m.group(1) in names:
                    for label, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""):
                        names[m.group(1)].setdefault(label, set()).add(value)
    return names


# Label values the tests above cannot enumerate (free text or open sets): names checked, values not.
OPEN_LABELS = {"reason", "code", "version", "base", "device", "dtype", "split", "le", "stream", "group", "error"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time


def test_rules_use_only_existing_metrics_and_labels():
    metrics = _exposition()
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in metrics} | set(metrics)
    rules = _rules()
    recorded = {r["record"] for r in rules if "record" in r}
    used = set()
    for rule in rules:
        expr = rule["expr"]
        for m in re.finditer(r"(?<![\w:\"'])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?", expr):
            name, selector = m.group(1), m.group(2) or ""
            if not (name.startswith("filterd") or ":" in name):
                continue  # functions, keywords, label names in by (...), up
            used.add(name)
            assert name in metrics or name in recorded, f"{rule.get('alert') or rule.get('record')}: unknown metric {name}"
            for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
                if name in recorded or label in TARGET_LABELS:
                    continue
                assert label in metrics[name], f"{name} has no label {label!r}"
                if label in OPEN_LABELS or op.startswith("!"):
                    continue
                for alternative in value.split("|") if op == "=~" else [value]:
                    assert alternative in metrics[name][label], f"{name}{{{label}}} never takes the value {alternative!r}"
        for text in rule.get("annotations", {}).values():  # metric names cited in alert texts exist too
            for name in re.findall(r"\bfilterd_[a-z_]+\b", text):
                assert name in families, f"{rule['alert']}: annotation names unknown metric {name}"
    assert {"filterd_messages_total", "filterd_classify_seconds_bucket", "filterd_queue_depth",
            "filterd_dead_letters_total", "filterd_model_reloads_total", "filterd_trainer_refits_total",
            "filterd_trainer_last_refit_timestamp_seconds", "filterd_stream_backlog", "filterd_ingress_up",
            "filterd_request_seconds_bucket", "filterd_actions_total"} <= used  # fmt: skip


# --- Redis ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")
def test_redis_snippet_loads(tmp_path):
    """redis-server accepts the snippet as a configuration file and ends up with its settings."""
    from testing.services import free_port

    port = free_port()
    proc = subprocess.Popen(["redis-server", str(REPO / "deploy/redis/redis.conf.snippet"), "--port", str(port),
                             "--dir", str(tmp_path), "--daemonize", "no", "--logfile", str(tmp_path / "log")])  # fmt: skip
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
                time.sleep(0.05)
        config = {k: client.config_get(k)[k] for k in ("appendonly", "appendfsync", "maxmemory-policy", "protected-mode")}
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction", "protected-mode": "yes"}
        assert client.config_get("bind")["bind"].split()[0] == "127.0.0.1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- The units' seccomp policy, emulated ----------------------------------------------------------

LIBSECCOMP = ctypes.util.find_library("seccomp")
needs_libseccomp = pytest.mark.skipif(not (LIBSECCOMP and shutil.which("systemd-analyze")),
                                      reason="libseccomp or systemd-analyze not installed")  # fmt: skip

# Runs in the child: install the filters, then exec the workload (so the interpreter's own start-up
# runs under them too). Built as systemd 252 builds them (src/shared/seccomp-util.c): the
# MemoryDenyWriteExecute= and RestrictAddressFamilies= filters first (default allow), the allow list
# last, because it may not contain seccomp() itself.
_LAUNCHER = r"""
import ctypes, json, os, sys
policy = json.loads(sys.argv[1])
lib = ctypes.CDLL(policy["lib"], use_errno=True)
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
ALLOW, KILL = 0x7FFF0000, 0x80000000
ERRNO = lambda e: 0x00050000 | e
EQ, GE, MASKED_EQ = 4, 5, 7
def nr(name):
    return lib.seccomp_syscall_resolve_name(name.encode())
def rule(ctx, action, name, cmp=None):
    n = nr(name)
    if n < 0:
        return  # not a system call on this architecture
    rc = lib.seccomp_rule_add_array(ctx, action, n, 0 if cmp is None else 1, None if cmp is None else ctypes.byref(cmp))
    assert rc == 0, (name, rc)
ctx = lib.seccomp_init(ALLOW)
if policy["mdwe"]:
    W, X, SHM_EXEC = 2, 4, 0o100000
    rule(ctx, ERRNO(1), "mmap", Cmp(2, MASKED_EQ, W | X, W | X))
    for name in ("mprotect", "pkey_mprotect"):
        rule(ctx, ERRNO(1), name, Cmp(2, MASKED_EQ, X, X))
    rule(ctx, ERRNO(1), "shmat", Cmp(2, MASKED_EQ, SHM_EXEC, SHM_EXEC))
if policy["families"] is not None:
    AF_MAX = 64
    for af in range(AF_MAX):
        if af not in policy["families"]:
            rule(ctx, ERRNO(97), "socket", Cmp(0, EQ, af, 0))  # EAFNOSUPPORT
    rule(ctx, ERRNO(97), "socket", Cmp(0, GE, AF_MAX, 0))
assert lib.seccomp_load(ctx) == 0
if policy["allow"] is not None:
    ctx = lib.seccomp_init(KILL if policy["errno"] is None else ERRNO(policy["errno"]))
    for name in policy["allow"]:
        rule(ctx, ALLOW, name)
    assert lib.seccomp_load(ctx) == 0
os.execv(sys.argv[2], sys.argv[2:])
"""


def _syscall_filter_lines(unit: Path) -> list[str]:
    lines: list[str] = []
    for key, value in _unit_settings(unit):
        if key == "SystemCallFilter":
            lines = [] if not value else lines + [value]  # an empty assignment resets the list
    return lines


def _syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if re.fullmatch(r"@[\w-]+", line):
            current = groups.setdefault(line, [])
        elif line.startswith("    ") and current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.startswith("    "):
            current = None
    return groups


def _expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for item in items:
        out |= _expand(groups[item], groups) if item.startswith("@") else {item}
    return out


def _seccomp_policy(unit: Path) -> dict:
    """The unit's seccomp settings as the launcher takes them (allow-list mode only: what our units use)."""
    settings = _unit_settings(unit)
    last = {k: v for k, v in settings}
    groups = _syscall_groups()
    allow: set[str] | None = None
    for value in _syscall_filter_lines(unit):
        invert, items = value.startswith("~"), value.lstrip("~").split()
        if allow is None:
            assert not invert, "deny-list SystemCallFilter= is not emulated here"
            allow = _expand(["@default"], groups)  # systemd adds @default to every allow list
        allow = allow - _expand(items, groups) if invert else allow | _expand(items, groups)
    errno_names = {"EPERM": 1, "EACCES": 13, "ENOSYS": 38}
    errno = last.get("SystemCallErrorNumber")
    families = last.get("RestrictAddressFamilies")
    af = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
    return {
        "lib": LIBSECCOMP,
        "allow": sorted(allow) if allow is not None else None,
        "errno": errno_names[errno] if errno else None,
        "mdwe": last.get("MemoryDenyWriteExecute", "no") in ("yes", "true", "1", "on"),
        "families": [af[f] for f in families.split()] if families else None,
    }


def _sandboxed(unit: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-c", _LAUNCHER, json.dumps(_seccomp_policy(SYSTEMD / unit)), *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED / "tiktoken"), "PYTHONPATH": str(REPO)}


@needs_libseccomp
def test_launcher_enforces_the_policy(tmp_path):
    """The emulation bites: a setuid() and (with MemoryDenyWriteExecute) a W+X mapping are refused."""
    policy = _seccomp_policy(SYSTEMD / "filterd.service")
    policy["mdwe"] = True
    probe = textwrap.dedent("""
        import ctypes, os, socket
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        p = libc.mmap(None, 4096, 7, 0x22, -1, 0)  # PROT_READ|WRITE|EXEC, MAP_PRIVATE|ANONYMOUS
        print("wx", "refused" if p in (None, 2**64 - 1) else "allowed")
        try:
            os.setuid(0); print("setuid allowed")
        except PermissionError:
            print("setuid refused")
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW); print("packet allowed")
        except OSError:
            print("packet refused")
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close(); print("inet6 ok")
    """)
    cmd = [sys.executable, "-c", _LAUNCHER, json.dumps(policy), sys.executable, "-c", probe]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[:4] == ["wx refused", "setuid refused", "packet refused", "inet6 ok"], out.stdout + out.stderr


# torch ops that run code oneDNN generates at run time (W+X memory): what MemoryDenyWriteExecute=yes breaks.
_TORCH_JIT_OPS = """
import torch, torch.nn.functional as F
x = torch.randn(4, 16, 64, requires_grad=True)
F.gelu(torch.nn.Linear(64, 64)(x)).sum().backward()
(x.detach().bfloat16() @ x.detach().bfloat16().transpose(1, 2)).float().sum().item()
torch.nn.Conv1d(16, 16, 3)(x.detach()).sum().item()
print("torch ops ok")
"""


@needs_libseccomp
def test_refit_runs_under_the_trainer_policy(tmp_path):
    """Fine-tune (backward pass, plots, safetensors), refit (feature cache, gate, atomic publish), oneDNN ops."""
    workload = textwrap.dedent(f"""
        import csv, sys
        from pathlib import Path
        out = Path(sys.argv[1])
        rows = [l.rstrip("\\n").split("\\t", 1) for l in open({str(SHARED / "data/sms-spam-collection/SMSSpamCollection")!r}, encoding="utf-8")]
        spam = [r for r in rows if r[0] == "spam"][:60]
        ham = [r for r in rows if r[0] == "ham"][:60]
        data = out / "data"
        data.mkdir(parents=True)
        for name, lo, n in (("train", 0, 40), ("val", 40, 10), ("test", 50, 10)):
            with open(data / f"{{name}}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "label", "text"])
                for j, (label, text) in enumerate(spam[lo:lo + n] + ham[lo:lo + n]):
                    w.writerow([f"{{name}}{{j}}", label, text])
        from trainer.fit import FitConfig, fit
        r = fit(FitConfig(data=data, base="random:tiny", out=out / "v1", trainable="all", epochs=1, eval_every=5, progress=False))
        from filterd.config import load_config
        from trainer.refit import refit_once
        from filterd.store.labels import LabelStore
        (out / "f.toml").write_text(f'[redis]\\nenabled = false\\n[trainer]\\nstore = "{{out}}/labels.sqlite"\\n'
                                    f'models_dir = "{{out}}/models"\\nmin_per_class = 5\\n')
        cfg = load_config(out / "f.toml")
        with LabelStore(cfg.trainer.store) as store:
            for label, text in spam + ham:
                store.add(text, label, "test")
            result = refit_once(cfg, store, base_model_dir=r.model_dir)
        assert result.outcome in ("promoted", "rejected"), (result.outcome, result.reason)
        print("refit", result.outcome)
    """) + _TORCH_JIT_OPS
    for unit in ("filterd-trainer.service", "filterd-trainer-refit.service"):
        out = tmp_path / unit
        cmd = _sandboxed(unit, [sys.executable, "-c", workload, str(out)])
        result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
        assert result.returncode == 0 and "torch ops ok" in result.stdout, f"{unit}:\n{result.stdout}\n{result.stderr[-3000:]}"


def _tiny_model_dir(path: Path) -> Path:
    from filterd.model.bases import build_model, resolve_base
    from filterd.model.weights import ModelMeta, write_model_files

    model = build_model(resolve_base("random:tiny"))
    meta = ModelMeta(version="", base="random:tiny", base_kind="random", config=model.config, max_length=64)
    write_model_files(model, meta, path)
    return path


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except OSError as e:
        return getattr(e, "code", 0) or 0


@needs_libseccomp
@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")
def test_daemon_serves_under_its_policy(tmp_path, redis_server):
    """filterd serve (SMTP, Redis, metrics, SIGHUP reload, SIGTERM drain) under filterd.service's filters."""
    from testing.services import free_port

    model = _tiny_model_dir(tmp_path / "model")
    metrics_port = free_port()
    config = tmp_path / "filterd.toml"
    config.write_text(textwrap.dedent(f"""
        [model]
        path = "{model}"
        [redis]
        url = "{redis_server.url}"
        [smtp]
        listen = "127.0.0.1:{free_port()}"
        next_hop = "127.0.0.1:{free_port()}"
        [metrics]
        listen = "127.0.0.1:{metrics_port}"
    """))
    cmd = _sandboxed("filterd.service", [sys.executable, "-m", "filterd", "serve", "--config", str(config)])
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + 90
        while _get(f"http://127.0.0.1:{metrics_port}/healthz") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        client = redis_server.client()
        client.xadd("filterd:in", {"text": "WINNER! claim your free prize now", "id": "m1"})
        deadline = time.monotonic() + 30
        while not (entries := client.xrange("filterd:out")):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert entries[0][1][b"id"] == b"m1" and entries[0][1][b"verdict"] in (b"spam", b"ham")
        proc.send_signal(signal.SIGHUP)  # reload: loads and warms the model again, in a thread
        time.sleep(2)
        assert proc.poll() is None and _get(f"http://127.0.0.1:{metrics_port}/healthz") == 200, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Operation not permitted" not in text and "EPERM" not in text, text


# --- Redis ACL users (deploy/redis/users.acl) -----------------------------------------------------

ROLES = ("admin", "gateway", "filterd", "trainer", "learner")


@pytest.fixture
def acl_redis(tmp_path):
    """redis-server with users.acl (passwords filled in); yields (port, client factory by user)."""
    import redis

    from testing.services import free_port

    acl = tmp_path / "users.acl"
    acl.write_text((REPO / "deploy/redis/users.acl").read_text().replace(">CHANGE-ME-", ">pw-"))
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--aclfile", str(acl),
                             "--dir", str(tmp_path), "--save", "", "--daemonize", "no", "--logfile", str(tmp_path / "log")])  # fmt: skip

    def client(user: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, username=user, password=f"pw-{user}", decode_responses=True, socket_timeout=5)

    deadline = time.monotonic() + 10
    while True:
        try:
            client("admin").ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
    try:
        yield port, client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _subscribe(client, channel: str) -> None:
    ps = client.pubsub()
    try:
        ps.subscribe(channel)
        ps.get_message(timeout=5)  # the reply, or the refusal, arrives here
    finally:
        ps.close()


def _denied(call) -> bool:
    import redis

    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")
def test_redis_acl_users_can_do_their_job_and_nothing_else(acl_redis):
    import redis

    port, client = acl_redis
    gw, fd, tr, le, admin = client("gateway"), client("filterd"), client("trainer"), client("learner"), client("admin")
    with pytest.raises(redis.exceptions.AuthenticationError):  # no anonymous access: the default user is off
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()

    # gateway: XADD filterd:in; a consumer group (or XREAD) on filterd:out and filterd:dead
    gw.xadd("filterd:in", {"text": "hi", "id": "1"})
    admin.xadd("filterd:out", {"id": "1", "verdict": "ham"})
    gw.xgroup_create("filterd:out", "gateway", id="0")
    [[_, entries]] = gw.xreadgroup("gateway", "gw-1", {"filterd:out": ">"})
    assert gw.xack("filterd:out", "gateway", entries[0][0]) == 1 and gw.xread({"filterd:dead": 0}) == []
    for forbidden in (lambda: gw.publish("filterd:model", "v"), lambda: gw.xadd("filterd:labels", {"label": "spam", "text": "x"}),
                      lambda: gw.xread({"filterd:labels": 0}), lambda: gw.xadd("filterd:out", {"verdict": "ham"}),
                      lambda: gw.xrange("filterd:in"), lambda: gw.delete("filterd:out"), lambda: gw.get("k")):  # fmt: skip
        assert _denied(forbidden)

    # filterd: its group on filterd:in, results + XACK in one transaction, dead letters, SUBSCRIBE
    fd.xgroup_create("filterd:in", "filterd", id="0")
    [[_, [(entry, _)]]] = fd.xreadgroup("filterd", "host-1", {"filterd:in": ">"})
    pipe = fd.pipeline(transaction=True)
    pipe.xadd("filterd:out", {"id": "1", "verdict": "ham"}, maxlen=1000, approximate=True)
    pipe.xadd("filterd:dead", {"error": "too-large"})
    pipe.xack("filterd:in", "filterd", entry)
    assert pipe.execute()[2] == 1
    fd.xpending_range("filterd:in", "filterd", "-", "+", 10) and fd.xautoclaim("filterd:in", "filterd", "host-2", 0)
    ps = fd.pubsub()
    ps.subscribe("filterd:model")
    assert ps.get_message(timeout=5)["type"] == "subscribe"
    for forbidden in (lambda: fd.publish("filterd:model", "v"), lambda: fd.xadd("filterd:in", {"text": "x"}),
                      lambda: fd.xread({"filterd:labels": 0}), lambda: fd.xrange("filterd:out"),
                      lambda: fd.xadd("filterd:labels", {"label": "spam"}), lambda: fd.xtrim("filterd:in", maxlen=0)):  # fmt: skip
        assert _denied(forbidden)

    # learner: XADD filterd:labels, nothing else
    le.xadd("filterd:labels", {"label": "spam", "text": "WIN a prize"}, maxlen=1000, approximate=True)
    for forbidden in (lambda: le.xrange("filterd:labels"), lambda: le.xadd("filterd:in", {"text": "x"}),
                      lambda: le.publish("filterd:model", "v"), lambda: le.xread({"filterd:out": 0})):  # fmt: skip
        assert _denied(forbidden)

    # trainer: its group on filterd:labels, dead letters, PUBLISH filterd:model (heard by filterd)
    tr.xgroup_create("filterd:labels", "filterd-trainer", id="0")
    [[_, [(label_entry, fields)]]] = tr.xreadgroup("filterd-trainer", "t-1", {"filterd:labels": ">"})
    assert fields["label"] == "spam" and tr.xack("filterd:labels", "filterd-trainer", label_entry) == 1
    tr.xadd("filterd:dead", {"stream": "filterd:labels", "error": "unknown-label"})
    assert tr.publish("filterd:model", "v2") == 1
    assert ps.get_message(timeout=5)["data"] == "v2"
    ps.close()
    for forbidden in (lambda: tr.publish("other", "v"), lambda: tr.xadd("filterd:in", {"text": "x"}),
                      lambda: tr.xadd("filterd:labels", {"label": "spam"}), lambda: tr.xread({"filterd:out": 0}),
                      lambda: _subscribe(tr, "filterd:model")):  # fmt: skip
        assert _denied(forbidden)


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")
def test_daemon_and_trainer_run_as_their_acl_users(acl_redis, tmp_path):
    """The real filterd serve (user filterd) classifies what the gateway sends and reloads on the
    trainer's announcement; the real label intake (user trainer) takes in the learner's labels."""
    import asyncio

    from filterd.config import load_config
    from filterd.obs.metrics import TrainerMetrics
    from trainer.intake import LabelIntake
    from trainer.publish import ModelStore
    from filterd.store.labels import LabelStore

    from testing.daemon import FilterdProcess

    port, client = acl_redis
    url = lambda user: f"redis://{user}:pw-{user}@127.0.0.1:{port}/0"  # noqa: E731
    gw, le = client("gateway"), client("learner")
    model = _tiny_model_dir(tmp_path / "model")
    admin = client("admin")
    admin.xgroup_create("filterd:in", "filterd", id="0", mkstream=True)
    admin.xgroup_createconsumer("filterd:in", "filterd", "crashed-host")  # a dead consumer left by an old process
    d = FilterdProcess(model, url("filterd"), tmp_path / "serve.log", model__min_reload_interval="0s",
                       redis__dead_consumer_idle="1s").start()  # fmt: skip
    try:
        gw.xadd("filterd:in", {"text": "WINNER! claim your free prize now", "id": "m1"})
        gw.xadd("filterd:in", {"id": "no-text"})  # dead-lettered
        gw.xgroup_create("filterd:out", "gateway", id="0", mkstream=True)
        deadline = time.monotonic() + 30
        got: list = []
        while not got:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            got = gw.xreadgroup("gateway", "gw-1", {"filterd:out": ">"}, block=200)
        assert got[0][1][0][1]["id"] == "m1"
        deadline = time.monotonic() + 30
        while not gw.xrange("filterd:dead"):
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        while ModelStore.announce(url("trainer"), "filterd:model", "v") != 1:  # filterd is subscribed (as filterd)
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        consumers = lambda: [c["name"] for c in admin.xinfo_consumers("filterd:in", "filterd")]  # noqa: E731
        while "crashed-host" in consumers():  # housekeeping (XGROUP DELCONSUMER in a script) is allowed too
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
    finally:
        assert d.stop() == 0
    log = (tmp_path / "serve.log").read_text()
    assert "NOPERM" not in log and "no permissions" not in log, log
    assert consumers() == [], log  # a clean exit leaves the group

    le.xadd("filterd:labels", {"label": "spam", "text": "WIN a free prize", "id": "l1"})
    le.xadd("filterd:labels", {"label": "maybe", "text": "?", "id": "l2"})
    cfg = load_config(None, [f"redis.url={url('trainer')}", f"trainer.store={tmp_path / 'labels.sqlite'}"])
    with LabelStore(cfg.trainer.store) as store:
        n = asyncio.run(LabelIntake(cfg.redis, cfg.trainer, store, TrainerMetrics()).drain_once(10))
        assert n == 2 and store.counts()["spam"] == 1
    assert [f["error"] for _, f in client("admin").xrange("filterd:dead") if f.get("stream") == "filterd:labels"], "no dead letter"
