"""A real Postfix for end-to-end tests: a private instance on loopback ports, configured with the
snippets we ship in deploy/postfix/, relaying everything to a test SMTP server.

Root only (Postfix's master must start as root). Postfix logs to `<tmp>/maillog` (there is no
syslog here), and every failure raised from this module carries the tail of that log.
On alternate_config_directories: Postfix checks it only for set-gid commands run by a non-root
user (postqueue, postdrop), and only for the exact directory, not a parent; as root, `postfix -c`
and `postqueue -c` work without it, so /etc/postfix/main.cf is never touched (it may not exist).
The default instance (port 25) is never started: every command names the private directory.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import smtplib
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from email.parser import BytesHeaderParser
from pathlib import Path

from testing.services import free_port

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "postfix"
SBIN = Path("/usr/sbin")
# The package's pristine files, which Debian's postinst builds /etc/postfix from ("No configuration"
# leaves main.cf absent); never the live /etc/postfix/master.cf, which may already hold our snippet.
BASE_MAIN_CF = (Path("/usr/share/postfix/main.cf.debian"), Path("/etc/postfix/main.cf.proto"))
BASE_MASTER_CF = (Path("/usr/share/postfix/master.cf.dist"), Path("/etc/postfix/master.cf.proto"))
INSTALL_HINT = (
    'echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; '
    "DEBIAN_FRONTEND=noninteractive apt-get install -y postfix   (make services does it)"
)


def postfix_available() -> bool:
    return (SBIN / "postfix").exists() and os.geteuid() == 0


class PostfixError(RuntimeError):
    pass


class PostfixServer:
    """Postfix from `<tmp>/etc`: submission smtpd on smtpd_port; with content_filter, queued mail goes
    to 127.0.0.1:filter_port and comes back on 127.0.0.1:reinject_port (deploy/postfix/*.cf with the
    ports substituted); every delivery goes to [127.0.0.1]:relay_port, DNS off, short retry times."""

    def __init__(
        self,
        tmp: Path,
        smtpd_port: int | None = None,
        filter_port: int | None = None,
        reinject_port: int | None = None,
        relay_port: int | None = None,
        content_filter: bool = True,
        *,
        hostname: str = "mx.filterd.test",
        milter_port: int | None = None,
        milter_default_action: str | None = None,
    ) -> None:
        if not (SBIN / "postfix").exists():
            raise PostfixError(f"postfix not installed: {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance must be started as root")
        # The instance lives in its own 0711 directory under /tmp, linked from `tmp`: Postfix's
        # unprivileged daemons open paths in it by name, and pytest's base temp dir is 0700 (and
        # reset to 0700 whenever another pytest session starts, which broke a parallel run).
        self.root = Path(tempfile.mkdtemp(prefix="filterd-postfix-"))
        self.root.chmod(0o711)
        atexit.register(shutil.rmtree, self.root, True)  # after the session: tests may read maillog after stop()
        Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        Path(tmp).symlink_to(self.root, target_is_directory=True)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        self.smtpd_port = smtpd_port or free_port()
        self.filter_port = filter_port or free_port()
        self.reinject_port = reinject_port or free_port()
        self.relay_port = relay_port or free_port()
        self.content_filter = content_filter
        self.hostname = hostname
        # With milter_port, deploy/postfix/milter.main.cf is added with its port replaced; with
        # milter_default_action, its per-milter "default_action=accept" is replaced too.
        self.milter_port = milter_port
        self.milter_default_action = milter_default_action

    # -- configuration ---------------------------------------------------------------------------

    def _test_settings(self) -> dict[str, str]:
        """Appended last, so they override the base and the deploy snippet."""
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "myhostname": self.hostname,
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Nothing is local: every recipient is relayed to the sink, no /etc/aliases.
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[127.0.0.1]:{self.relay_port}",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            # Deferred mail is retried within a second or two, so flush() and restarts act fast.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "transport_retry_time": "1s",
            "in_flow_delay": "0",
            # No postmaster notices: they would be relayed to the sink and counted as mail.
            "notify_classes": "",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
        }

    def _milter_cf(self) -> str:
        text = (DEPLOY / "milter.main.cf").read_text()
        entry = re.compile(r"\{ inet:127\.0\.0\.1:11332, default_action=accept,")
        if len(entry.findall(text)) != 2:  # smtpd_milters and non_smtpd_milters
            raise PostfixError("deploy/postfix/milter.main.cf no longer has two '{ inet:127.0.0.1:11332, "
                               "default_action=accept,' entries: update testing/postfix.py")  # fmt: skip
        action = self.milter_default_action or "accept"
        return entry.sub(f"{{ inet:127.0.0.1:{self.milter_port}, default_action={action},", text)

    def _deploy(self, name: str) -> str:
        text = (DEPLOY / name).read_text()
        must = {"main.cf": "10025", "master.cf": "10026"}[name]  # content_filter; re-injection listener
        if not re.search(rf"127\.0\.0\.1\]?:{must}\b", text):
            raise PostfixError(f"deploy/postfix/{name} no longer mentions 127.0.0.1:{must}: update testing/postfix.py")
        for shipped, port in (("10025", self.filter_port), ("10026", self.reinject_port)):
            text = re.sub(rf"(127\.0\.0\.1\]?):{shipped}\b", rf"\g<1>:{port}", text)
        return text

    def main_cf(self) -> str:
        base = _first_existing(BASE_MAIN_CF).read_text()
        deploy = self._deploy("main.cf")
        if not self.content_filter:
            deploy = "\n".join(e for e in _logical_lines(deploy) if _key(e) != "content_filter")
        tests = "\n".join(f"{k} = {v}" for k, v in self._test_settings().items())
        blocks = [base, "# --- deploy/postfix/main.cf ---\n" + deploy]
        if self.milter_port:
            blocks.append("# --- deploy/postfix/milter.main.cf ---\n" + self._milter_cf())
        return _merge_main_cf([*blocks, "# --- test settings ---\n" + tests])

    def master_cf(self) -> str:
        base = _first_existing(BASE_MASTER_CF).read_text()
        out = [_test_service(e, self.smtpd_port) for e in _logical_lines(base)]
        if not any(_key_fields(e)[:2] == ["postlog", "unix-dgram"] for e in out):
            out.append("postlog   unix-dgram n  -       n       -       1       postlogd")
        out.append("# --- deploy/postfix/master.cf ---")
        out += [_test_service(e, self.smtpd_port) for e in _logical_lines(self._deploy("master.cf"))]
        return "\n".join(out) + "\n"

    def write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "master.cf").write_text(self.master_cf())
        for d in (self.root, self.config_dir, self.queue_dir):
            d.chmod(0o755)
        shutil.chown(self.data_dir, "postfix", "postfix")  # master takes its lock there as postfix
        self.data_dir.chmod(0o700)
        _make_traversable(self.root)

    # -- lifecycle -------------------------------------------------------------------------------

    def _cmd(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [str(SBIN / args[0]), "-c", str(self.config_dir), *args[1:]]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
        if check and p.returncode != 0:
            raise PostfixError(f"{' '.join(argv)} exited {p.returncode}: {(p.stdout + p.stderr).strip()}\n{self._log_excerpt()}")
        return p

    def start(self, timeout: float = 30.0) -> "PostfixServer":
        if self.running():
            return self
        self.write_config()
        lint = self._cmd("postconf", "-n").stderr + self._cmd("postconf", "-P").stderr
        unused = [line for line in lint.splitlines() if "unused parameter" in line or "fatal" in line]
        if unused:  # a typo in the shipped snippets would otherwise be silently ignored
            raise PostfixError("postconf rejects the configuration:\n" + "\n".join(unused))
        self._cmd("postfix", "check")
        self._cmd("postfix", "start")
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", self.smtpd_port, timeout=5) as c:
                    if c.noop()[0] == 250:
                        return self
            except (OSError, smtplib.SMTPException) as e:
                last = e
                time.sleep(0.05)
        self.stop()
        raise PostfixError(f"postfix smtpd did not answer on 127.0.0.1:{self.smtpd_port} ({last})\n{self._log_excerpt()}")

    def master_pid(self) -> int | None:
        """The live master's pid (from its pid file), or None."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) and b"master" in _cmdline(pid) else None

    def running(self) -> bool:
        return self.master_pid() is not None and self._cmd("postfix", "status", check=False).returncode == 0

    def stop(self, timeout: float = 15.0) -> None:
        """`postfix stop`, then make sure the master and its children are gone. Safe to call any time."""
        pid = self.master_pid()
        if pid is None:
            return
        try:
            self._cmd("postfix", "stop", check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        if not _wait_gone(pid, timeout):
            try:  # the master leads its own session and process group: take the children too
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not _wait_gone(pid, 5):
                raise PostfixError(f"postfix master {pid} survived SIGKILL")
        _wait_reaped(pid, 3)  # orphaned, it is reaped by init; wait so `pgrep master` comes back clean

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "PostfixServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- using it ------------------------------------------------------------------------------

    def submit(self, raw: bytes, mail_from: str, rcpt_tos: Sequence[str], timeout: float = 30) -> str:
        """Send one message to the submission smtpd (line ends made CRLF); returns Postfix's queue id."""
        data = re.sub(rb"\r?\n", b"\r\n", raw)
        options = []
        if any(not a.isascii() for a in (mail_from, *rcpt_tos)):
            options.append("SMTPUTF8")
        if not data.isascii():
            options.append("BODY=8BITMIME")
        with smtplib.SMTP("127.0.0.1", self.smtpd_port, timeout=timeout) as c:
            c.ehlo("client.filterd.test")
            code, reply = c.mail(mail_from, options)
            if code != 250:
                raise PostfixError(f"MAIL FROM:<{mail_from}> refused: {code} {reply!r}")
            for rcpt in rcpt_tos:
                code, reply = c.rcpt(rcpt)
                if code not in (250, 251):
                    raise PostfixError(f"RCPT TO:<{rcpt}> refused: {code} {reply!r}\n{self._log_excerpt()}")
            code, reply = c.data(data)
            if code != 250:
                raise PostfixError(f"DATA refused: {code} {reply!r}\n{self._log_excerpt()}")
        m = re.search(rb"queued as (\S+)", reply)
        return m.group(1).decode() if m else ""

    def queue(self) -> list[dict]:
        """The queue as `postqueue -j` has it: one dict per message (queue_name, queue_id, recipients...)."""
        out = self._cmd("postqueue", "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_queue(self, predicate: Callable[[list[dict]], bool], timeout: float = 10.0) -> list[dict]:
        """Poll queue() until predicate(queue) holds; AssertionError with the queue and log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            q = self.queue()
            if predicate(q):
                return q
            if time.monotonic() > deadline:
                raise AssertionError(f"postfix queue not as expected within {timeout}s: {q}\n{self._log_excerpt()}")
            time.sleep(0.1)

    def flush(self) -> None:
        """Retry all deferred mail now (`postqueue -f`)."""
        self._cmd("postqueue", "-f")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def _log_excerpt(self, n: int = 40) -> str:
        return f"--- last lines of {self.maillog} ---\n{self.log_tail(n) or '(empty)'}"


# -- helpers ----------------------------------------------------------------------------------------


def _first_existing(paths: Sequence[Path]) -> Path:
    for p in paths:
        if p.exists():
            return p
    raise PostfixError(f"none of {[str(p) for p in paths]} exists: is postfix installed? {INSTALL_HINT}")


def _logical_lines(text: str) -> list[str]:
    """Postfix config entries: a line starting with whitespace continues the previous entry;
    comments and blank lines are entries of their own (a comment never continues anything)."""
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if line[:1].isspace() and stripped and out and _key(out[-1]):
            out[-1] += "\n" + line  # continuation, or an indented comment inside a master.cf service
        else:
            out.append(line)
    return out


def _key(entry: str) -> str | None:
    """The parameter (main.cf) or service name (master.cf) an entry defines; None for comments."""
    if not entry.strip() or entry[:1].isspace() or entry.lstrip().startswith("#"):
        return None
    return re.split(r"[\s=]", entry, maxsplit=1)[0]


def _key_fields(entry: str) -> list[str]:
    return entry.split("\n", 1)[0].split() if _key(entry) else []


def _merge_main_cf(blocks: Sequence[str]) -> str:
    """Concatenate main.cf texts; a parameter set again later replaces the earlier setting
    (Postfix would take the last one anyway, but postconf warns about the duplicate)."""
    entries: list[str] = []
    for block in blocks:
        for e in _logical_lines(block):
            k = _key(e)
            if k:
                entries = [x for x in entries if _key(x) != k]
            entries.append(e)
    return "\n".join(entries) + "\n"


def _test_service(entry: str, smtpd_port: int) -> str:
    """No chroot (the private queue directory is no populated jail); the public smtpd on smtpd_port."""
    fields = _key_fields(entry)
    if len(fields) < 8:
        return entry
    if fields[:2] == ["smtp", "inet"]:
        fields[0] = f"127.0.0.1:{smtpd_port}"
    fields[4] = "n"
    _, _, rest = entry.partition("\n")
    return "  ".join(fields) + ("\n" + rest if rest else "")


def _make_traversable(path: Path) -> None:
    """Postfix daemons run as the postfix user and open data_directory by absolute path; pytest's
    base temp dir is 0700, so grant search (x, not read) to others on the ancestors that lack it."""
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _state(pid: int) -> str | None:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_reaped(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _state(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def corpus_messages(root: Path, n: int) -> list[bytes]:
    """n distinct real messages (ham and spam alternately), mbox From_ line removed, CRLF line ends.
    Only messages whose lines fit in 998 bytes: Postfix folds longer ones on final delivery."""
    pools = [sorted((root / d).iterdir()) for d in ("easy_ham", "spam")]
    out: list[bytes] = []
    seen: set[bytes] = set()
    for files in zip(*pools):
        for f in files:
            raw = re.sub(rb"\r?\n", b"\r\n", re.sub(rb"\AFrom [^\n]*\n", b"", f.read_bytes()))
            mid = message_id(raw)
            if mid and mid not in seen and b"\r\n\r\n" in raw and max(map(len, raw.split(b"\r\n"))) <= 990:
                seen.add(mid)
                out.append(raw)
            if len(out) == n:
                return out
    raise AssertionError(f"fewer than {n} usable messages in {root}")


def message_id(raw: bytes) -> bytes | None:
    mid = BytesHeaderParser().parsebytes(raw).get("Message-ID")
    return str(mid).strip().encode() if mid else None
