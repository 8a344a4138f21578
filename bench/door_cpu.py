"""A door's own CPU per request, without the model: `filterd`'s HTTP door with a stub scorer that answers at once.

    FILTERD_SHARED=/work/shared python -m bench.door_cpu --data /work/sa/data [--tree /path/to/other/checkout]

The server runs in its own process (this script with `--serve PORT`, importing the filterd of `--tree`,
default this checkout; the layout before the message path too); the client posts the split's mails
twice, 16 at a time, one connection each, and the CPU (user + system) of the server and every process
it started (the parser processes) over that pass is divided by the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def serve(port: int) -> None:
    import signal

    sys.path.insert(0, os.getcwd())
    from filterd.config import load_config

    try:
        from filterd.doors.http import HttpDoor, HttpServer
        from filterd.doors.path import MessagePath
        from filterd.policy.decision import Policy

        new = True
    except ImportError:  # the layout before the message path
        from filterd.decision import Policy  # type: ignore[no-redef]
        from filterd.ingress.http import HttpDoor, HttpServer  # type: ignore[no-redef]

        new = False
    cfg = load_config(None, ["http.enabled=true", f"http.listen=127.0.0.1:{port}", "redis.enabled=false"])

    async def score(text: str) -> SimpleNamespace:
        return SimpleNamespace(score=0.7, model="stub", threshold=0.5)

    policy = Policy.from_config(cfg)
    door = HttpDoor(cfg.http, MessagePath.of(score, policy), policy, "[SPAM] ") if new else HttpDoor(cfg.http, score, policy, "[SPAM] ")

    async def main() -> None:
        server = HttpServer(cfg.http, door)
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        if new:
            door.path.extractor.close()  # the parser processes end with the server

    asyncio.run(main())


async def post_all(port: int, raws: list[bytes], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(raw: bytes) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /checkv2 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nFrom: <a@bench.example>\r\n"
                         b"Rcpt: <b@bench.example>\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw))  # fmt: skip
            await reader.read()
            writer.close()

    await asyncio.gather(*(one(r) for r in raws))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help="a prepare directory whose ids name corpus files")
    ap.add_argument("--split", default="test")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tree", type=Path, default=Path.cwd(), help="the checkout whose filterd serves")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    from testing.corpus import CORPUS, wire
    from testing.services import free_port, tree_cpu_s
    from trainer.data import read_split

    raws = [wire((CORPUS / m.id).read_bytes()) for m in read_split(args.data / f"{args.split}.csv")] * 2
    port = free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(port)], stdout=subprocess.PIPE,
                              cwd=args.tree, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        asyncio.run(post_all(port, raws[:100], args.concurrency))  # warm up
        c0, t0 = tree_cpu_s(server.pid), time.perf_counter()
        asyncio.run(post_all(port, raws, args.concurrency))
        per = 1000 * (tree_cpu_s(server.pid) - c0) / len(raws)
        print(f"{args.tree}: {len(raws)} /checkv2 requests: the door's processes used {per:.3f} ms of CPU per request "
              f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
