"""`filterd-trainer serve` and `refit --once`: the label intake, the refit cycle and their metrics.

`serve` runs the intake of `[redis] label_stream` beside the periodic refit (RefitService) and
serves the trainer metrics on `[trainer] metrics_listen`; SIGTERM/SIGINT stop it after the cycle
in progress. Both run under `filterd.net.supervise`: if one dies, the other finishes what it holds and
the process exits 1 with `<task> failed: <reason>`. `refit --once` drains the waiting labels, runs
one cycle and can leave the same metrics in a node_exporter textfile (for a systemd timer instead
of the service).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

from filterd.config import Config
from filterd.errors import ConfigError
from filterd.obs.metrics import MetricsServer, TrainerMetrics
from filterd.net.notify import watchdog
from filterd.net.supervise import supervise

from trainer.intake import IntakeUnavailable, LabelIntake
from trainer.publish import ModelStore
from trainer.refit import RefitOutcome, refit_once
from filterd.store.labels import LabelStore

log = logging.getLogger("filterd.trainer")

# Set only by cycles that finished (promoted or rejected). The textfile of a one-shot run starts from
# a fresh registry, so the "no successful refit" alert needs the last good time carried over from here.
LAST_COMPLETED_KEY = "last_completed_refit_time"


def _remember(store: LabelStore, metrics: TrainerMetrics, result: RefitOutcome) -> None:
    if result.outcome in ("promoted", "rejected"):
        store.meta_set(LAST_COMPLETED_KEY, time.time())
    last = store.meta_get(LAST_COMPLETED_KEY)
    if last is not None:
        metrics.last_refit.set(float(last))


async def _drain(cfg: Config, store: LabelStore, metrics: TrainerMetrics, timeout_s: float) -> int:
    intake = LabelIntake(cfg.redis, cfg.trainer, store, metrics)
    return await intake.drain_once(timeout_s)


def refit_command(cfg: Config, *, textfile: Path | None, base_model: Path | None, drain_timeout_s: float = 30.0) -> RefitOutcome:
    """Take in the waiting labels (if Redis is enabled and reachable), then one refit cycle."""
    metrics = TrainerMetrics()
    with LabelStore(cfg.trainer.store) as store:
        if cfg.redis.enabled:
            try:
                n = asyncio.run(_drain(cfg, store, metrics, drain_timeout_s))
                log.info("intake: %d label entries taken in from %s", n, cfg.redis.label_stream)
            except IntakeUnavailable as e:  # the labels stay in the stream for the next run
                log.warning("intake: %s; refitting on the labels already stored", e)
        result = refit_once(cfg, store, metrics=metrics, base_model_dir=base_model)
        _remember(store, metrics, result)
    if textfile is not None:
        metrics.write_textfile(textfile)
    return result


async def _serve(cfg: Config, base_model: Path | None) -> int:
    from trainer.refit import RefitService

    metrics = TrainerMetrics()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with LabelStore(cfg.trainer.store) as store:
        intake = LabelIntake(cfg.redis, cfg.trainer, store, metrics) if cfg.redis.enabled else None
        last = store.meta_get(LAST_COMPLETED_KEY)
        if last is not None:
            metrics.last_refit.set(float(last))
        service = RefitService(cfg, store, metrics, base_model_dir=base_model,
                               on_outcome=lambda r: _remember(store, metrics, r))  # fmt: skip
        listen = cfg.trainer.metrics_listen

        def health() -> tuple[bool, str]:
            if not (ModelStore(cfg.trainer.models_dir).current() or base_model):
                return False, "no model yet"
            if intake is not None and not intake.up:
                return False, f"label intake is not up: {intake.reader.reason}"
            return True, "ok"

        server = MetricsServer((listen.host, listen.port), metrics.registry, health)
        try:
            await server.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {listen} for trainer metrics: {e.strerror or e}") from None
        log.info("trainer serving: store %s, models %s, metrics on http://%s:%d/metrics",
                 cfg.trainer.store, cfg.trainer.models_dir, listen.host, server.port)  # fmt: skip
        pinger = asyncio.create_task(watchdog(), name="systemd-watchdog")  # WatchdogSec= in the unit
        jobs = {"refit": service.run(stop)}
        if intake is not None:
            jobs["label-intake"] = intake.run(stop)
        try:
            await supervise(jobs, stop)
        finally:
            pinger.cancel()
            await server.stop()
    log.info("trainer stopped")
    return 0


def serve(cfg: Config, base_model: Path | None = None) -> int:
    return asyncio.run(_serve(cfg, base_model))
