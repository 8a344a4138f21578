"""The live model and its hot reload.

A new model is loaded in the background (never on the inference thread), checked by loading it
completely, and swapped in by replacing one reference: the batcher reads that reference once per
batch, so a swap lands between batches. A model that fails to load is refused and counted, and
the old one keeps serving. Triggers: the model path changing on disk (a directory swap or a
`current` symlink moved), a message on the `filterd:model` channel, or SIGHUP.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Callable

from .engine import Engine
from .errors import FilterdError

log = logging.getLogger("filterd.reload")

Fingerprint = tuple[str, int, int]


def fingerprint(path: Path) -> Fingerprint | None:
    """What identifies the model at `path`: its real path and filterd.json's inode and mtime."""
    try:
        st = os.stat(Path(path) / "filterd.json")
    except OSError:
        return None  # absent or mid-swap: look again next time
    return (os.path.realpath(path), st.st_ino, st.st_mtime_ns)


class ModelHolder:
    def __init__(self, path: Path, loader: Callable[[Path], Engine], metrics: Any | None = None) -> None:
        self.path = Path(path)
        self.loader = loader
        self.metrics = metrics
        self._engine: Engine | None = None
        self._seen: Fingerprint | None = None  # loaded, or refused: either way not retried until it changes
        self._lock = asyncio.Lock()

    def _resolved(self) -> Path:
        """The directory `path` points at now, resolved once: with a `current` symlink swapped during
        a load, filterd.json and the weights must still come from the same version."""
        return Path(os.path.realpath(self.path))

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
        self._install(self.loader(self._resolved()))
        return self.current()

    async def reload(self, reason: str) -> bool:
        """Load the model at `path` in a thread and swap it in; False (old model kept) on failure."""
        async with self._lock:
            self._seen = fingerprint(self.path)
            try:
                engine = await asyncio.to_thread(self.loader, self._resolved())
            except Exception as e:  # FilterdError for bad files; anything else is refused the same way
                log.error("reload (%s) refused: %s; still serving %s", reason, e, self._engine and self._engine.version)
                if self.metrics:
                    self.metrics.model_reloads.labels(outcome="failed").inc()
                return False
            old = self._engine.version if self._engine else None
            self._install(engine)
            log.info("reload (%s): model %s -> %s", reason, old, engine.version)
            if self.metrics:
                self.metrics.model_reloads.labels(outcome="ok").inc()
            return True

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
