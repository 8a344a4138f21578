"""The message-path defects, tried from outside against a real `filterd serve`: run it from a checkout's root
to see what that version of filterd does (the same script ran on the code before and after the redesign).

    FILTERD_SHARED=/work/shared python -m bench.defects --model /work/sa/model --json out.json

Only sockets, real clients and the daemon's files are used (no filterd imports), so the script runs
unchanged on any version. One daemon with the SMTP content filter (relaying to a sink), the milter
(behind a real Postfix for the forged-header check), the HTTP door, Redis and the reservoir and
history on; each check prints what was seen:
- `forged_after_10001_headers`: through Postfix and the milter, the X-Spam-Flag values the delivered
  copy carries when a sender put `X-Spam-Flag: NO` after 10,001 filler headers (want: only ours);
- `padded_spam_smtp` / `padded_spam_milter`: the X-Spam-Score of a spam whose body follows 1.1 MB of junk
  header fields, next to the same spam unpadded (want: equal);
- `subject_past_limit`: the Subject the milter writes for spam whose Subject lies past
  `[milter] max_message_bytes` (want: the prefix and the original Subject);
- `reservoir_sources`: texts the reservoir kept per door after 50 messages through each (want: 50 each);
- `huge_http_seconds`: seconds for `/checkv2` to answer an 8 MiB, 20,000-part message, and for the
  milter to answer a small one sent meanwhile (want: bounded like the other doors).
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import smtplib
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

try:  # the harness moved into testing/ with the redesign
    from testing.daemon import FilterdProcess
    from testing.milter_mta import Mta, split_message
    from testing.postfix import PostfixServer
    from testing.services import RedisServer, free_port
    from testing.smtp_sink import SmtpSink
except ImportError:
    from tests.e2e.daemon import FilterdProcess  # type: ignore[no-redef]
    from tests.milter_mta import Mta, split_message  # type: ignore[no-redef]
    from tests.postfix import PostfixServer  # type: ignore[no-redef]
    from tests.services import RedisServer, free_port  # type: ignore[no-redef]
    from tests.smtp_sink import SmtpSink  # type: ignore[no-redef]

SPAM = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: cheap meds\r\nMessage-ID: <%s@filterd.test>\r\n%s\r\n"
        b"Buy cheap viagra now!!! Limited offer, click here http://pills.example/ to claim your prize. "
        b"Unsubscribe: reply REMOVE. $$$ FREE money, act now, 100%% guaranteed.\r\n")  # fmt: skip


def filler(n_bytes: int) -> bytes:
    return b"".join(b"X-Junk-%d: %s\r\n" % (i, b"j" * 90) for i in range(n_bytes // 100))


def score_of(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return email.message_from_bytes(raw, policy=email.policy.compat32).get("X-Spam-Score")


def smtp_send(port: int, raw: bytes, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
        try:
            c.sendmail("a@example.org", [rcpt], raw)
            return 250
        except smtplib.SMTPException as e:
            return getattr(e, "smtp_code", 0)


async def milter_once(port: int, raw: bytes, **envelope: str) -> list[tuple[bytes, bytes]]:
    mta = Mta(*await asyncio.open_connection("127.0.0.1", port))
    await mta.optneg()
    await mta.envelope(**envelope)
    headers, body = split_message(raw)
    replies = await mta.message(headers, body)
    await mta.close()
    return replies


def wait_for(pred, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def run(model: Path, tmp: Path) -> dict:
    out: dict = {}
    smtp_port, milter_port, http_port = free_port(), free_port(), free_port()
    reservoir, history = tmp / "reservoir.sqlite", tmp / "history.sqlite"
    with SmtpSink() as sink:
        redis = RedisServer(tmp / "redis").start()
        d = FilterdProcess(model, redis.url, tmp / "filterd.log", smtp__enabled="true", smtp__listen=f"127.0.0.1:{smtp_port}",
                           smtp__next_hop=sink.address, milter__enabled="true", milter__listen=f"127.0.0.1:{milter_port}",
                           http__enabled="true", http__listen=f"127.0.0.1:{http_port}", trainer__reservoir=str(reservoir),
                           trainer__reservoir_size="10000", history__enabled="true", history__path=str(history),
                           policy__subject_score="0.5", milter__max_message_bytes="4096").start(timeout=300)  # fmt: skip
        try:
            pf = PostfixServer(tmp / "postfix", relay_port=sink.port, content_filter=False, milter_port=milter_port)
            with pf:
                # short fields: 10,001 of them stay under Postfix's header_size_limit (102,400 bytes), which would cut the block
                short = b"".join(b"X-J: %d\r\n" % i for i in range(10_001))
                raw = SPAM % (b"forged", short + b"X-Spam-Flag: NO\r\nX-Spam-Status: No, forged\r\n")
                code = smtp_send(pf.smtpd_port, raw, "forged@example.net")
                got = wait_for(lambda: any(b"<forged@filterd.test>" in r.data for r in sink.messages), 120)
                data = next((r.data for r in sink.messages if b"<forged@filterd.test>" in r.data), None) if got else None
                msg = email.message_from_bytes(data, policy=email.policy.compat32) if data else None
                out["forged_after_10001_headers"] = {"postfix_reply": code, "X-Spam-Flag": msg.get_all("X-Spam-Flag") if msg else None,
                                                     "X-Spam-Status": msg.get_all("X-Spam-Status") if msg else None}  # fmt: skip
            # the padded spam and the same spam unpadded, through the content filter and the milter
            for name, extra in (("plain", b""), ("padded", filler(1_100_000))):
                smtp_send(smtp_port, SPAM % (name.encode(), extra), f"{name}@example.net")
            wait_for(lambda: len([r for r in sink.messages if r.rcpt_tos[0] in ("plain@example.net", "padded@example.net")]) >= 2)
            got = {r.rcpt_tos[0]: r.data for r in sink.messages}
            out["padded_spam_smtp"] = {"plain": score_of(got.get("plain@example.net")), "padded": score_of(got.get("padded@example.net"))}
            scores = {}
            for name, extra in (("plain", b""), ("padded", filler(1_100_000))):
                replies = asyncio.run(milter_once(milter_port, SPAM % (name.encode(), extra), queue_id=f"P{name}"))
                scores[name] = next((v.split(b"\0")[1].strip().decode() for c, v in replies if c == b"h" and v.startswith(b"X-Spam-Score\0")), None)
            out["padded_spam_milter"] = scores
            late = (SPAM % (b"late", filler(8000))).replace(b"Subject: cheap meds\r\n", b"")
            subject_late = late.replace(b"\r\n\r\n", b"\r\nSubject: cheap meds\r\n\r\n", 1)  # past max_message_bytes
            replies = asyncio.run(milter_once(milter_port, subject_late, queue_id="Plate"))
            out["subject_past_limit"] = [v.split(b"\0")[-2].decode("utf-8", "replace").strip() for c, v in replies
                                         if c in (b"m", b"h") and b"Subject\0" in v[:40]]  # fmt: skip
            # 50 messages through each door, then what the reservoir kept
            for i in range(50):
                text = SPAM % (b"r%d" % i, b"")
                smtp_send(smtp_port, text, f"r{i}@example.net")
                asyncio.run(milter_once(milter_port, text, queue_id=f"R{i}"))
                post(http_port, text)
                redis.client().xadd("filterd:in", {"text": text.decode(), "id": f"r{i}"})
            wait_for(lambda: redis.client().xlen("filterd:out") >= 50)
            # the huge multipart message over HTTP, and a milter message meanwhile
            parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d filler filler filler\r\n" % i for i in range(20_000))
            huge = (b"Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts
                    + b"x" * (8 * 1024 * 1024 - len(parts)) + b"\r\n--b--\r\n")  # fmt: skip
            out["huge_http_seconds"] = asyncio.run(huge_and_small(http_port, milter_port, huge))
        finally:
            d.stop()
            redis.stop()
    time.sleep(1.0)
    db = sqlite3.connect(reservoir)
    out["reservoir_sources"] = dict(db.execute("SELECT source, count(*) FROM texts GROUP BY source").fetchall())
    out["reservoir_write_errors"] = [line for line in (tmp / "filterd.log").read_text().splitlines() if "reservoir" in line and "fail" in line][:3]
    return out


def post(port: int, raw: bytes) -> int:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", "/checkv2", body=raw, headers={"From": "a@example.org", "Rcpt": "b@example.net"})
    status = c.getresponse().status
    c.close()
    return status


async def huge_and_small(http_port: int, milter_port: int, huge: bytes) -> dict:
    async def big() -> float:
        t0 = time.perf_counter()
        await asyncio.to_thread(post, http_port, huge)
        return time.perf_counter() - t0

    async def small() -> float:
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        await milter_once(milter_port, SPAM % (b"small", b""), queue_id="Psmall")
        return time.perf_counter() - t0

    results = await asyncio.gather(*(big() for _ in range(4)), small())
    return {"http_huge_max": round(max(results[:4]), 2), "milter_small_meanwhile": round(results[4], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="defects-") as tmp:
        out = run(args.model, Path(tmp))
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
