"""`filterd serve`: the model, the batcher, the ingresses and the metrics endpoint in one event loop.

Start: bind the SMTP, milter and HTTP ports and the metrics server (a port in use fails at once),
load the model (a failure is a one-line exit), warm it up, start the batcher and the Redis
ingress, then READY=1 to systemd (milter messages and HTTP requests that came early wait for it). SIGHUP (or a message on the model
channel, or the model path changing) reloads the model in the background. SIGTERM/SIGINT: stop
reading, finish and acknowledge what is in flight, drain the batcher, STOPPING=1, exit 0.

The ingresses, the model channel and the model watcher run under `supervise`: if one dies (a Redis
error that retrying cannot fix, a bug), the log says `<task> failed: <reason>`, the others finish
what they hold, and the process exits 1 for systemd to restart it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import time
from typing import Any

from filterd.config import format_duration
from filterd.doors.extraction import Extractor
from filterd.doors.path import MessagePath
from filterd.errors import ConfigError
from filterd.model.batcher import Batcher, Scored
from filterd.model.engine import Engine
from filterd.model.explainer import Explainer
from filterd.policy.decision import Policy
from filterd.store.history import HistoryWriter, open_history
from filterd.doors.http import HttpDoor, HttpServer
from filterd.doors.milter import MilterDoor, MilterServer
from filterd.doors.redis import RedisIngress
from filterd.doors.smtp import SmtpIngress
from filterd.obs.metrics import FilterdMetrics, MetricsServer
from filterd.net.notify import sd_notify, watchdog
from filterd.model.reload import ModelHolder
from filterd.store.reservoir import ReservoirWriter, open_reservoir
from filterd.net.streams import BACKOFF_MAX_S, BACKOFF_MIN_S, StreamError, error_kind, one_line, sleep_or_stop
from filterd.net.supervise import TaskFailed, supervise

log = logging.getLogger("filterd")


def warm_up(engine: Engine) -> float:
    """One short and one long forward pass, so the first real message does not pay for lazy init."""
    t0 = time.perf_counter()
    engine.tokenizer.encode("warm up the tokenizer")  # tiktoken loads its tables on first use
    engine.score_tokens([[50256] * 8, [50256] * 4])
    engine.score_tokens([[50256] * min(engine.meta.max_length, 256)])
    engine.measure_overhead()  # here, in the loading thread, rather than on the event loop at the first batch
    return time.perf_counter() - t0


class Daemon:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.metrics = FilterdMetrics()
        self.stop = asyncio.Event()
        self.policy = Policy.from_config(cfg)  # one decision for every door ([policy], legacy keys mapped)
        self.holder = ModelHolder(cfg.model.path, self._load, self.metrics, min_interval_s=cfg.model.min_reload_interval)
        self.batcher: Batcher | None = None
        self.redis: RedisIngress | None = None
        self.smtp: SmtpIngress | None = None
        self.milter: MilterServer | None = None
        self.milter_door: MilterDoor | None = None
        self.http: HttpServer | None = None
        self._serving = asyncio.Event()  # set once the batcher runs: every door's scorer waits for it
        self.server: MetricsServer | None = None
        self.reservoir: ReservoirWriter | None = None  # [trainer] reservoir: off unless set
        self.history: HistoryWriter | None = None  # [history]: off unless enabled
        self.console: Any = None  # [console]: off unless enabled
        self._jobs: dict[str, Any] = {}  # name -> coroutine, run under supervise()
        self.explanations = Explainer(cfg.explain, self.holder.current, self.metrics, backlog=self._backlog,
                                      max_backlog=cfg.batching.max_batch_size)  # [explain]: off unless enabled
        # The one message path every door uses (lists, scan budget, extraction, score, decision, explanation, records).
        self.path = MessagePath(self.policy, self._score, metrics=self.metrics, explainer=self.explanations, extractor=Extractor(),
                                scan_bytes={"smtp": cfg.smtp.max_scan_bytes, "http": cfg.smtp.max_scan_bytes,
                                            "milter": cfg.milter.max_message_bytes})  # fmt: skip

    def _load(self, path: Any) -> Engine:
        engine = Engine.load(path, device=self.cfg.model.device, dtype=self.cfg.model.dtype)
        self.policy.check_model(engine.operating_points, engine.version)  # "fpr:" levels need the model's points
        warm_up(engine)  # [model] threshold (deprecated) is [policy] tag_score now: engines keep their own
        return engine

    async def _score(self, text: str, wait_when_full: bool = False) -> Scored:
        """Tokenize with the live model's tokenizer, then wait for a batch. Until the batcher runs (milter and HTTP
        bind before the model loads) a call waits for it. A full queue raises QueueFull at once unless
        `wait_when_full` (Redis, which simply stops reading)."""
        await self._serving.wait()
        assert self.batcher is not None
        tokens = self.holder.current().tokenizer.encode(text)
        return await (self.batcher.submit(tokens) if wait_when_full else self.batcher.submit_nowait(tokens))

    def _backlog(self) -> int:
        return self.batcher.depth if self.batcher is not None else 0

    def health(self) -> tuple[bool, str]:
        if not self.holder.loaded:
            return False, "no model loaded"
        if self.redis is not None and not self.redis.up:
            return False, f"redis ingress is not up: {self.redis.reason}"
        if self.smtp is not None and not self.smtp.up:
            return False, "smtp ingress is not listening"
        if self.http is not None and not self.http.up:
            return False, "http ingress is not listening"
        return True, "ok"

    async def run(self) -> int:
        cfg = self.cfg
        # Modules live as long as the process: frozen out of the collector's way, a full collection
        # no longer holds the GIL, and so the event loop, for ~150 ms (bench/smtp_stalls.py).
        # torch._dynamo (+ sympy, ~120k objects) is imported by the model's weight init anyway: import
        # it first so it is frozen too. The model is not frozen (it has cycles; a reload must free it).
        import torch._dynamo  # noqa: F401

        gc.freeze()
        self._warming = self.path.extractor.warm()  # every door's large mail: parsers ready before the first one
        # Ports first: a port in use fails in a second, not after a model load.
        if cfg.smtp.enabled:
            self.smtp = SmtpIngress(cfg.smtp, self.path, self.metrics, headers=cfg.headers)
            try:
                await self.smtp.start(serving=False)
            except OSError as e:
                raise ConfigError(f"cannot listen on {cfg.smtp.listen} for SMTP: {_why(e)}") from None
        if cfg.milter.enabled:
            self.milter_door = MilterDoor(cfg.milter, self.path, cfg.smtp.subject_prefix, self.metrics, headers=cfg.headers)
            self.milter = MilterServer(cfg.milter, self.milter_door.on_message)
            try:
                await self.milter.start()
            except OSError as e:
                raise ConfigError(str(e.strerror or e)) from None
        if cfg.http.enabled:
            door = HttpDoor(cfg.http, self.path, self.policy, cfg.smtp.subject_prefix, self.metrics)
            self.http = HttpServer(cfg.http, door)
            try:
                await self.http.start()  # requests wait for the model (scorer)
            except OSError as e:
                raise ConfigError(f"cannot listen on {cfg.http.listen} for HTTP: {_why(e)}") from None
        listen = cfg.metrics.listen
        self.server = MetricsServer((listen.host, listen.port), self.metrics.registry, self.health)
        try:
            await self.server.start()  # /healthz answers 503 until the model is loaded
        except OSError as e:
            raise ConfigError(f"cannot listen on {listen} for metrics: {_why(e)}") from None
        t = cfg.trainer
        if t.reservoir is not None:  # before the model load, as the ports: an unusable file fails in a second
            reservoir = await asyncio.to_thread(open_reservoir, t.reservoir, t.reservoir_size, t.reservoir_max_age)
            self.reservoir = self.path.reservoir = ReservoirWriter(reservoir, self.metrics)
            log.info("reservoir: keeping up to %d classified texts for %s in %s", t.reservoir_size,
                     format_duration(t.reservoir_max_age), t.reservoir)  # fmt: skip
        if cfg.console.enabled:
            from filterd.console import Console  # only when enabled

            self.console = Console(cfg, lambda: self.holder.current().version if self.holder.loaded else "",
                                   self._score, lambda text: self.explanations.on_demand("console", text))  # fmt: skip
            try:
                await self.console.start()
            except OSError as e:
                raise ConfigError(f"cannot listen on {cfg.console.listen} for the console: {_why(e)}") from None
        if cfg.history.enabled:  # before the model load, as the ports: an unusable file fails in a second
            history = await asyncio.to_thread(open_history, cfg.history)
            self.history = self.path.history = HistoryWriter(history, self.metrics, store_text=cfg.history.store_text)
            log.info("history: recording decisions in %s (%d rows, %g days%s)", cfg.history.path, cfg.history.max_rows,
                     cfg.history.max_age_days, ", with texts" if cfg.history.store_text else "")  # fmt: skip
        t0 = time.perf_counter()
        engine = await asyncio.to_thread(self.holder.load_initial)
        log.info(
            "model %s (%s) loaded on %s/%s in %.1fs",
            engine.version, engine.meta.base, engine.device.type, engine.dtype, time.perf_counter() - t0,
        )  # fmt: skip
        b = cfg.batching
        self.batcher = Batcher(
            self.holder.current, max_batch_size=b.max_batch_size, max_batch_tokens=b.max_batch_tokens,
            max_wait_ms=b.max_wait_ms, max_queue=b.max_queue, observer=self.metrics,
        )  # fmt: skip
        await self.batcher.start()
        self._serving.set()
        sources = []
        if self.smtp is not None:
            self._jobs["smtp-ingress"] = self.smtp.run(self.stop)
            smtp = self.smtp
            self.metrics.ingress_up.labels("smtp").set_function(lambda: 1.0 if smtp.up else 0.0)
            sources.append("smtp")
        if cfg.redis.enabled:
            self.redis = RedisIngress(cfg.redis, cfg.redis.consumer_name(), self.path, self.metrics)
            self._jobs["redis-ingress"] = self.redis.run(self.stop)
            self._jobs["model-channel"] = self._model_channel()
            sources.append("redis")
        if self.milter is not None:
            self._jobs["milter-ingress"] = self._milter_job()
            self.metrics.ingress_up.labels("milter").set(1)
            sources.append("milter")
        if self.http is not None:
            self._jobs["http-ingress"] = self._http_job()
            http = self.http
            self.metrics.ingress_up.labels("http").set_function(lambda: 1.0 if http.up else 0.0)
            sources.append("http")
        on_error = {"smtp": ("accept-unknown" if cfg.smtp.on_error == "accept" else "tempfail",), "redis": (), "http": (),
                    "milter": ("accept-unknown" if cfg.milter.on_error == "accept" else "tempfail",)}  # fmt: skip
        self.metrics.prime(sources, {s: sorted(self.policy.actions(s)) + list(on_error[s]) for s in sources})
        self.explanations.prime(sources)
        if self.explanations.enabled:
            e = cfg.explain
            log.info("explain: %s verdicts, %s, top %d words, header %s, queue %d, deadline %s", e.enabled, e.method,
                     e.top_words, "on" if e.header else "off", e.max_queue, format_duration(e.deadline))  # fmt: skip
        self._jobs["model-watch"] = self.holder.watch(self.stop, cfg.model.poll_interval)
        if self.reservoir is not None:
            self._jobs["reservoir"] = self.reservoir.run(self.stop)
        if self.history is not None:
            self._jobs["history"] = self.history.run(self.stop)
        if self.console is not None:
            self._jobs["console"] = self._console_job()
        supervisor = asyncio.create_task(supervise(self._jobs, self.stop), name="supervisor")
        self._install_signals()
        self._watchdog = asyncio.create_task(watchdog(), name="systemd-watchdog")  # ends with the loop
        sd_notify("READY=1\nSTATUS=serving")
        log.info("serving: ingress %s, metrics on http://%s:%d/metrics", ",".join(sources) or "none", listen.host, self.server.port)

        await self.stop.wait()
        sd_notify("STOPPING=1")
        log.info("stopping: finishing in-flight messages")
        failed: TaskFailed | None = None
        try:
            await supervisor  # ingresses finish and acknowledge
        except TaskFailed as e:
            failed = e
        await self.batcher.stop(drain=True)
        self.explanations.close()
        self.path.extractor.close()
        if self.reservoir is not None:
            await self.reservoir.close()  # the texts of the last verdicts too
        if self.history is not None:
            await self.history.close()  # the last verdicts too
        await self.server.stop()
        if failed is not None:
            raise failed  # one line, exit 1: systemd restarts the process
        log.info("stopped")
        return 0

    async def _milter_job(self) -> None:
        """Until stop: then let the messages being decided get their replies (bounded), and close."""
        assert self.milter is not None and self.milter_door is not None
        await self.stop.wait()
        try:
            await asyncio.wait_for(self.milter_door.drained(), timeout=self.cfg.milter.reply_timeout)
        except TimeoutError:
            log.warning("milter: %d messages still undecided at shutdown; the MTA applies its default_action", self.milter_door.in_flight)
        await self.milter.stop()

    async def _console_job(self) -> None:
        """Until stop: then close the console (a page being rendered gets a moment to finish)."""
        await self.stop.wait()
        await self.console.stop(drain_timeout=2.0)

    async def _http_job(self) -> None:
        """Until stop: then answer the requests being decided (bounded by reply_timeout), and close."""
        assert self.http is not None
        await self.stop.wait()
        await self.http.stop(drain_timeout=self.cfg.http.reply_timeout)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.holder.reload("SIGHUP", force=True)))

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        log.info("%s received", sig.name)
        self.stop.set()

    async def _model_channel(self) -> None:
        """Reload when the trainer announces a new model on the pub/sub channel.

        Redis away: reconnect with backoff (one log line per outage; a reload may have been missed, so
        the model watcher's poll still catches a new model). Wrong password, no permission: StreamError.
        """
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        channel = self.cfg.redis.model_channel
        backoff, lost = BACKOFF_MIN_S, False
        while not self.stop.is_set():
            client = aioredis.from_url(self.cfg.redis.url, socket_connect_timeout=5.0)
            try:
                async with client.pubsub() as ps:
                    await ps.subscribe(channel)
                    if lost:
                        log.info("model channel: subscribed to %s again", channel)
                    backoff, lost = BACKOFF_MIN_S, False
                    while not self.stop.is_set():
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.5)
                        if msg is not None:
                            await self.holder.reload(f"announced on {channel}")
            except (RedisError, OSError) as e:  # what reload() raises is its own business, and a bug: supervised
                if error_kind(e, "read") != "transient":
                    raise StreamError(f"model channel {channel}: {one_line(e)}") from None
                if not lost:
                    log.warning("model channel: %s; resubscribing", one_line(e))
                    lost = True
                await sleep_or_stop(self.stop, backoff * (1 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                await client.aclose()


def _why(e: OSError) -> str:
    return os.strerror(e.errno).lower() if e.errno else str(e)


def serve(cfg: Any) -> int:
    """Run the daemon until SIGTERM; startup failures raise FilterdError (one line, exit 1)."""
    return asyncio.run(Daemon(cfg).run())
