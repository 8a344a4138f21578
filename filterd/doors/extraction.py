"""Text extraction off the event loop: one policy for every door, bounded per door and per client.

Parsing mail is pure Python. A small message (at most `INLINE_BYTES` of scan view: nearly all real
mail) is parsed in a thread, which holds the GIL for a few milliseconds at most. A large one could
hold it for a second, and CPython hands the GIL back to the event loop unfairly (one busy parser
thread delays a 1 ms timer on the loop by up to ~100 ms), so it goes to worker processes. Those are
few (`workers`), so they are shared fairly: waiting messages are taken door by door in turn, a door
may have at most `max_waiting` waiting and a client at most `per_client` waiting or being parsed;
past either bound the message is refused at once with `ExtractionBusy` (its door's busy reply),
so one client's flood of huge messages cannot delay another door's mail.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from filterd.mail.text import extract_text

log = logging.getLogger("filterd")

INLINE_BYTES = 64 * 1024
WORKERS = 2
MAX_WAITING = 64  # per door
PER_CLIENT = 4  # large messages waiting or being parsed for one client address


def _log_warm_failure(f: asyncio.Future[str]) -> None:
    if not f.cancelled() and f.exception() is not None:
        log.error("extraction: the parser processes failed to start: %r (large messages will follow on_error)", f.exception())


class ExtractionBusy(Exception):
    """Too many large messages waiting for the parser processes (for this door or this client)."""


class ParserDied(Exception):
    """A parser process died (killed, out of memory); a new pool serves the next message."""


class Extractor:
    def __init__(self, workers: int = WORKERS, inline_bytes: int = INLINE_BYTES, max_waiting: int = MAX_WAITING,
                 per_client: int = PER_CLIENT) -> None:  # fmt: skip
        self.workers, self.inline_bytes = workers, inline_bytes
        self.max_waiting, self.per_client = max_waiting, per_client
        self._pool: ProcessPoolExecutor | None = None
        self._running = 0
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._turn: deque[str] = deque()  # doors with waiters, in the order they are served
        self._clients: Counter[str] = Counter()

    async def extract(self, raw: bytes, door: str, client: str = "") -> str:
        if len(raw) <= self.inline_bytes:
            return await asyncio.to_thread(extract_text, raw)
        key = f"{door}/{client}"
        if self._clients[key] >= self.per_client:
            raise ExtractionBusy(f"{self.per_client} large messages from this client are already being parsed")
        self._clients[key] += 1
        try:
            await self._slot(door)
            try:
                return await asyncio.get_running_loop().run_in_executor(self.pool(), extract_text, raw)
            except BrokenProcessPool:
                log.error("extraction: a parser process died; starting new ones")
                self.close()
                raise ParserDied("a parser process died") from None
            finally:
                self._release()
        finally:
            self._clients[key] -= 1
            if self._clients[key] <= 0:
                del self._clients[key]

    async def _slot(self, door: str) -> None:
        if self._running < self.workers and not self._turn:
            self._running += 1
            return
        queue = self._waiting.setdefault(door, deque())
        if len(queue) >= self.max_waiting:
            raise ExtractionBusy(f"{self.max_waiting} large {door} messages are already waiting to be parsed")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        if door not in self._turn:
            self._turn.append(door)
        try:
            await waiter  # _release hands the slot over: _running already counts it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed over as we were cancelled: pass it on
            else:
                queue.remove(waiter)
            raise

    def _release(self) -> None:
        while self._turn:
            door = self._turn.popleft()
            queue = self._waiting.get(door)
            if not queue:  # its waiters were cancelled
                self._waiting.pop(door, None)
                continue
            waiter = queue.popleft()
            if queue:
                self._turn.append(door)  # its next message waits for the other doors' turns
            else:
                del self._waiting[door]
            if not waiter.done():
                waiter.set_result(None)
                return
        self._running -= 1

    def pool(self) -> ProcessPoolExecutor:
        """The worker processes (started on first use; forkserver: never fork a process with threads)."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("forkserver"))
        return self._pool

    def warm(self) -> asyncio.Future[str]:
        """Start the worker processes now (a fraction of a second of CPU), not at the first large message."""
        warming = asyncio.get_running_loop().run_in_executor(self.pool(), extract_text, b"Subject: warm up\r\n\r\nparser\r\n")
        warming.add_done_callback(_log_warm_failure)
        return warming

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
