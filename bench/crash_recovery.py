"""Crash recovery over a real redis-server: kill -9 with entries in flight, restart, time to the last result.

    python -m bench.crash_recovery --entries 500 --cycles 3 --json bench/results/crash_recovery.json
    python -m bench.crash_recovery --base random:gpt2 ... --json bench/results/crash_recovery_gpt2.json

The default model is random:tiny (random weights of a tiny GPT-2), so the figures measure recovery,
not inference: with 124M on a CPU, finishing 500 entries is mostly forward passes.

Each cycle adds `--entries` messages to `filterd:in`, starts `filterd serve` (which reads them at
once), waits until at least `--in-flight` entries are pending (read, not acknowledged), kills it
with SIGKILL and starts a new process at once (stopped cleanly at the end of the cycle). `restart_to_done_s` runs from the restart (spawn) to the moment every entry added
so far has a result and nothing is pending; `ready_s` is the part spent loading the model and
`ready_to_done_s` the rest. After
the cycles, the stream is deleted under the running daemon and `deleted_stream_s` is the time until
10 entries added after the deletion are answered. `--unstable-names` gives each process its own
consumer name, as the old `<hostname>-<pid>` default did (recovery then waits for claim_idle_ms).
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import tempfile
import time
from pathlib import Path

from bench.daemon_redis import make_model
from testing.corpus import SHARED
from testing.daemon import FilterdProcess
from testing.services import RedisServer
from trainer.data import read_sms


def pending(r) -> int:
    return r.xpending("filterd:in", "filterd")["pending"]


def answered(r) -> set[bytes]:
    return {f[b"id"] for _, f in r.xrange("filterd:out")}


def wait(cond, timeout: float, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def run(model: Path, texts: list[str], work: Path, cycles: int, entries: int, in_flight: int, unstable: bool, batch: int) -> dict:
    redis = RedisServer(work / "redis").start()
    r = redis.client()
    rows = []
    n = 0
    try:
        names = iter(f"bench-{i}" for i in range(100))

        def daemon(tag: str) -> FilterdProcess:
            extra = {"redis__consumer": next(names)} if unstable else {}
            return FilterdProcess(model, redis.url, work / f"{tag}.log", batching__max_batch_size=batch, **extra)

        for cycle in range(cycles):
            pipe = r.pipeline(transaction=False)
            for i in range(n, n + entries):
                pipe.xadd("filterd:in", {"text": texts[i % len(texts)], "id": str(i)})
            pipe.execute()
            n += entries
            d = daemon(f"crash{cycle}").start(timeout=300)  # it reads the waiting entries at once
            if not wait(lambda: pending(r) >= in_flight, 120, poll=0.002):
                raise SystemExit(f"cycle {cycle}: never {in_flight} entries in flight (pending {pending(r)})")
            at_kill = pending(r)
            d.stop(signal.SIGKILL)
            t0 = time.monotonic()
            d = daemon(f"cycle{cycle}")
            d.start(timeout=300)
            ready = time.monotonic() - t0
            done = wait(lambda n=n: pending(r) == 0 and len(answered(r)) >= n, 600)
            took = time.monotonic() - t0
            ids = [f[b"id"] for _, f in r.xrange("filterd:out")]
            rows.append({"cycle": cycle + 1, "in_flight_at_kill": at_kill, "ready_s": round(ready, 2),
                         "restart_to_done_s": round(took, 2) if done else None,
                         "ready_to_done_s": round(took - ready, 2) if done else None, "results": len(set(ids)),
                         "duplicates": len(ids) - len(set(ids)),
                         "consumers": len(r.xinfo_consumers("filterd:in", "filterd"))})  # fmt: skip
            print(rows[-1], flush=True)
            if cycle < cycles - 1:
                d.stop()  # clean exit; the next cycle's entries wait for the next process
        r.delete("filterd:in")
        time.sleep(0.2)
        t0 = time.monotonic()
        late = [r.xadd("filterd:in", {"text": "after the deletion", "id": f"late{i}"}) for i in range(10)]
        ok = wait(lambda: {f[b"entry"] for _, f in r.xrange("filterd:out")} >= set(late), 120)
        deleted_s = round(time.monotonic() - t0, 2) if ok else None
        healthy = d.get("/healthz")[0]
        rc = d.stop()
        consumers_after = len(r.xinfo_consumers("filterd:in", "filterd"))
    finally:
        redis.stop()
    return {"cycles": rows, "deleted_stream_s": deleted_s, "healthz_after_deletion": healthy, "exit_code": rc,
            "consumers_after_clean_exit": consumers_after}  # fmt: skip


def table(result: dict, command: str) -> str:
    lines = [f"`{command}`", "", "| cycle | in flight at kill -9 | restart to ready (s) | restart to last result (s) | ready to last result (s) | duplicates | consumers in group |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for c in result["cycles"]:
        lines.append(
            f"| {c['cycle']} | {c['in_flight_at_kill']} | {c['ready_s']} | {c['restart_to_done_s']} | {c['ready_to_done_s']} | {c['duplicates']} | {c['consumers']} |"
        )
    lines.append("")
    lines.append(f"Stream deleted under the running daemon: 10 new entries answered in {result['deleted_stream_s']} s "
                 f"(/healthz {result['healthz_after_deletion']}); consumers left after the clean exit: "
                 f"{result['consumers_after_clean_exit']}.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a model directory (default: random weights of --base)")
    ap.add_argument("--base", default="random:tiny")
    ap.add_argument("--entries", type=int, default=500, help="entries added per cycle")
    ap.add_argument("--in-flight", type=int, default=400, help="kill once this many entries are pending")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="[batching] max_batch_size: small, so entries stay in flight")
    ap.add_argument("--max-length", type=int, default=512, help="the model's max_length")
    ap.add_argument("--sms-per-entry", type=int, default=3, help="UCI messages joined into one entry (longer entries stay in flight longer)")
    ap.add_argument("--unstable-names", action="store_true", help="a new consumer name per process (the old default)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    sms = [e.text for e in read_sms(SHARED / "data" / "sms-spam-collection" / "SMSSpamCollection")]
    k = args.sms_per_entry
    texts = [" ".join(sms[i : i + k]) for i in range(0, len(sms) - k, k)]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = args.model or make_model(args.base, work / "model", max_length=args.max_length)
        result = run(model, texts, work, args.cycles, args.entries, args.in_flight, args.unstable_names, args.batch)
    command = "python -m bench.crash_recovery " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k not in ("json", "work")
    )
    if args.unstable_names:
        command = command.replace("--unstable-names True", "--unstable-names")
    out = {"command": command, "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
           "model": str(args.model or args.base), **result}  # fmt: skip
    md = table(result, command)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
