"""Peak memory of `filterd serve` taking large messages over SMTP at the same time.

    python -m bench.smtp_memory --model MODEL_DIR --size-mib 64 --count 4 --json bench/results/smtp_memory_after.json

`filterd serve` runs as its own process (SMTP ingress only, next hop an SMTP sink in this
process); `--count` messages of `--size-mib` MiB each (a short text part and a base64 attachment,
as large mail usually is) are sent in parallel sessions. The daemon's peak resident set (VmHWM in
/proc/PID/status) is read before and after; the difference is what the messages cost.

For the code before a change: `PYTHONPATH=/path/to/old/checkout python bench/smtp_memory.py ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file (e.g. with an older checkout first on PYTHONPATH)
    sys.path.append(str(REPO))

from testing.daemon import FilterdProcess  # noqa: E402
from testing.services import free_port  # noqa: E402
from testing.smtp_sink import SmtpSink, send_concurrently  # noqa: E402


def big_message(i: int, size: int) -> bytes:
    head = (f"From: big@example.org\r\nTo: you@example.net\r\nSubject: large attachment {i}\r\n"
            f"Message-ID: <big-{i}@example.org>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n'
            "The quarterly archive is attached.\r\n--b1\r\nContent-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=a.bin\r\n\r\n").encode()  # fmt: skip
    line = base64.b64encode(bytes(range(256)) * 3)[:76] + b"\r\n"
    body = line * ((size - len(head)) // len(line))
    return head + body + b"--b1--\r\n"


def children(pid: int) -> list[int]:
    """The daemon's descendants (e.g. parser worker processes), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = args.size_mib << 20
    raws = [big_message(i, size) for i in range(args.count)]
    limit = size + (8 << 20)
    with tempfile.TemporaryDirectory() as tmp, SmtpSink() as sink:
        port = free_port()
        sets = dict(redis__enabled="false", smtp__enabled="true", smtp__listen=f"127.0.0.1:{port}",
                    smtp__next_hop=sink.address, smtp__max_message_bytes=str(limit))  # fmt: skip
        d = FilterdProcess(args.model, "redis://127.0.0.1:1/0", Path(tmp) / "filterd.log", **sets)
        try:
            d.sets["smtp.max_inflight_bytes"] = str(args.count * limit)
            d.start(timeout=300)
        except AssertionError:  # code from before max_inflight_bytes
            d.stop()
            del d.sets["smtp.max_inflight_bytes"]
            d.start(timeout=300)
        try:
            base_hwm, base_rss = vm(d.proc.pid, "VmHWM"), vm(d.proc.pid, "VmRSS")
            t0 = time.perf_counter()
            codes = asyncio.run(send_concurrently(port, raws, timeout=600, sender="big@example.org"))
            seconds = time.perf_counter() - t0
            peak = vm(d.proc.pid, "VmHWM")
            helpers = sum(vm(p, "VmHWM") for p in children(d.proc.pid))
        finally:
            d.stop()
        relayed = len(sink.messages)
        exact = all(m.data.endswith(r) for m, r in zip(sorted(sink.messages, key=lambda m: m.rcpt_tos), raws))
    mib = 1 << 20
    result = {
        "label": args.label, "messages": args.count, "size_mib": args.size_mib, "codes": codes, "relayed": relayed,
        "relayed_byte_exact": exact, "seconds": seconds, "rss_before_mib": base_rss / mib, "hwm_before_mib": base_hwm / mib,
        "peak_rss_mib": peak / mib, "added_by_messages_mib": (peak - base_hwm) / mib,
        "child_processes_peak_rss_mib": helpers / mib,
        "per_message_byte_of_mail": (peak - base_hwm) / (args.count * size), "pythonpath": os.environ.get("PYTHONPATH", ""),
        "command": " ".join(["python -m bench.smtp_memory", *sys.argv[1:]]),
    }  # fmt: skip
    print("| run | messages | replies | seconds | peak RSS | added by the messages | bytes held per byte of mail | child processes' peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.label} | {args.count} x {args.size_mib} MiB | {codes} | {seconds:.1f} | {result['peak_rss_mib']:.0f} MiB | "
          f"{result['added_by_messages_mib']:.0f} MiB | {result['per_message_byte_of_mail']:.2f} | {helpers / mib:.0f} MiB |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
