"""Announcements on `filterd:model` while traffic flows: how many reloads they cost, and the latency.

    python -m bench.reload_storm --base random:gpt2 --json bench/results/reload_storm_after.json

`filterd serve` (the code on sys.path) runs on a real redis-server with a model that does not
change; messages arrive at a fixed rate for `--seconds`. Two runs: `quiet` (no announcements) and
`storm` (`--publishes` PUBLISH filterd:model back to back at `--storm-at` seconds, as any Redis
client could send). Reported per run: reloads counted, p50/p99/max end-to-end latency (input
entry id to result entry id, both Redis clock). Run from another checkout (cwd and PYTHONPATH
there) to measure that code with the same script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from bench.daemon_redis import SHARED, entry_ms, make_model, pct
from testing.daemon import FilterdProcess
from testing.services import RedisServer
from trainer.data import read_sms


def run(model: Path, texts: list[str], work: Path, rate: float, seconds: float, publishes: int, storm_at: float) -> dict:
    redis = RedisServer(work / "redis").start()
    try:
        d = FilterdProcess(model, redis.url, work / "filterd.log", model__poll_interval="1h").start(timeout=300)
        r = redis.client()
        n = int(rate * seconds)
        t0 = time.perf_counter()
        stormed = publishes == 0
        for i in range(n):  # open loop: arrival i is due at t0 + i/rate
            time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            if not stormed and time.perf_counter() - t0 >= storm_at:
                for _ in range(publishes):
                    r.publish("filterd:model", "same-model")
                stormed = True
            r.xadd("filterd:in", {"text": texts[i % len(texts)], "id": str(i)})
        deadline = time.monotonic() + 600
        while r.xlen("filterd:out") < n and time.monotonic() < deadline:
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        lat = [entry_ms(eid) - entry_ms(f[b"entry"]) for eid, f in r.xrange("filterd:out")]
        reloads = d.metric('filterd_model_reloads_total{outcome="ok"}')
        d.stop()
    finally:
        redis.stop()
    return {"messages": n, "results": len(lat), "publishes": publishes, "reloads_ok": reloads, "wall_s": round(wall, 1),
            "p50_ms": pct(lat, 0.50), "p99_ms": pct(lat, 0.99), "max_ms": max(lat)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="random:gpt2")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rate", type=float, default=10.0, help="messages per second")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--publishes", type=int, default=10)
    ap.add_argument("--storm-at", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    load_start = os.getloadavg()
    texts = [e.text for e in read_sms(SHARED / "data" / "sms-spam-collection" / "SMSSpamCollection")][:2000]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(args.base, work / "model", args.max_length)
        runs = {}
        for name, pubs in (("quiet", 0), ("storm", args.publishes)):
            (work / name).mkdir()
            runs[name] = run(model, texts, work / name, args.rate, args.seconds, pubs, args.storm_at)
    code = os.path.realpath(os.getcwd())
    result = {"command": "python -m bench.reload_storm " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                    if k != "json" and v is not None),
              "code": code, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "runs": runs}  # fmt: skip
    print("| run | publishes | reloads counted | p50 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- | --- |")
    for name, x in runs.items():
        print(f"| {name} | {x['publishes']} | {x['reloads_ok']:.0f} | {x['p50_ms']} | {x['p99_ms']} | {x['max_ms']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
