"""Versioned model directories under `[trainer] models_dir`, and the atomic `current` pointer filterd serves:
the side the console reads and rolls back (trainer.publish adds publishing, pruning and the refit log).

    models_dir/versions/<version>/   one complete model directory per published model
    models_dir/current -> versions/<version>   (a relative symlink; `[model] path` points here)

`current` is repointed by renaming a fresh symlink over it (rename(2) is atomic), so a reader following
`current` finds the old complete directory or the new complete one, never a part. filterd's ModelHolder
polls realpath(current) and filterd.json's inode/mtime, which both change on a swap.

A `current` that is a real directory (e.g. written by `filterd-trainer fit --out .../current`) is
adopted on the first publish: swapped for the symlink with renameat2(RENAME_EXCHANGE) and moved
into versions/. Versions are ordered by their filterd.json `created` time (publish stamps it to the
microsecond), then name; `rollback` moves `current` to the one created before it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filterd.errors import FilterdError, ModelError
from filterd.model.weights import META_FILE, ModelMeta, _exchange

log = logging.getLogger("filterd.trainer")  # as trainer.publish: the model store's lines read the same from both

CURRENT = "current"
VERSIONS = "versions"
REFIT_LOG = "refits.jsonl"  # one line per refit cycle that ran (promoted, rejected, failed), newest last


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _created(directory: Path) -> datetime:
    """The creation time in filterd.json (aware, UTC), or the directory's mtime when unreadable."""
    try:
        meta = ModelMeta.from_json((directory / META_FILE).read_text(errors="replace"), str(directory / META_FILE))
        created = datetime.fromisoformat(meta.created)
        return created if created.tzinfo else created.replace(tzinfo=timezone.utc)
    except (ModelError, ValueError, OSError):
        return datetime.fromtimestamp(directory.stat().st_mtime, timezone.utc)


class ModelStore:
    """The versions under `models_dir` and its `current` pointer; see the module docstring."""

    def __init__(self, models_dir: Path | str) -> None:
        self.root = Path(models_dir)
        self.link = self.root / CURRENT
        self.versions_dir = self.root / VERSIONS

    # -- reading -------------------------------------------------------------------------------
    def current(self) -> Path | None:
        """The live model directory (symlink resolved), or None when there is none yet."""
        if not (self.link / META_FILE).is_file():
            return None
        return self.link.resolve()

    def current_version(self) -> str | None:
        path = self.current()
        return path.name if path is not None and path.parent == self.versions_dir.resolve() else None

    def versions(self) -> list[str]:
        """Published versions, newest first (filterd.json `created`, then name)."""
        if not self.versions_dir.is_dir():
            return []
        dirs = [d for d in self.versions_dir.iterdir() if not d.name.startswith(".") and (d / META_FILE).is_file()]
        return [d.name for d in sorted(dirs, key=lambda d: (_created(d), d.name), reverse=True)]

    def refits(self, limit: int = 50) -> list[dict[str, Any]]:
        """The last `limit` recorded refit outcomes, newest first (unreadable lines skipped)."""
        path = self.root / REFIT_LOG
        if not path.is_file():
            return []
        out = []
        for line in reversed(path.read_text(errors="replace").splitlines()):
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                out.append(item)
            if len(out) >= limit:
                break
        return out

    # -- moving `current` ----------------------------------------------------------------------
    def rollback(self) -> str:
        """Point `current` at the version created before it; returns that version. FilterdError if there is none."""
        current = self.current_version()
        if current is None:
            raise FilterdError(f"{self.link}: no published current version to roll back from")
        versions = self.versions()
        older = versions[versions.index(current) + 1 :] if current in versions else []
        if not older:
            raise FilterdError(f"{self.versions_dir}: no version older than {current} to roll back to")
        self._point_current(older[0])
        log.info("rollback: %s -> %s", current, older[0])
        return older[0]

    def _point_current(self, version: str) -> None:
        """Atomically make `current` a symlink to versions/<version>."""
        tmp = self.root / f".{CURRENT}.tmp-{secrets.token_hex(4)}"
        os.symlink(os.path.join(VERSIONS, version), tmp)
        try:
            if self.link.is_dir() and not self.link.is_symlink():
                self._adopt(tmp)
            else:
                os.replace(tmp, self.link)
        finally:
            if tmp.is_symlink():
                tmp.unlink()
        fsync_dir(self.root)

    def _adopt(self, tmp_link: Path) -> None:
        """`current` is a real directory: swap the symlink in and keep the old model as a version."""
        try:
            meta = ModelMeta.from_json((self.link / META_FILE).read_text(errors="replace"), str(self.link / META_FILE))
            name = meta.version
        except (ModelError, OSError):
            name = f"adopted-{int(time.time())}"
        dest = self.versions_dir / name
        if dest.exists():
            dest = self.versions_dir / f"{name}-{secrets.token_hex(2)}"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        if _exchange(tmp_link, self.link):  # tmp_link now names the old directory
            os.rename(tmp_link, dest)
        else:  # no renameat2: a moment without `current` (never a partial one); filterd keeps its model
            os.rename(self.link, dest)
            os.replace(tmp_link, self.link)
        log.info("publish: adopted the directory %s as version %s", self.link, dest.name)
