"""A private Rspamd (Debian's package, 3.x) as filterd's peer in the benches: a real `rspamd` process
on loopback ports, with its own configuration, database, run and log directories.

The stock rules from /etc/rspamd are used as shipped (`$CONFDIR`), with our own top-level file and
`$LOCAL_CONFDIR` (local.d/, override.d/) in a temporary directory, so /etc/rspamd is never touched
and the instance on 11333/11334 is never started. Nothing leaves the machine: every module that
would ask DNS (RBL, URIBL/SURBL, SPF, DKIM, DMARC, ARC, ASN, hfilter), a remote service (fuzzy,
DCC, Razor/Pyzor, antivirus) or download a map (phishing feeds, freemail and whitelist maps) is
disabled, the maps that have a shipped copy use it, and DNS goes to a closed local port so that a
lookup left over fails at once instead of leaving the machine.
Two variants: rules only (no classifier), and with Bayes on a private redis-server
(`RspamdServer(redis_url=...)`), learned through `rspamc learn_spam` / `learn_ham` (`learn()`).
As root the workers run as the package's `_rspamd` user (`-u`/`-g`), so the instance lives in its
own directory under /tmp that user can enter (pytest's temporary directories are 0700).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from testing.services import free_port, tree_cpu_s

INSTALL_HINT = "apt-get install -y -q --no-install-recommends rspamd   (make services does it)"
USER = "_rspamd"  # created by Debian's package
# Rspamd compiles its regular expressions and the public-suffix list for Hyperscan at every start
# (a minute of CPU on a busy machine) unless it finds them here; entries are keyed by their input.
HS_CACHE = Path(tempfile.gettempdir()) / "filterd-rspamd-hs-cache"

# Lua modules that query DNS, a remote service or a URL, or keep state in Redis besides Bayes.
NETWORK_MODULES = (
    "rbl", "surbl", "emails", "spf", "dmarc", "arc", "asn", "hfilter", "mx_check", "whitelist", "phishing",
    "multimap", "url_redirector", "dcc", "external_services", "antivirus", "bimi", "p0f", "rspamd_update",
    "greylist", "ratelimit", "history_redis", "neural", "replies", "reputation", "clickhouse", "elastic",
    "metadata_exporter", "metric_exporter", "aws_s3",
)  # fmt: skip
# C modules: dkim and fuzzy_check are left out of the default "chartable,dkim,regexp,fuzzy_check".
FILTERS = "chartable,regexp"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it dies, so that a killed
    test or bench leaves no Rspamd behind (it runs in its own session, out of reach of ^C)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def rspamd_available() -> bool:
    return shutil.which("rspamd") is not None and shutil.which("rspamc") is not None


class RspamdError(RuntimeError):
    pass


@dataclass
class LearnRun:
    """What `learn()` did: messages sent and learned per class (rspamc's "success" replies), the wall
    time, the CPU seconds Rspamd's process tree and its redis-server used meanwhile, and why the
    rest were declined (the stock learn condition skips a message Bayes already puts in that class)."""

    sent_spam: int
    sent_ham: int
    learned_spam: int
    learned_ham: int
    wall_s: float
    rspamd_cpu_s: float
    redis_cpu_s: float
    rspamc_rc: tuple[int, ...]
    declined: dict[str, int]  # Rspamd's reason (message id left out): how many


class RspamdServer:
    """`rspamd --no-fork` from `<root>/rspamd.conf`: a normal (scanning) worker on normal_port, the
    controller (learning, statistics) on controller_port, both on 127.0.0.1; with redis_url, the
    Bayes classifier on that Redis (min_learns of each class before it votes)."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        redis_url: str | None = None,
        redis_pid: int | None = None,
        workers: int | None = None,
        min_learns: int = 10,
        hs_cache: Path | None = HS_CACHE,
        nameserver: str | None = None,
    ) -> None:
        if not rspamd_available():
            raise RspamdError(f"rspamd/rspamc not installed: {INSTALL_HINT}")
        self.root = Path(tempfile.mkdtemp(prefix="filterd-rspamd-"))
        self.root.chmod(0o711)
        atexit.register(shutil.rmtree, self.root, True)
        if directory is not None:  # the caller's directory points at it, as testing/postfix.py does
            Path(directory).parent.mkdir(parents=True, exist_ok=True)
            Path(directory).symlink_to(self.root, target_is_directory=True)
        self.conf = self.root / "rspamd.conf"
        self.local = self.root / "etc"
        self.log = self.root / "log" / "rspamd.log"
        self.normal_port = free_port()
        self.controller_port = free_port()
        self.redis_url = redis_url
        self.redis_pid = redis_pid  # for learn()'s CPU figure only
        self.workers = workers  # None: `count` left to Rspamd (one normal worker with 3.4 here)
        self.min_learns = min_learns
        self.hs_cache = hs_cache  # None: a fresh one in the instance's database directory
        # Where Rspamd's resolver sends queries; by default a closed local port, so that a lookup
        # left over fails at once (a test passes its own listener to see whether any is made).
        self.nameserver = nameserver or f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None

    @property
    def bayes(self) -> bool:
        return self.redis_url is not None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    # -- configuration ---------------------------------------------------------------------------

    def main_conf(self) -> str:
        """The stock top level (common.conf, rspamd.conf: rules, the Lua plugins' path, modules.d/)
        less the proxy and fuzzy workers, with statistic.conf only for Bayes: a classifier without a
        backend would not start."""
        count = f"\n  count = {self.workers};" if self.workers else ""
        stat = '.include "$CONFDIR/statistic.conf"\n' if self.bayes else ""
        return f"""lua = "$RULESDIR/rspamd.lua";
.include "$CONFDIR/metrics.conf"
.include "$CONFDIR/actions.conf"
.include "$CONFDIR/groups.conf"
.include "$CONFDIR/composites.conf"
{stat}.include "$CONFDIR/modules.conf"
.include "$CONFDIR/settings.conf"
modules {{
  path = "${{PLUGINSDIR}}";
  fallback_path = "${{SHAREDIR}}/lua";
}}

options {{
  pidfile = "$RUNDIR/rspamd.pid";
  .include "$CONFDIR/options.inc"
  .include(priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
  type = "file";
  filename = "$LOGDIR/rspamd.log";
  .include "$CONFDIR/logging.inc"
}}
worker "normal" {{
  bind_socket = "127.0.0.1:{self.normal_port}";
  .include "$CONFDIR/worker-normal.inc"{count}
}}
worker "controller" {{
  bind_socket = "127.0.0.1:{self.controller_port}";
  count = 1;
  secure_ip = "127.0.0.1"; # learning and statistics from loopback need no password
  static_dir = "${{WWWDIR}}";
}}
"""

    def local_files(self) -> dict[str, str]:
        """$LOCAL_CONFDIR's files, by path under it."""
        files = {
            "local.d/options.inc": f'filters = "{FILTERS}";\n'
            f'dns {{ nameserver = ["{self.nameserver}"]; timeout = 0.1s; retransmits = 1; }}\n'
            + (f'hs_cache_dir = "{self.hs_cache}";\n' if self.hs_cache else ""),
            # Greylisting is off, so is its action: anything but "no action" is then a spam verdict
            # (add header from the stock 6 points, reject from 15).
            "local.d/actions.conf": "greylist = null;\n",
            # The shipped copies of the maps these modules would otherwise download first.
            "override.d/mime_types.conf": 'file = ["fallback+file://${CONFDIR}/maps.d/mime_types.inc"];\n',
            "override.d/mid.conf": 'source { url = ["fallback+file://${CONFDIR}/maps.d/mid.inc"]; }\n',
        }
        for module in NETWORK_MODULES:
            files[f"local.d/{module}.conf"] = "enabled = false;\n"
        if self.bayes:
            host_port = re.sub(r"^redis://([^/]+)(/.*)?$", r"\1", self.redis_url or "")
            files["local.d/classifier-bayes.conf"] = f'servers = "{host_port}";\nmin_learns = {self.min_learns};\n'
        return files

    def write_config(self) -> None:
        for d in ("etc/local.d", "etc/override.d", "db", "run", "log", "learn"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.main_conf())
        for name, text in self.local_files().items():
            (self.local / name).write_text(text)
        if self.hs_cache:
            self.hs_cache.mkdir(mode=0o755, exist_ok=True)
        if os.geteuid() == 0:
            for p in [self.root, *self.root.rglob("*"), *([self.hs_cache] if self.hs_cache else [])]:
                shutil.chown(p, USER, USER)

    # -- lifecycle -------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        dirs = {"LOCAL_CONFDIR": self.local, "DBDIR": self.root / "db", "RUNDIR": self.root / "run", "LOGDIR": self.log.parent}
        argv = ["rspamd", "--no-fork", "-c", str(self.conf), *(f"--var={k}={v}" for k, v in dirs.items())]
        return argv + (["-u", USER, "-g", USER] if os.geteuid() == 0 else [])

    def start(self, timeout: float = 300.0) -> "RspamdServer":
        """Start and wait until both workers answer /ping and, where Rspamd compiles its regular
        expressions for Hyperscan (a helper process, tens of seconds unless HS_CACHE has them), the
        normal workers have them: before that they scan with slower PCRE, which would skew the figures."""
        self.write_config()
        out = open(self.root / "log" / "stdout.log", "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.root, start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RspamdError(f"rspamd exited {self.proc.returncode}\n{self.log_tail()}")
            if self.ping() and self.ping(self.controller_port) and self.hyperscan_ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RspamdError(f"rspamd not ready within {timeout}s\n{self.log_tail()}")

    def workers_named(self, kind: str) -> list[int]:
        """Pids of the live child processes titled `rspamd: <kind> process`."""
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                title = (p / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.pid and title.startswith(f"rspamd: {kind} process".encode()):
                out.append(int(p.name))
        return out

    def hyperscan_ready(self) -> bool:
        """The helper has compiled what the cache lacked and every normal worker has loaded the result
        (with nothing to compile, the main process loaded it all from the cache before forking)."""
        normal, log = self.workers_named("normal"), self._log_text()
        if not normal:
            return False
        if not self.workers_named("hs_helper") and "hs_helper" not in log:
            return True  # built without Hyperscan
        compiled = re.search(r"\(hs_helper\).*rspamd_rs_compile_cb: compiled (\d+) regular expressions", log)
        if compiled is None:
            return False
        loaded = re.findall(r"#(\d+)\(normal\).*full hyperscan database of \d+ regexps has been loaded", log)
        return compiled[1] == "0" or set(normal) <= {int(p) for p in loaded}

    def ping(self, port: int | None = None) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port or self.normal_port}/ping", timeout=2) as r:
                return r.read().strip() == b"pong"
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the main process (it stops its workers), SIGKILL to the group after timeout. Safe any time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "RspamdServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- using it ------------------------------------------------------------------------------

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the main process and its workers so far, reaped ones included."""
        return tree_cpu_s(self.pid)

    def rspamc_argv(self, *args: str, controller: bool = False, parallel: int | None = None) -> list[str]:
        port = self.controller_port if controller else self.normal_port
        return ["rspamc", "-h", f"127.0.0.1:{port}", "-t", "60", *(["-n", str(parallel)] if parallel else []), *args]

    def rspamc(self, *args: str, controller: bool = False, parallel: int | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run rspamc against the normal worker (scans) or the controller (learn_*, stat)."""
        argv = self.rspamc_argv(*args, controller=controller, parallel=parallel)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def learned(self) -> int:
        """Messages the controller has learned since it started (`rspamc stat`: "Messages learned")."""
        m = re.search(r"Messages learned: (\d+)", self.rspamc("stat", controller=True).stdout)
        return int(m[1]) if m else 0

    def learn(self, spam: list[bytes], ham: list[bytes], parallel: int = 16) -> LearnRun:
        """Teach Bayes these messages with `rspamc learn_spam DIR` and `learn_ham DIR` (the files
        written under <root>/learn first). A message Rspamd declines (fewer than the classifier's
        min_tokens words, or one already learned) counts as sent, not learned."""
        if not self.bayes:
            raise RspamdError("learn() needs the Bayes variant (redis_url)")
        dirs = []
        for kind, raws in (("spam", spam), ("ham", ham)):
            d = self.root / "learn" / kind
            d.mkdir(parents=True, exist_ok=True)
            for i, raw in enumerate(raws):
                (d / f"{i:06d}.eml").write_bytes(raw)
            dirs.append(d)
        c0, r0, t0 = self.cpu_s(), tree_cpu_s(self.redis_pid), time.perf_counter()
        runs = [
            self.rspamc(f"learn_{kind}", str(d), controller=True, parallel=parallel) for kind, d in zip(("spam", "ham"), dirs)
        ]
        wall = time.perf_counter() - t0
        cpu, redis_cpu = self.cpu_s() - c0, tree_cpu_s(self.redis_pid) - r0
        ok = [p.stdout.count("success = true;") for p in runs]
        errors = Counter(m for p in runs for m in re.findall(r'error = "(?:<[^>]*> )?([^"]*)"', p.stdout))
        return LearnRun(len(spam), len(ham), ok[0], ok[1], round(wall, 3), round(cpu, 3), round(redis_cpu, 3),
                        tuple(p.returncode for p in runs), dict(errors))  # fmt: skip

    def actions(self) -> dict[str, float]:
        """The action thresholds in force (controller's /actions), e.g. {"add header": 6.0, "reject": 15.0}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.controller_port}/actions", timeout=5) as r:
            return {a["action"]: float(a["value"]) for a in json.loads(r.read()) if a.get("value") is not None}

    def _log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        lines = self._log_text().splitlines()[-n:]
        stdout = (
            (self.root / "log" / "stdout.log").read_text(errors="replace") if (self.root / "log" / "stdout.log").exists() else ""
        )
        return "\n".join(lines) + (f"\n(stdout) {stdout[-2000:]}" if stdout.strip() else "")
