"""Event-loop stalls in `filterd serve` while the SpamAssassin corpus goes through SMTP.

    python -m bench.smtp_stalls --model MODEL_DIR --label after --json bench/results/smtp_stalls_after.json

The daemon (`filterd.daemon.Daemon`: SMTP ingress, batcher, engine thread, metrics server) runs in
this process, and a probe coroutine shares its event loop: it sleeps 1 ms again and again and
records how late it wakes up. A stall of the loop (work done on it rather than in a thread, or the
GIL held by a thread) shows up as lateness; so does the OS running other processes on a busy
machine. To tell them apart every event-loop callback is also timed in CPU time of the loop's
thread (`time.thread_time`, which neither preemption nor waiting for the GIL counts): that is the
work filterd itself does on the loop at a stretch. The SMTP client (`--concurrency` sessions at a time)
and the next hop (an SMTP sink) run in a child process, so their own work is not counted.

To measure the code before a change, run the same script with the old tree first on the path:
`PYTHONPATH=/path/to/old/checkout python bench/smtp_stalls.py ...` (only keys both know are set).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path("/work/shared/data/spamassassin-publiccorpus")


def corpus_files(root: Path) -> list[Path]:
    dirs = ("easy_ham", "easy_ham_2", "hard_ham", "spam", "spam_2")
    return [p for d in dirs for p in sorted((root / d).iterdir()) if p.is_file()]


def _drive(files: list[str], concurrency: int, conn) -> None:
    """Child process: the next hop (a sink) and the SMTP client."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    from testing.smtp_sink import SmtpSink, send_concurrently

    with SmtpSink() as sink:
        conn.send(sink.address)
        port = conn.recv()

        t0 = time.perf_counter()
        paths = [Path(f) for f in files]
        codes = asyncio.run(send_concurrently(port, paths, timeout=300, concurrency=concurrency, sender="bench@example.org"))
        conn.send((codes, time.perf_counter() - t0, len(sink.messages)))


async def probe(samples: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.001)
        samples.append(loop.time() - t - 0.001)


class CallbackTimer:
    """Times every event-loop callback (asyncio.Handle._run): CPU time of the loop thread and wall time."""

    def __init__(self) -> None:
        self.active = False  # only while the corpus is going through (not the model load)
        self.count = 0
        self.cpu: list[float] = []  # seconds, callbacks over 1 ms of CPU only (the rest are counted)
        self.worst: list[tuple[float, float, str]] = []

    def install(self) -> None:
        original = asyncio.events.Handle._run
        timer = self
        self.gc: list[tuple[int, float]] = []  # (generation, seconds) of each collection while active
        started: list[float] = []

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[:] = [time.perf_counter()]
            elif started and timer.active:
                self.gc.append((info["generation"], time.perf_counter() - started[0]))

        gc.callbacks.append(on_gc)

        def _run(handle: asyncio.events.Handle) -> None:
            c0, w0 = time.thread_time(), time.perf_counter()
            original(handle)
            if not timer.active:
                return
            cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
            timer.count += 1
            if cpu > 0.001:
                timer.cpu.append(cpu)
                timer.worst.append((cpu, wall, _name(handle)))
                timer.worst = sorted(timer.worst, reverse=True)[:8]

        asyncio.events.Handle._run = _run  # type: ignore[method-assign]


def _name(handle: asyncio.events.Handle) -> str:
    cb = handle._callback  # type: ignore[attr-defined]
    owner = getattr(cb, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return "task " + getattr(owner.get_coro(), "__qualname__", "?")
    return getattr(cb, "__qualname__", repr(cb))[:80]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def measure(args: argparse.Namespace, next_hop: str, port: int, conn, timer: CallbackTimer) -> dict:
    from filterd.config import load_config
    from filterd.daemon import Daemon

    sets = [f"model.path={args.model}", "model.device=cpu", "redis.enabled=false", "smtp.enabled=true",
            f"smtp.listen=127.0.0.1:{port}", f"smtp.next_hop={next_hop}", f"metrics.listen=127.0.0.1:{args.metrics_port}"]  # fmt: skip
    daemon = Daemon(load_config(None, sets))
    task = asyncio.create_task(daemon.run())
    while daemon.smtp is None or not daemon.smtp.up or daemon.batcher is None:
        await asyncio.sleep(0.05)
        if task.done():
            raise SystemExit(f"daemon exited: {task.result()}")
    samples: list[float] = []
    stop = asyncio.Event()
    timer.active = True
    prober = asyncio.create_task(probe(samples, stop))
    conn.send(port)
    codes, seconds, relayed = await asyncio.to_thread(conn.recv)
    stop.set()
    timer.active = False
    await prober
    daemon.stop.set()
    await task
    return {"codes": {str(c): codes.count(c) for c in sorted(set(codes))}, "seconds": seconds, "relayed": relayed,
            "samples": samples}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--limit", type=int, default=0, help="only the first N messages (0: all 6,046)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    files = [str(p) for p in corpus_files(args.corpus)]
    files = files[: args.limit] if args.limit else files

    if str(REPO) not in sys.path:  # run as a file (e.g. with an older checkout first on PYTHONPATH)
        sys.path.append(str(REPO))
    import filterd

    from testing.services import free_port

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    driver = ctx.Process(target=_drive, args=(files, args.concurrency, child))
    driver.start()
    next_hop = parent.recv()
    args.metrics_port = free_port()
    timer = CallbackTimer()
    timer.install()
    out = asyncio.run(measure(args, next_hop, free_port(), parent, timer))
    driver.join(60)
    lat = [1000 * s for s in out.pop("samples")]
    result = {
        "label": args.label, "filterd": str(Path(filterd.__file__).parent), "messages": len(files),
        "concurrency": args.concurrency, **out, "messages_per_s": len(files) / out["seconds"],
        "probe_samples": len(lat), "stall_max_ms": max(lat), "stall_p99_ms": pct(lat, 0.99),
        "stall_p999_ms": pct(lat, 0.999), "stall_p50_ms": pct(lat, 0.5),
        "over_20ms": sum(x > 20 for x in lat), "switch_interval_ms": 1000 * sys.getswitchinterval(),
        "callbacks": timer.count, "callback_cpu_max_ms": 1000 * max(timer.cpu, default=0.0),
        "callbacks_cpu_over_5ms": sum(c > 0.005 for c in timer.cpu), "callbacks_cpu_over_20ms": sum(c > 0.02 for c in timer.cpu),
        "worst_callbacks": [{"cpu_ms": 1000 * c, "wall_ms": 1000 * w, "callback": n} for c, w, n in timer.worst],
        "load_average": os.getloadavg(),
        "gc_collections": {g: sum(1 for x, _ in timer.gc if x == g) for g in (0, 1, 2)},
        "gc_max_ms": {g: 1000 * max((s for x, s in timer.gc if x == g), default=0.0) for g in (0, 1, 2)},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "command": " ".join(["python -m bench.smtp_stalls", *sys.argv[1:]]),
    }  # fmt: skip
    print("| run | messages | replies | msgs/s | loop lateness max | p99.9 | p99 | p50 | samples > 20 ms | "
          "longest callback (loop CPU) | callbacks > 5 ms CPU | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.label} | {len(files)} | {result['codes']} | {result['messages_per_s']:.1f} | {result['stall_max_ms']:.1f} ms | "
          f"{result['stall_p999_ms']:.1f} ms | {result['stall_p99_ms']:.2f} ms | {result['stall_p50_ms']:.2f} ms | {result['over_20ms']} | "
          f"{result['callback_cpu_max_ms']:.1f} ms | {result['callbacks_cpu_over_5ms']} | {result['load_average'][0]:.1f} |")
    print(f"    garbage collections {result['gc_collections']}, longest (ms) {result['gc_max_ms']}")
    for w in result["worst_callbacks"][:5]:
        print(f"    {w['cpu_ms']:.1f} ms CPU ({w['wall_ms']:.1f} ms wall): {w['callback']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
