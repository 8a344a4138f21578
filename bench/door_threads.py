"""Where one door's CPU goes, by thread of `filterd serve`: the event loop, the model worker, the rest.

    cd CHECKOUT && FILTERD_SHARED=/work/shared OMP_NUM_THREADS=1 python /path/to/bench/door_threads.py http

Runs one path of the checkout's own `bench.doors` (`http` or `milter-protocol`, the test split of
/work/sa/data by default) and reads /proc/<pid>/task/*/stat of the daemon before and after it, so
the same reading applies to a checkout from before the message path (whose bench.doors has no
per-thread table). The main thread runs the event loop; the busiest other one is the model worker;
the rest are the extraction thread pool and the writers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout under test first (its filterd, its bench.doors) ...
sys.path.append(str(Path(__file__).resolve().parents[1]))  # ... this one's harness where it has none
from testing.services import thread_cpu_s  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", choices=("http", "milter-protocol"))
    ap.add_argument("--model", type=Path, default=Path("/work/sa/model"))
    ap.add_argument("--data", type=Path, default=Path("/work/sa/data"))
    args = ap.parse_args()
    import bench.doors as bd
    from trainer.data import read_split

    try:
        from testing.corpus import CORPUS, wire
    except ImportError:  # the layout before the message path
        from bench.corpus import CORPUS, wire  # type: ignore[no-redef]
    raws = [wire((CORPUS / m.id).read_bytes()) for m in read_split(args.data / "test.csv")]
    seen: list[tuple[int, dict[str, float]]] = []
    measure = bd.cpu_seconds

    def cpu_seconds(d, *rest):  # type: ignore[no-untyped-def]  # bench.doors calls it right before and after the path
        if d is not None:
            seen.append((d.proc.pid, thread_cpu_s(d.proc.pid)))
        return measure(d, *rest)

    bd.cpu_seconds = cpu_seconds
    run = {"http": bd.http_path, "milter-protocol": bd.milter_protocol_path}[args.path]
    run(args.model, raws, 16, Path(tempfile.mkdtemp()))
    (pid, t0), (_, t1) = seen[0], seen[-1]
    per = {t: 1000 * (v - t0.get(t, 0.0)) / len(raws) for t, v in t1.items()}
    loop = per.pop(f"thread:{pid}")
    worker = max(per.values())
    print(f"{os.getcwd()} {args.path}: ms of CPU per message: event loop {loop:.2f}, model worker {worker:.2f}, "
          f"other threads {sum(per.values()) - worker:.2f} ({len(raws)} messages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
