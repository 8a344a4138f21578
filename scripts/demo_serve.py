"""The daemon part of `make demo`: one `filterd serve` per source, real SMS and mail through them.

A model per source (bench/RESULTS.md, "SMS and mail in one deployment"), so one instance per source,
each with its own config, model and metrics port: `sms.toml` reads the Redis stream, `mail.toml`
serves every mail door: the SMTP content filter, the milter (behind a private Postfix with the
shipped deploy/postfix/milter.main.cf, when run as root with postfix installed) and the HTTP scan
API, with explanations of spam, the verdict history and the web console on. Starts a private
redis-server and an SMTP sink standing in for Postfix's re-injection port and final delivery (all
on loopback ports picked free), writes both configs, runs both daemons, sends SMS through the Redis
stream and the same mail through each mail door, prints the verdicts, the words that made them and
a few metrics, and stops everything it started, also on failure.

    python scripts/demo_serve.py --sms-model work/demo/model-sms --mail-model work/demo/model-mail --work work/demo
"""

from __future__ import annotations

import argparse
import email
import json
import os
import email.policy
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import redis
from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the private Postfix of the tests (testing/postfix.py) runs the milter door's demo

SMS = [
    "WINNER!! As a valued customer you have been selected to receive a £900 prize reward! Call 09061701461",
    "Are we still on for dinner tonight? I'll be there at 7",
    "URGENT! Your mobile number has won a 2000 bonus caller prize. Text CLAIM to 81010 now",
    "Sorry, I'll call you later, in a meeting",
    "FREE entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121",
    "Ok lar... Joking wif u oni...",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """Stands in for Postfix's re-injection listener: keeps what filterd relays."""

    def __init__(self) -> None:
        self.received: list[tuple[tuple[str, ...], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd hook
        with self.lock:
            self.received.append((tuple(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: delivered"


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"filterd exited early:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"filterd not healthy after {timeout:.0f}s:\n{log.read_text()[-2000:]}")


def metric_lines(port: int, prefixes: tuple[str, ...]) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return [ln for ln in text.splitlines() if ln.startswith(prefixes) and not ln.endswith(" 0.0")]


def start_filterd(name: str, config: Path, work: Path, started: list[subprocess.Popen]) -> Path:
    log = work / f"filterd-{name}.log"
    print(f"{name}: config {config}; log {log}")
    with open(log, "wb") as out:
        started.append(subprocess.Popen([shutil.which("filterd") or "filterd", "serve", "--config", str(config)],
                                        stdout=out, stderr=subprocess.STDOUT))  # fmt: skip
    return log


def raw_mail(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw.split(b"\n", 1)[1] if raw.startswith(b"From ") else raw  # an mbox From_ line is not part of the message


def milter_demo(mails: list[bytes], names: list[Path], milter_port: int, sink: Sink, sink_port: int, work: Path) -> None:
    """The mail through a private Postfix whose smtpd asks filterd's milter (deploy/postfix/milter.main.cf):
    spam at or above [policy.milter] reject_score is refused during the SMTP session; the rest is delivered."""
    print("\n-- the same mail through Postfix with filterd as its milter (shipped milter.main.cf; reject_score 0.99)")
    if os.geteuid() != 0 or not shutil.which("postfix", path="/usr/sbin:/usr/bin"):
        print("(skipped: a private Postfix needs root and the postfix package)")
        return
    from testing.postfix import PostfixError, PostfixServer

    before = len(sink.received)
    with PostfixServer(work / "postfix", relay_port=sink_port, content_filter=False, milter_port=milter_port) as pf:
        delivered = 0
        for i, (name, raw) in enumerate(zip(names, mails)):
            try:
                queue_id = pf.submit(raw, "demo@example.org", [f"milter{i}@example.net"])
                delivered += 1
                print(f"250 queued as {queue_id}  {name.parent.name}/{name.name[:5]}")
            except PostfixError as e:
                print(f"{str(e).splitlines()[0][:90]}  {name.parent.name}/{name.name[:5]}")
        deadline = time.monotonic() + 60
        while len(sink.received) < before + delivered and time.monotonic() < deadline:
            time.sleep(0.1)
    for rcpts, data in sink.received[before:]:
        msg = email.message_from_bytes(data, policy=email.policy.default)
        print(f"delivered to {rcpts[0]}: X-Spam-Status: {msg['X-Spam-Status']}")
    shutil.rmtree(work / "postfix", ignore_errors=True)


CALIBRATED = 0.005  # the mail instance tags at the threshold that flags 0.5% of unseen ham, when its model measured one


def calibrated_level(model: Path) -> tuple[str, str]:
    """The mail instance's [policy] tag_score and a line on what it costs, from the model's operating points."""
    points = json.loads((model / "filterd.json").read_text()).get("operating_points", [])
    point = next((p for p in points if p.get("ham_fpr_target") == CALIBRATED), None)
    if point is None or point.get("threshold") is None:
        why = point["reason"] if point else "the model records no operating points"
        return '"model"', f"tagging at the model's own threshold: no {CALIBRATED:.1%} ham-FPR point ({why})"
    rc, fc = point["spam_recall_ci"], point["check_ham_fpr_ci"]
    return f'"fpr:{CALIBRATED:g}"', (
        f'tagging at tag_score = "fpr:{CALIBRATED:g}": P(spam) >= {point["threshold"]:.4f}, set on {point["estimated_on"]:,} '
        f"unseen ham; on the test split that tags {100 * point['check_ham_fpr']:.2f}% of ham "
        f"({100 * fc[0]:.2f}-{100 * fc[1]:.2f}%, 95%) and catches {100 * point['spam_recall']:.2f}% of spam "
        f"({100 * rc[0]:.2f}-{100 * rc[1]:.2f}%)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms-model", type=Path, required=True, help="the model of the SMS instance (Redis)")
    ap.add_argument("--mail-model", type=Path, required=True, help="the model of the mail instance (SMTP)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--mail", type=Path, nargs="*", default=[], help="raw RFC 822 files to send through SMTP")
    args = ap.parse_args()
    work = args.work.resolve()
    redis_port, smtp_port, sink_port, sms_metrics, mail_metrics = (free_port() for _ in range(5))
    milter_port, http_port, console_port = (free_port() for _ in range(3))
    started: list[subprocess.Popen] = []
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=sink_port, decode_data=False, enable_SMTPUTF8=True)
    try:
        shutil.rmtree(work / "redis", ignore_errors=True)  # a rerun must not show (or wait on) the last run's results
        (work / "redis").mkdir(parents=True, exist_ok=True)
        started.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(work / "redis"),
             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL))  # fmt: skip
        controller.start()
        sms_config, mail_config = work / "sms.toml", work / "mail.toml"
        sms_config.write_text(
            f'[model]\npath = "{args.sms_model.resolve()}"\ndevice = "cpu"\n'
            f'[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\n'
            f"[smtp]\nenabled = false\n"
            f'[metrics]\nlisten = "127.0.0.1:{sms_metrics}"\n'
        )
        tag_level, tag_cost = calibrated_level(args.mail_model)
        mail_config.write_text(
            f'[model]\npath = "{args.mail_model.resolve()}"\ndevice = "cpu"\n'
            f"[policy]\ntag_score = {tag_level}\n"  # a level chosen by the ham it costs (its operating points)
            f"[redis]\nenabled = false\n"
            f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nnext_hop = "127.0.0.1:{sink_port}"\n'
            f'[milter]\nenabled = true\nlisten = "127.0.0.1:{milter_port}"\n'
            f'[http]\nenabled = true\nlisten = "127.0.0.1:{http_port}"\n'
            f"[policy.milter]\nreject_score = 0.99\n"  # before the queue, sure spam is refused (above the calibrated tag level); the rest tagged
            f'[explain]\nenabled = "spam"\nheader = true\n'
            f'[history]\nenabled = true\npath = "{work / "history.sqlite"}"\nstore_text = true\n'
            f'[console]\nenabled = true\nlisten = "127.0.0.1:{console_port}"\n'
            f'[trainer]\nstore = "{work / "labels.sqlite"}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{mail_metrics}"\n'
        )
        (work / "history.sqlite").unlink(missing_ok=True)  # this run's verdicts only
        sms_log = start_filterd("sms", sms_config, work, started)
        sms_proc = started[-1]
        mail_log = start_filterd("mail", mail_config, work, started)
        wait_http(f"http://127.0.0.1:{sms_metrics}/healthz", 120, sms_proc, sms_log)
        wait_http(f"http://127.0.0.1:{mail_metrics}/healthz", 120, started[-1], mail_log)
        print(f"filterd serving: SMS on Redis 127.0.0.1:{redis_port} filterd:in -> filterd:out (model {args.sms_model}); "
              f"mail on SMTP 127.0.0.1:{smtp_port} -> next hop 127.0.0.1:{sink_port}, milter 127.0.0.1:{milter_port}, "
              f"HTTP 127.0.0.1:{http_port} (model {args.mail_model})")  # fmt: skip
        print(f"the mail instance is {tag_cost}")

        r = redis.Redis(port=redis_port)
        for i, text in enumerate(SMS):
            r.xadd("filterd:in", {"text": text, "id": f"sms-{i}"})
        r.xadd("filterd:in", {"id": "sms-bad"})  # no text: goes to the dead-letter stream
        deadline = time.monotonic() + 60
        while r.xlen("filterd:out") < len(SMS) and time.monotonic() < deadline:
            time.sleep(0.1)
        print("\n-- SMS through Redis (filterd:in -> filterd:out), the SMS instance")
        results = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange("filterd:out")]
        for f in sorted(results, key=lambda f: f["id"]):
            text = SMS[int(f["id"].split("-")[1])]
            print(f"{f['verdict']:4s}  {float(f['score']):.4f}  {f['latency_ms']:>6s} ms  {text[:70]}")
        for _, f in r.xrange("filterd:dead"):
            print(f"dead  ({f[b'error'].decode()})  id={f.get(b'id', b'').decode()}")

        print("\n-- mail through SMTP (the mail instance, as a Postfix content filter)")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as c:
            for i, path in enumerate(args.mail):
                c.sendmail("demo@example.org", [f"user{i}@example.net"], raw_mail(path))
        for rcpts, data in sink.received:
            msg = email.message_from_bytes(data, policy=email.policy.default)
            name = args.mail[int(rcpts[0][4:].split("@")[0])]
            print(f"{msg['X-Spam-Flag']:3s}  {msg['X-Spam-Status']}\n     {name.parent.name}/{name.name[:5]}  "
                  f"Subject: {str(msg['Subject'])[:60]}")  # fmt: skip
            if msg["X-Spam-Report"]:
                print(f"     X-Spam-Report: {msg['X-Spam-Report']}"[:160])
        mails = [raw_mail(path) for path in args.mail]
        milter_demo(mails, args.mail, milter_port, sink, sink_port, work)

        print("\n-- the same mail through the HTTP scan API (POST /checkv2, as Exim's spamd variant=rspamd sends it)")
        for path, raw in zip(args.mail, mails):
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/checkv2", data=raw, method="POST",
                                         headers={"From": "demo@example.org", "Rcpt": "user@example.net", "IP": "192.0.2.7"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=60) as r:
                reply = json.loads(r.read())
            print(f"{reply['action']:15s} score={reply['score']:.2f} required={reply['required_score']:.0f}  "
                  f"{path.parent.name}/{path.name[:5]}")  # fmt: skip

        with urllib.request.urlopen(f"http://127.0.0.1:{console_port}/history", timeout=30) as r:
            rows = r.read().count(b'<tr class="row-')
        print(f"\n-- web console of the mail instance: http://127.0.0.1:{console_port}/ ({rows} verdicts of this run in its "
              "history, spam with its words highlighted; it serves while `filterd serve --config mail.toml` runs)")

        for name, port in (("sms", sms_metrics), ("mail", mail_metrics)):
            print(f"\n-- metrics of the {name} instance: http://127.0.0.1:{port}/metrics (health: /healthz); a few of them:")
            for line in metric_lines(port, ("filterd_messages_total", "filterd_smtp_replies_total", "filterd_dead_letters_total",
                                            "filterd_model_info", "filterd_batch_size_count", "filterd_actions_total",
                                            "filterd_explanations_total")):  # fmt: skip
                print("  " + line)
        print(
            f"(the demo stops these services now; `filterd serve --config {sms_config}` and "
            f"`filterd serve --config {mail_config}` run them again)"
        )
        return 0
    finally:
        for p in reversed(started):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(started):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        controller.stop()


if __name__ == "__main__":
    sys.exit(main())
