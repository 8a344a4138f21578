"""deploy/dovecot/: the imapsieve recipe that feeds a user's Junk moves to filterd.

- `filterd-learn` (the pipe program) run as Dovecot runs it, one message on stdin: in store mode
  against a label store in tmp_path (the real `filterd-trainer learn`), in redis mode against a
  real redis-server. Whatever goes wrong (bad label, learn failing or hanging, Redis down), it
  exits 0, reads its input to the end and logs; its syslog goes to a `logger` stub on PATH.
- sievec compiles both Sieve scripts against the shipped 90-filterd-imapsieve.conf, and fails
  without it (the pipe extension is granted there).
- A real IMAP session: Dovecot's imap binary, pre-authenticated as `doveadm exec imap` runs it,
  with the shipped configuration and Sieve scripts (only their paths redirected into a scratch
  directory) and the shipped filterd-learn, moving corpus messages into and out of Junk; the
  labels land in the Redis label stream and parse as the trainer's intake reads them.
The Dovecot parts skip when Dovecot is not installed (apt-get install dovecot-imapd dovecot-sieve).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from trainer.intake import parse_entry
from filterd.store.labels import LabelStore

from tests.conftest import REPO, SPAMASSASSIN
from testing.services import free_port

DOVECOT = REPO / "deploy" / "dovecot"
LEARN = DOVECOT / "filterd-learn"
CONF = DOVECOT / "90-filterd-imapsieve.conf"
SIEVE = ["filterd-report-spam.sieve", "filterd-report-ham.sieve"]
STREAM = "filterd:labels"
IMAP_BINARIES = [Path("/usr/lib/dovecot/imap"), Path("/usr/libexec/dovecot/imap")]

needs_sievec = pytest.mark.skipif(
    not shutil.which("sievec"), reason="sievec not installed (apt-get install dovecot-sieve dovecot-imapd)"
)


def _corpus(folder: str, n: int) -> list[Path]:
    files = sorted(p for p in (SPAMASSASSIN / folder).iterdir() if p.is_file() and not p.name.startswith("."))
    return files[:n]


SPAM = _corpus("spam", 3)
HAM = _corpus("easy_ham", 2)


def _trainer() -> str:
    """The venv's filterd-trainer, or a wrapper running this interpreter's `-m trainer`."""
    exe = Path(sys.executable).parent / "filterd-trainer"
    return str(exe) if exe.is_file() else ""


@pytest.fixture
def learn_env(tmp_path):
    """An environment for filterd-learn: no settings inherited, no defaults file, a logger stub."""
    stub = tmp_path / "stub"
    stub.mkdir()
    syslog = tmp_path / "syslog"
    (stub / "logger").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {syslog}\n")
    (stub / "logger").chmod(0o755)
    trainer = _trainer()
    if not trainer:
        wrapper = stub / "filterd-trainer"
        wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m trainer "$@"\n')
        wrapper.chmod(0o755)
        trainer = str(wrapper)
    (tmp_path / "tmp").mkdir()
    config = tmp_path / "filterd.toml"
    config.write_text(f'[trainer]\nstore = "{tmp_path / "labels.sqlite"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILTERD_") and k != "REDISCLI_AUTH"}
    env.update(
        PATH=f"{stub}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        FILTERD_LEARN_DEFAULTS=str(tmp_path / "no-such-defaults"),
        FILTERD_CONFIG=str(config),
        FILTERD_TRAINER=trainer,
        TMPDIR=str(tmp_path / "tmp"),
    )
    return env


def _learn(env: dict, *args: str, message: bytes = b"", **extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(LEARN), *args], input=message, env={**env, **extra}, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")  # never fail the user's move
    return proc


def _log(tmp_path: Path) -> str:
    path = tmp_path / "syslog"
    return path.read_text() if path.exists() else ""


def _counts(tmp_path: Path) -> dict[str, int]:
    with LabelStore(tmp_path / "labels.sqlite") as store:
        return store.counts()


def _entries(server) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in server.client().xrange(STREAM)]


# --------------------------------------------------------------------------- filterd-learn


def test_script_is_an_executable_posix_sh_script():
    assert os.access(LEARN, os.X_OK), "filterd-learn must be executable (sieve_pipe_bin_dir runs it directly)"
    assert LEARN.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(LEARN)], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-s", "sh", str(LEARN)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_store_mode_learns_spam_then_the_same_message_as_ham(learn_env, tmp_path):
    message = SPAM[0].read_bytes()
    _learn(learn_env, "spam", "alice@example.org", message=message, FILTERD_LEARN_VIA="store")
    assert _counts(tmp_path) == {"spam": 1, "ham": 0}
    assert "spam for alice@example.org" in _log(tmp_path) and "1 added" in _log(tmp_path)

    _learn(learn_env, "ham", message=message, FILTERD_LEARN_VIA="store")  # moved back out of Junk
    assert _counts(tmp_path) == {"spam": 0, "ham": 1}
    assert "1 relabelled" in _log(tmp_path)
    assert not any((tmp_path / "tmp").iterdir()), "the private copy of the message must be removed"


@pytest.mark.parametrize("args", [["bogus"], [], ["--spam"], ["SPAM"]])
def test_a_bad_label_stores_nothing_logs_and_exits_0(learn_env, tmp_path, args):
    message = SPAM[0].read_bytes() * 64  # ~300 kB, more than a pipe holds: it must be read, not left
    proc = subprocess.Popen([str(LEARN), *args], stdin=subprocess.PIPE, env={**learn_env, "FILTERD_LEARN_VIA": "store"})
    proc.stdin.write(message)  # BrokenPipeError if the script stopped reading
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert not (tmp_path / "labels.sqlite").exists()
    assert "usage: filterd-learn spam|ham" in _log(tmp_path)


def test_a_failing_learn_is_logged_and_exits_0(learn_env, tmp_path):
    _learn(learn_env, "spam", message=SPAM[0].read_bytes(), FILTERD_LEARN_VIA="store",
           FILTERD_CONFIG=str(tmp_path / "missing.toml"))  # fmt: skip
    log = _log(tmp_path)
    assert "spam not learnt:" in log and "missing.toml" in log
    assert not (tmp_path / "labels.sqlite").exists()


def test_a_hanging_learn_is_cut_off(learn_env, tmp_path):
    hang = tmp_path / "stub" / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    started = time.monotonic()
    _learn(learn_env, "ham", message=HAM[0].read_bytes(), FILTERD_LEARN_VIA="store",
           FILTERD_TRAINER=str(hang), FILTERD_LEARN_TIMEOUT="1")  # fmt: skip
    assert time.monotonic() - started < 10
    assert "ham not learnt:" in _log(tmp_path) and "timed out after 1s" in _log(tmp_path)


def test_bad_settings_and_empty_input_are_logged(learn_env, tmp_path):
    message = SPAM[0].read_bytes()
    _learn(learn_env, "spam", message=message, FILTERD_LEARN_VIA="carrier-pigeon")
    _learn(learn_env, "spam", message=message, FILTERD_LEARN_VIA="store", FILTERD_LEARN_TIMEOUT="soon")
    _learn(learn_env, "spam", message=b"", FILTERD_LEARN_VIA="store")
    broken = tmp_path / "broken-defaults"
    broken.write_text("FILTERD_LEARN_VIA=store\nif then\n")
    _learn(learn_env, "spam", message=message, FILTERD_LEARN_DEFAULTS=str(broken))
    log = _log(tmp_path)
    assert "FILTERD_LEARN_VIA must be redis or store" in log
    assert "FILTERD_LEARN_TIMEOUT must be" in log
    assert "empty message" in log
    assert f"{broken}: not valid sh" in log
    assert not (tmp_path / "labels.sqlite").exists()


def test_the_defaults_file_sets_the_mode(learn_env, tmp_path):
    defaults = tmp_path / "defaults"
    defaults.write_text(f"FILTERD_LEARN_VIA=store\nFILTERD_CONFIG={learn_env['FILTERD_CONFIG']}\n")
    _learn(learn_env, "ham", message=HAM[0].read_bytes(), FILTERD_LEARN_DEFAULTS=str(defaults))
    assert _counts(tmp_path) == {"spam": 0, "ham": 1}


def test_redis_mode_adds_label_and_the_raw_message(learn_env, tmp_path, redis_server):
    spam, ham = SPAM[1].read_bytes(), HAM[0].read_bytes()
    _learn(learn_env, "spam", "bob", message=spam, FILTERD_REDIS_URL=redis_server.url)  # redis is the default
    _learn(learn_env, "ham", message=ham, FILTERD_REDIS_URL=redis_server.url, FILTERD_LEARN_VIA="redis")
    entries = _entries(redis_server)
    assert entries == [{b"label": b"spam", b"email": spam}, {b"label": b"ham", b"email": ham}]
    parsed = parse_entry(b"1-0", entries[0])  # what the trainer's intake makes of it
    assert parsed.error is None and parsed.label == "spam" and parsed.text.strip()
    assert f"spam for bob: {len(spam)} bytes" in _log(tmp_path) and f"added to {STREAM}" in _log(tmp_path)
    assert not (tmp_path / "labels.sqlite").exists()


def test_redis_mode_cuts_long_messages_and_trims_when_asked(learn_env, tmp_path, redis_server):
    message = SPAM[2].read_bytes()
    _learn(learn_env, "spam", message=message, FILTERD_REDIS_URL=redis_server.url, FILTERD_LEARN_MAX_BYTES="1000",
           FILTERD_LABEL_STREAM="custom:labels", FILTERD_LABEL_MAXLEN="100")  # fmt: skip
    ((_, fields),) = redis_server.client().xrange("custom:labels")
    assert fields == {b"label": b"spam", b"email": message[:1000]}
    assert "1000 bytes (cut to FILTERD_LEARN_MAX_BYTES)" in _log(tmp_path)


def test_redis_down_or_refusing_is_logged_and_exits_0(learn_env, tmp_path, redis_server):
    message = SPAM[0].read_bytes()
    _learn(learn_env, "spam", message=message, FILTERD_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert "spam not learnt: redis-cli XADD filterd:labels: exit status 1" in _log(tmp_path)
    redis_server.client().set(STREAM, "not a stream")  # redis-cli exits 0 on an error reply
    _learn(learn_env, "ham", message=message, FILTERD_REDIS_URL=redis_server.url)
    assert "ham not learnt:" in _log(tmp_path) and "WRONGTYPE" in _log(tmp_path)


def test_redis_acl_user_limited_to_the_label_stream(learn_env, tmp_path, redis_server):
    """The README's least-privilege Redis user: XADD on filterd:labels only, password via REDISCLI_AUTH."""
    r = redis_server.client()
    r.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pw", "~*", "&*", "+@all")
    r.execute_command("ACL", "SETUSER", "filterd-learn", "on", ">s3cret", "resetkeys", f"~{STREAM}",
                      "resetchannels", "-@all", "+xadd")  # fmt: skip
    r.execute_command("ACL", "SETUSER", "default", "off")  # no fallback to the default user
    admin = redis.Redis(host="127.0.0.1", port=redis_server.port, username="admin", password="admin-pw")
    message = HAM[1].read_bytes()
    acl = {"FILTERD_REDIS_URL": redis_server.url, "FILTERD_REDIS_USER": "filterd-learn"}
    _learn(learn_env, "ham", message=message, REDISCLI_AUTH="s3cret", **acl)
    assert [f for _, f in admin.xrange(STREAM)] == [{b"label": b"ham", b"email": message}]
    assert f"added to {STREAM}" in _log(tmp_path)

    _learn(learn_env, "spam", message=message, REDISCLI_AUTH="wrong", **acl)
    _learn(learn_env, "spam", message=message, REDISCLI_AUTH="s3cret", FILTERD_LABEL_STREAM="elsewhere", **acl)
    assert admin.xlen(STREAM) == 1 and not admin.exists("elsewhere")
    log = _log(tmp_path)
    assert log.count("spam not learnt:") == 2 and "NOPERM" in log, log


# --------------------------------------------------------------------------- configuration and Sieve


def test_the_conf_names_the_shipped_scripts_and_program():
    conf = CONF.read_text()
    settings = dict(re.findall(r"^\s*(\w+)\s*=\s*(.*?)\s*$", conf, re.M))
    assert settings["imapsieve_mailbox1_before"] == "file:/etc/dovecot/sieve/filterd-report-spam.sieve"
    assert settings["imapsieve_mailbox2_before"] == "file:/etc/dovecot/sieve/filterd-report-ham.sieve"
    assert settings["imapsieve_mailbox1_name"] == settings["imapsieve_mailbox2_from"] == "Junk"
    assert "vnd.dovecot.pipe" in settings["sieve_global_extensions"]
    for name in SIEVE:
        assert f'pipe :copy "{LEARN.name}"' in (DOVECOT / name).read_text()
    readme = (DOVECOT / "README.md").read_text()
    assert f"{settings['sieve_pipe_bin_dir']}/" in readme and "/etc/dovecot/sieve/" in readme


@needs_sievec
def test_sievec_compiles_the_scripts_with_the_shipped_conf(tmp_path):
    for name in SIEVE:
        shutil.copy(DOVECOT / name, tmp_path / name)
    (tmp_path / "dovecot.conf").write_text(f"!include {CONF}\n")
    (tmp_path / "bare.conf").write_text("")
    for name in SIEVE:
        script = tmp_path / name
        ok = subprocess.run(["sievec", "-c", str(tmp_path / "dovecot.conf"), str(script)], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        assert script.with_suffix(".svbin").stat().st_size > 0
        # Control: without the shipped conf, pipe and imapsieve are unknown.
        bare = subprocess.run(["sievec", "-c", str(tmp_path / "bare.conf"), str(script), str(tmp_path / "x.svbin")],
                              capture_output=True, text=True)  # fmt: skip
        assert bare.returncode != 0 and "vnd.dovecot.pipe" in bare.stderr


# --------------------------------------------------------------------------- a real IMAP session


def _imap_binary() -> Path | None:
    return next((p for p in IMAP_BINARIES if os.access(p, os.X_OK)), None)


@pytest.fixture
def scratch():
    """A directory the imap process can use: as root it runs as nobody, so not under tmp_path (0700)."""
    path = Path(tempfile.mkdtemp(prefix="filterd-dovecot-", dir="/tmp" if os.geteuid() == 0 else None))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _imap_script(append: bytes) -> bytes:
    """INBOX (2 messages) -> Junk (as UIDs 1, 2); Junk UID 1 -> INBOX; UID 2 -> Trash; APPEND to Junk."""
    lines = [b"a SELECT INBOX", b"b MOVE 1:* Junk", b"c SELECT Junk", b"d UID MOVE 1 INBOX", b"e UID MOVE 2 Trash",
             b"f APPEND Junk {%d+}" % len(append)]  # fmt: skip
    return b"\r\n".join(lines) + b"\r\n" + append + b"\r\ng LOGOUT\r\n"


@needs_sievec
def test_an_imap_move_into_and_out_of_junk_feeds_the_label_stream(scratch, redis_server):
    imap = _imap_binary()
    if imap is None:
        pytest.skip("Dovecot's imap binary not found (apt-get install dovecot-imapd dovecot-sieve)")
    t = scratch
    for d in ("sieve", "bin", "stub", "Maildir/cur", "Maildir/new", "Maildir/tmp", "run"):
        (t / d).mkdir(parents=True)
    for name in SIEVE:  # installed and compiled as the README says, only elsewhere
        shutil.copy(DOVECOT / name, t / "sieve" / name)
    shutil.copy(LEARN, t / "filterd-learn")
    (t / "stub" / "logger").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {t}/syslog\n")
    # Dovecot runs pipe programs with only USER, HOME and HOST set: settings come from the defaults
    # file, which is at /etc/default/filterd-learn unless FILTERD_LEARN_DEFAULTS says otherwise.
    (t / "defaults").write_text(f"FILTERD_LEARN_VIA=redis\nFILTERD_REDIS_URL={redis_server.url}\n"
                                f"PATH={t}/stub:/usr/local/bin:/usr/bin:/bin\n")  # fmt: skip
    (t / "bin" / "filterd-learn").write_text(f'#!/bin/sh\nFILTERD_LEARN_DEFAULTS={t}/defaults exec {t}/filterd-learn "$@"\n')
    for exe in (t / "filterd-learn", t / "stub" / "logger", t / "bin" / "filterd-learn"):
        exe.chmod(0o755)
    a, b, c = SPAM[0].read_bytes(), HAM[0].read_bytes(), SPAM[1].read_bytes()
    (t / "Maildir" / "new" / "1.a.host").write_bytes(a)
    (t / "Maildir" / "new" / "2.b.host").write_bytes(b)

    user = ""
    if os.geteuid() == 0:  # Dovecot never opens mail as root
        nobody = pwd.getpwnam("nobody")
        user = f"mail_uid = {nobody.pw_uid}\nmail_gid = {nobody.pw_gid}\n"
    conf = t / "dovecot.conf"
    conf.write_text(f"""!include {CONF}
base_dir = {t}/run
state_dir = {t}/run
log_path = /dev/stderr
ssl = no
first_valid_uid = 1
first_valid_gid = 1
{user}mail_location = maildir:{t}/Maildir
namespace inbox {{
  inbox = yes
  mailbox Junk {{
    special_use = \\Junk
    auto = create
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = create
  }}
}}
plugin {{
  imapsieve_mailbox1_before = file:{t}/sieve/filterd-report-spam.sieve
  imapsieve_mailbox2_before = file:{t}/sieve/filterd-report-ham.sieve
  sieve_pipe_bin_dir = {t}/bin
}}
""")
    for name in SIEVE:
        subprocess.run(["sievec", "-c", str(conf), str(t / "sieve" / name)], check=True, capture_output=True)
    if os.geteuid() == 0:
        for p in [t, *t.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)

    env = {"USER": "tester", "HOME": str(t), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(imap), "-c", str(conf)], input=_imap_script(c), env=env, capture_output=True, timeout=120)
    transcript = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, transcript
    for tag in b"abcdefg":
        assert re.search(rb"^%c OK" % tag, proc.stdout, re.M), transcript

    def lf(data: bytes) -> bytes:  # Dovecot pipes messages with CRLF line ends
        return data.replace(b"\r\n", b"\n")

    entries = [(f[b"label"], lf(f[b"email"])) for f in _entries(redis_server)]
    log = (t / "syslog").read_text() if (t / "syslog").exists() else ""
    assert [label for label, _ in entries] == [b"spam", b"spam", b"ham", b"spam"], (entries, log, transcript)
    assert {email for _, email in entries[:2]} == {a, b}  # INBOX -> Junk, both
    assert entries[2][1] in {a, b}  # Junk -> INBOX; the next move, Junk -> Trash, is not learnt
    assert entries[3][1] == c  # APPEND to Junk
    assert log.count("for tester:") == 4, log
