"""Supervision of a process's long-running tasks: one that dies ends the process, loudly.

`supervise` runs named coroutines until `stop` is set. If one of them raises (or returns while it
should still be running), it logs `<name> failed: <reason>`, sets `stop` so the others finish their
in-flight work and return, waits for them, and raises `TaskFailed`: the CLI prints the line and
exits 1, and systemd (Restart=on-failure) starts a fresh process. Never a silently dead ingress.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable

from filterd.errors import FilterdError

log = logging.getLogger("filterd")


class TaskFailed(FilterdError):
    """A supervised task died; the message is `<name> failed: <reason>`."""


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, FilterdError) and text else f"{type(e).__name__}: {text}" if text else type(e).__name__


async def supervise(jobs: dict[str, Awaitable[object]], stop: asyncio.Event) -> None:
    """Run `jobs` (name -> coroutine) until `stop`; see the module docstring."""
    tasks = {asyncio.ensure_future(job): name for name, job in jobs.items()}
    stopped = asyncio.ensure_future(stop.wait())
    failure: str | None = None
    try:
        pending = set(tasks)
        while pending and not stop.is_set():
            done, pending = await asyncio.wait(pending | {stopped}, return_when=asyncio.FIRST_COMPLETED)
            done.discard(stopped)
            pending.discard(stopped)
            for t in done:
                if stop.is_set() and not t.cancelled() and t.exception() is None:
                    continue  # ended because we are stopping
                e = t.exception() if not t.cancelled() else asyncio.CancelledError()
                failure = f"{tasks[t]} failed: {_reason(e) if e is not None else 'ended unexpectedly'}"
                log.error("%s", failure)
                stop.set()
                break
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for t, r in zip(tasks, results):
            if failure is None and isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                failure = f"{tasks[t]} failed: {_reason(r)}"
                log.error("%s", failure)
    finally:
        stopped.cancel()
    if failure is not None:
        raise TaskFailed(failure)
