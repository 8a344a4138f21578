"""SpamAssassin mail through a real Postfix with filterd as its milter (issue 14's must-show).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 python -m bench.milter_postfix --model work/demo/model-mail \\
        --data work/demo/data-mail --n 50 --json bench/results/milter_postfix.json --md bench/results/milter_postfix.md

N spam and N ham from the model's *test* split (`--data`: a `prepare` directory; ids name the
corpus files) are submitted over SMTP to a private Postfix (testing/postfix.py) whose
`smtpd_milters` is the shipped `deploy/postfix/milter.main.cf`, with `filterd serve` ([milter]
enabled, `[policy] reject_score`) behind it and an SMTP sink as the next hop. Every message first
gets forged `X-Spam-Flag: NO` / `X-Spam-Status: No, forged` headers, as a spammer would add.
Reported: per class, how many were refused at end of DATA (`550 5.7.1`) or delivered, what the
delivered ones carry (our verdict, any forged header left), Postfix's queue afterwards (must be
empty: nothing queued, so nothing can bounce) and the bounces in its log. Needs root and postfix.
"""

from __future__ import annotations

import argparse
import csv
import email
import email.policy
import json
import os
import platform
import smtplib
import sys
import tempfile
import time
from pathlib import Path

from testing.daemon import FilterdProcess
from testing.postfix import PostfixServer
from testing.services import free_port
from testing.smtp_sink import SmtpSink

from testing.corpus import CORPUS, wire

FORGED = b"X-Spam-Flag: NO\r\nX-Spam-Status: No, forged\r\n"


def test_ids(data: Path, n: int) -> dict[str, list[str]]:
    csv.field_size_limit(1 << 30)
    out: dict[str, list[str]] = {"spam": [], "ham": []}
    with open(data / "test.csv", newline="") as f:
        for row in csv.DictReader(f):
            if len(out[row["label"]]) < n and (CORPUS / row["id"]).is_file():
                out[row["label"]].append(row["id"])
    return out


def message(path: Path, mid: str) -> bytes:
    return FORGED + f"X-Bench-Id: {mid}\r\n".encode() + wire(path.read_bytes())


def send(port: int, raw: bytes, rcpt: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
        c.mail("sender@bench.example")
        c.rcpt(rcpt)
        try:
            code, reply = c.data(raw)
        except smtplib.SMTPDataError as e:
            code, reply = e.smtp_code, e.smtp_error
    return code, reply.decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the model's prepare directory (its test split is used)")
    ap.add_argument("--n", type=int, default=50, help="messages per class")
    ap.add_argument("--reject-score", default="model", help='[policy] reject_score ("model": the model\'s threshold)')
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    ids = test_ids(args.data, args.n)
    port = free_port()
    results = []
    with tempfile.TemporaryDirectory(prefix="milter-postfix-") as tmp, SmtpSink() as sink:
        postfix = PostfixServer(Path(tmp) / "postfix", relay_port=sink.port, content_filter=False, milter_port=port)
        with postfix:
            d = FilterdProcess(args.model, "redis://127.0.0.1:1/0", Path(tmp) / "filterd.log", redis__enabled="false",
                               milter__enabled="true", milter__listen=f"127.0.0.1:{port}",
                               policy__reject_score=args.reject_score).start(timeout=120)  # fmt: skip
            try:
                t0 = time.perf_counter()
                for label in ("spam", "ham"):
                    for i, name in enumerate(ids[label]):
                        mid = f"{label}-{i}"
                        code, reply = send(postfix.smtpd_port, message(CORPUS / name, mid), f"{mid}@bench.example")
                        results.append({"id": name, "label": label, "mid": mid, "code": code, "reply": reply[:120]})
                seconds = time.perf_counter() - t0
                delivered_n = sum(r["code"] == 250 for r in results)
                got = {m.rcpt_tos[0].split("@")[0]: m.data for m in sink.wait_for(delivered_n, timeout=60)} if delivered_n else {}
                time.sleep(1)
                queue = postfix.queue()
                log = postfix.maillog.read_text(errors="replace")
            finally:
                d.stop()
    for r in results:
        data = got.get(r["mid"])
        r["delivered"] = data is not None
        if data is not None:
            msg = email.message_from_bytes(data, policy=email.policy.compat32)
            r["x_spam_flag"] = msg.get_all("X-Spam-Flag") or []
            r["x_spam_status"] = msg.get_all("X-Spam-Status") or []
            r["forged_left"] = any("forged" in v for v in r["x_spam_status"]) or len(r["x_spam_flag"]) != 1
    summary = {}
    for label in ("spam", "ham"):
        rs = [r for r in results if r["label"] == label]
        summary[label] = {
            "sent": len(rs),
            "refused_550_5.7.1": sum(r["code"] == 550 and r["reply"].startswith("5.7.1") for r in rs),
            "other_refusals": sum(r["code"] != 250 and not (r["code"] == 550 and r["reply"].startswith("5.7.1")) for r in rs),
            "delivered": sum(r.get("delivered", False) for r in rs),
            "delivered_tagged_yes": sum(r.get("x_spam_flag") == ["YES"] for r in rs),
            "delivered_tagged_no": sum(r.get("x_spam_flag") == ["NO"] for r in rs),
            "forged_header_left": sum(bool(r.get("forged_left")) for r in rs),
        }
    doc = {
        "command": "python -m bench.milter_postfix " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(args.model), "reject_score": args.reject_score, "seconds": round(seconds, 2),
        "summary": summary, "postfix_queue_after": len(queue), "bounces_in_log": log.count("status=bounced"),
        "milter_rejects_in_log": log.count("milter-reject: END-OF-MESSAGE"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_start": load0, "load_end": os.getloadavg()},
        "messages": results,
    }  # fmt: skip
    rows = ["| class | sent | refused `550 5.7.1` | delivered | delivered with `X-Spam-Flag: YES` / `NO` | forged header left |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for label, s in summary.items():
        rows.append(f"| {label} | {s['sent']} | {s['refused_550_5.7.1']} | {s['delivered']} | "
                    f"{s['delivered_tagged_yes']} / {s['delivered_tagged_no']} | {s['forged_header_left']} |")  # fmt: skip
    text = "\n".join(rows) + (f"\n\nPostfix queue afterwards: {len(queue)} messages; bounces in its log: "
                              f"{doc['bounces_in_log']}; milter rejects logged: {doc['milter_rejects_in_log']}; "
                              f"{seconds:.1f} s for {len(results)} messages, one SMTP session each.\n")  # fmt: skip
    print(text)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.md:
        args.md.write_text(f"`{doc['command']}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
