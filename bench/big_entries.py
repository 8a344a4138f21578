"""Peak memory of `filterd serve` when huge entries arrive: 8 entries of 100 MiB on `filterd:in`.

    python -m bench.big_entries --json bench/results/big_entries.json

A fresh redis-server and `filterd serve` (random:tiny model) start; once the daemon is ready its
peak RSS (VmHWM in /proc/PID/status) is read, then `--count` entries with a `--size-mib` text
field are added, each over `[redis] max_text_bytes`, so each one is dead-lettered. When all are
dead-lettered, the peak RSS is read again, and the size of the dead letters in Redis is summed
(MEMORY USAGE of the dead stream).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.daemon_redis import make_model
from testing.daemon import FilterdProcess
from testing.services import RedisServer


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model("random:tiny", work / "model", max_length=128)
        redis = RedisServer(work / "redis").start()
        try:
            r = redis.client()
            r.config_set("appendonly", "no")  # the bench measures filterd, not the disk
            d = FilterdProcess(model, redis.url, work / "filterd.log").start(timeout=120)
            before = peak_rss_mib(d.proc.pid)
            payload = b"x" * (args.size_mib << 20)
            t0 = time.monotonic()
            for i in range(args.count):
                r.xadd("filterd:in", {"text": payload, "id": f"big{i}"})
            while r.xlen("filterd:dead") < args.count:
                time.sleep(0.05)
            took = time.monotonic() - t0
            after = peak_rss_mib(d.proc.pid)
            dead_bytes = r.memory_usage("filterd:dead") or 0
            fields = sorted(k.decode() for k in r.xrange("filterd:dead", count=1)[0][1])
            d.stop()
        finally:
            redis.stop()
    result = {"count": args.count, "size_mib": args.size_mib, "peak_rss_ready_mib": round(before, 1),
              "peak_rss_after_mib": round(after, 1), "seconds": round(took, 2),
              "dead_stream_bytes": dead_bytes, "dead_letter_fields": fields}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
