"""The live model and its hot reload.

A new model is loaded in the background (never on the inference thread), checked by loading it
completely, and swapped in by replacing one reference: the batcher reads that reference once per
batch, so a swap lands between batches. A model that fails to load is refused and counted, and
the old one keeps serving. Before a model serves, at start and on each reload, it scores probe
inputs (engine.sanity_check): NaN or out-of-range scores refuse it the same way.

Triggers: the model path changing on disk (a directory swap or a `current` symlink moved), a
message on the `filterd:model` channel, or SIGHUP. Any Redis client may publish on the channel,
so an announcement only reloads when the model's fingerprint changed since the last load (or
refusal), and reloads come at most once per `min_interval_s` (a change inside the interval is
loaded when it ends). SIGHUP is the operator's: it always reloads, at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from filterd.model.engine import Engine, sanity_check
from filterd.errors import FilterdError

log = logging.getLogger("filterd.model.reload")

Fingerprint = tuple[str, int, int]
MIN_RELOAD_INTERVAL_S = 5.0


def fingerprint(path: Path) -> Fingerprint | None:
    """What identifies the model at `path`: its real path and filterd.json's inode and mtime."""
    try:
        st = os.stat(Path(path) / "filterd.json")
    except OSError:
        return None  # absent or mid-swap: look again next time
    return (os.path.realpath(path), st.st_ino, st.st_mtime_ns)


class ModelHolder:
    def __init__(
        self,
        path: Path,
        loader: Callable[[Path], Engine],
        metrics: Any | None = None,
        min_interval_s: float = MIN_RELOAD_INTERVAL_S,
        check: Callable[[Engine], None] | None = sanity_check,
    ) -> None:
        self.path = Path(path)
        self.loader = loader
        self.metrics = metrics
        self.min_interval_s = min_interval_s
        self.check = check
        self._engine: Engine | None = None
        self._seen: Fingerprint | None = None  # loaded, or refused: either way not retried until it changes
        self._lock = asyncio.Lock()
        self._last_reload = -math.inf  # monotonic time the last reload finished (loaded or refused)
        self._deferred: asyncio.Task | None = None

    def _resolved(self) -> Path:
        """The directory `path` points at now, resolved once: with a `current` symlink swapped during
        a load, filterd.json and the weights must still come from the same version."""
        return Path(os.path.realpath(self.path))

    def _load_checked(self, path: Path) -> Engine:
        engine = self.loader(path)
        if self.check is not None:
            self.check(engine)
        return engine

    def current(self) -> Engine:
        if self._engine is None:
            raise FilterdError("no model loaded")
        return self._engine

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def load_initial(self) -> Engine:
        """At start: a model that does not load is a startup failure (one line), not a retry loop."""
        self._seen = fingerprint(self.path)
        self._install(self._load_checked(self._resolved()))
        return self.current()

    async def reload(self, reason: str, force: bool = False) -> bool:
        """Load the model at `path` in a thread and swap it in; True when a new model now serves.

        Without `force`: nothing happens (False) when the fingerprint is the one last loaded or
        refused, and a reload within `min_interval_s` of the previous one is deferred to its end.
        A model that fails to load or to pass the sanity check is refused (False, old model kept).
        """
        async with self._lock:
            fp = fingerprint(self.path)
            if not force:
                if fp is None or fp == self._seen:
                    log.debug("reload (%s) skipped: the model at %s has not changed", reason, self.path)
                    return False
                wait = self._last_reload + self.min_interval_s - time.monotonic()
                if wait > 0:
                    self._defer(wait, reason)
                    return False
            self._seen = fp
            try:
                engine = await asyncio.to_thread(self._load_checked, self._resolved())
            except Exception as e:  # FilterdError for bad files; anything else is refused the same way
                log.error("reload (%s) refused: %s; still serving %s", reason, e, self._engine and self._engine.version)
                if self.metrics:
                    self.metrics.model_reloads.labels(outcome="failed").inc()
                return False
            finally:
                self._last_reload = time.monotonic()
            old = self._engine.version if self._engine else None
            self._install(engine)
            log.info("reload (%s): model %s -> %s", reason, old, engine.version)
            if self.metrics:
                self.metrics.model_reloads.labels(outcome="ok").inc()
            return True

    def _defer(self, wait: float, reason: str) -> None:
        """One pending reload at the end of the interval, however many triggers arrive before it."""
        if self._deferred is not None and not self._deferred.done():
            return
        log.info("reload (%s) deferred %.1fs: at most one reload per %gs", reason, wait, self.min_interval_s)

        async def later() -> None:
            await asyncio.sleep(wait)
            await self.reload(f"{reason}, deferred")

        self._deferred = asyncio.create_task(later(), name="model-reload-deferred")

    def _install(self, engine: Engine) -> None:
        self._engine = engine
        if self.metrics:
            self.metrics.set_model(engine.version, engine.meta.base, engine.device.type, engine.dtype)

    async def watch(self, stop: asyncio.Event, interval_s: float) -> None:
        """Poll the model path; reload when what it points at changes."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except asyncio.TimeoutError:
                pass
            fp = fingerprint(self.path)
            if fp is not None and fp != self._seen:
                await self.reload("model path changed")
