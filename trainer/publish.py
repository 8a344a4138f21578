"""Publishing a model into `[trainer] models_dir`: versions, `current`, rollback (filterd.store.models, which
the console uses too) plus what only the trainer does: write a version, prune old ones, log refits, announce.

A version is written into a staging directory beside the others, fsynced, and renamed into place;
only then is `current` repointed (filterd.store.models), so filterd never sees a partial model. filterd
also listens on `[redis] model_channel`, which `announce` publishes to.
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
from filterd.errors import FilterdError
from filterd.model.gpt2 import GPT2Classifier
from filterd.model.weights import ModelMeta, publish_directory, staging_dir, write_model_files
from filterd.store import models
from filterd.store.models import REFIT_LOG

from trainer.data import Example, write_split
from trainer.report import SplitReport

log = logging.getLogger("filterd.trainer")

REFIT_LOG_KEEP = 200
STALE_STAGING_S = 3600.0  # a staging directory this old belongs to a publish that died


class ModelStore(models.ModelStore):
    """filterd.store.models.ModelStore (versions, `current`, rollback, the refit log read) and publishing."""

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
