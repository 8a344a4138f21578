"""Versioned model directories under `[trainer] models_dir`, and the atomic `current` pointer filterd serves.

    models_dir/versions/<version>/   one complete model directory per published model
    models_dir/current -> versions/<version>   (a relative symlink; `[model] path` points here)

A version is written into a staging directory beside the others, fsynced, and renamed into place;
only then is `current` repointed, by renaming a fresh symlink over it (rename(2) is atomic), so a
reader following `current` finds the old complete directory or the new complete one, never a part.
filterd's ModelHolder polls realpath(current) and filterd.json's inode/mtime, which both change
on a swap, and also listens on `[redis] model_channel`, which `announce` publishes to.

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
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filterd.config import redact_url
from filterd.errors import FilterdError, ModelError
from filterd.model.gpt2 import GPT2Classifier
from filterd.model.weights import META_FILE, ModelMeta, _exchange, publish_directory, staging_dir, write_model_files

from trainer.data import Example, write_split
from trainer.evaluate import SplitReport

log = logging.getLogger("filterd.trainer")

CURRENT = "current"
VERSIONS = "versions"
REFIT_LOG = "refits.jsonl"  # one line per refit cycle that ran (promoted, rejected, failed), newest last
REFIT_LOG_KEEP = 200
STALE_STAGING_S = 3600.0  # a staging directory this old belongs to a publish that died


def _fsync_dir(path: Path) -> None:
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

    # -- writing -------------------------------------------------------------------------------
    def publish(self, model: GPT2Classifier, meta: ModelMeta, reports: list[SplitReport], history: dict | None = None,
                files: dict[str, list[Example]] | None = None) -> Path:  # fmt: skip
        """Write a new version completely, then point `current` at it; returns versions/<version>.

        `files`: extra split CSVs (name -> examples) written into the version, e.g. the golden set.

        `meta.version` empty: one is made from the weights' hash. `meta.created` is stamped now.
        """
        from trainer.fit import write_artifacts  # fit imports matplotlib via plots; only publishing needs it

        meta.created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        staged = staging_dir(self.versions_dir / "new")
        try:
            meta = write_model_files(model, meta, staged)
            if reports:
                write_artifacts(staged, meta, reports, history)
            for name, examples in (files or {}).items():
                write_split(staged / name, examples)
            target = self.versions_dir / meta.version
            if target.exists():
                raise FilterdError(f"{target}: version {meta.version} already exists")
            publish_directory(staged, target)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        self._point_current(meta.version)
        log.info("publish: %s is now current in %s", meta.version, self.root)
        return target

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
        _fsync_dir(self.root)

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

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` versions and the current one; returns the deleted names."""
        current = self.current_version()
        doomed = [v for v in self.versions()[max(keep, 0) :] if v != current]
        for name in doomed:
            shutil.rmtree(self.versions_dir / name, ignore_errors=True)
        if self.versions_dir.is_dir():
            for d in self.versions_dir.glob(".*.staging-*"):
                if time.time() - d.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(d, ignore_errors=True)
        if doomed:
            log.info("publish: pruned %d old versions (kept %d + current)", len(doomed), keep)
        return doomed

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

    def record_refit(self, outcome: dict[str, Any], keep: int = REFIT_LOG_KEEP) -> None:
        """Append one cycle's outcome to models_dir/refits.jsonl (the last `keep` kept): a rejected or failed
        refit leaves no version behind, and the console shows operators what happened to their labels."""
        path = self.root / REFIT_LOG
        line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **outcome}, default=str)
        lines = path.read_text(errors="replace").splitlines()[-(keep - 1) :] if path.is_file() and keep > 1 else []
        tmp = self.root / f".{REFIT_LOG}.tmp-{secrets.token_hex(4)}"
        self.root.mkdir(parents=True, exist_ok=True)
        tmp.write_text("\n".join([*lines, line]) + "\n")
        os.replace(tmp, path)  # readers see the old log or the new one, never half a line

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

    # -- telling filterd -----------------------------------------------------------------------
    @staticmethod
    def announce(redis_url: str, channel: str, version: str, timeout_s: float = 5.0) -> int | None:
        """PUBLISH the version on `channel`; the number of listeners, or None when Redis is unreachable (logged)."""
        import redis

        client: Any = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            listeners = int(client.publish(channel, version))
        except (redis.RedisError, OSError) as e:
            log.warning("announce: %s on %s at %s failed (%s); filterd will still see the new path",
                        version, channel, redact_url(redis_url), " ".join(str(e).split()))  # fmt: skip
            return None
        finally:
            client.close()
        log.info("announce: %s on %s (%d listeners)", version, channel, listeners)
        return listeners
