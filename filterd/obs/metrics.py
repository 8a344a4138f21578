"""Prometheus metrics for the daemon and the trainer, and the asyncio HTTP endpoint that serves them.

The names, types and labels are the contract of INTERFACES.md ("Metrics"); dashboards and alerts are
written against them, so change them there first. Each `FilterdMetrics` / `TrainerMetrics` owns its
own `CollectorRegistry` (never prometheus_client's global one): two instances in one process, as in
the tests, then never collide, and nothing else is module-level mutable state.

`MetricsServer` serves `/metrics` and `/healthz` on the event loop itself (no thread, no web
framework: filterd/net/http.py's server, as the scan API and the console). It reads at most a few
KiB per request under one deadline, so a slow or hostile client holds a connection for at most
`timeout` seconds.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    write_to_textfile,
)

from filterd.net.http import Request, Response, Server, ServerSettings

log = logging.getLogger(__name__)

# Metrics the daemon and the trainer export beyond INTERFACES.md's Metrics table (which the acceptance
# checks read and this repository cannot edit): name -> type. The README's metrics table documents
# them; tests/e2e/test_dashboard.py lets dashboards use a metric listed here or in the contract, and
# checks that each one listed here is really exported with this type.
UNLISTED_METRICS = {
    "filterd_actions_total": "counter",  # named in INTERFACES.md's milter/HTTP section, not yet in its table
    "filterd_request_seconds": "histogram",
    "filterd_stream_backlog": "gauge",
    "filterd_stream_pending": "gauge",
    "filterd_ingress_up": "gauge",
    "filterd_redis_errors_total": "counter",
    "filterd_reservoir_written_total": "counter",
    "filterd_reservoir_dropped_total": "counter",
    "filterd_trainer_over_ham_fpr_bound": "gauge",
    "filterd_history_written_total": "counter",
    "filterd_history_dropped_total": "counter",
    "filterd_explanations_total": "counter",
    "filterd_explain_seconds": "histogram",
}

VERDICTS = ("spam", "ham", "error")
# filterd_actions_total's `action`: filterd.policy.decision.ACTIONS, plus what a door does with mail it could not classify.
ACTIONS = ("pass", "soft-reject", "tag", "subject", "quarantine", "discard", "reject", "accept-unknown", "tempfail")
RELOAD_OUTCOMES = ("ok", "failed")
REFIT_OUTCOMES = ("promoted", "rejected", "failed")
LABELS = ("ham", "spam")
EVAL_MODELS = ("candidate", "current")

# --- Histogram buckets (Prometheus appends +Inf itself) ---------------------------------------------
# Latencies: 1 ms (one tiny batch on a GPU) up to 10 s (a CPU backlog, or an SMTP client about to
# time out), roughly 1-2.5-5 per decade so that p50/p99 interpolate within a factor of ~2.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A milter or HTTP request, end of message to reply: LATENCY_BUCKETS, then on to Postfix's milter
# timeouts (30 s per command, 300 s for content) and our reply_timeout (60 s), so a p99 near them
# reads as a number instead of the last finite bucket.
REQUEST_BUCKETS = LATENCY_BUCKETS + (20.0, 30.0, 60.0, 120.0, 300.0)
REQUEST_SOURCES = ("milter", "http")  # the doors whose request latency filterd_request_seconds times
# Messages per forward pass: powers of two up to well past the default max_batch_size (64), so the
# histogram shows whether batches fill up or the max_wait_ms timer cuts them short.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Padded tokens per forward pass: powers of two from one short SMS batch (64) to 64 Ki, which covers
# max_batch_tokens (8192 by default) with room for operators who raise it.
BATCH_TOKEN_BUCKETS = tuple(float(2**k) for k in range(6, 17))
# Padding share of a forward pass: 0.05 steps near 0, where length-grouping should keep it, then
# 0.1 steps; a mass above 0.5 means the batcher is wasting most of the compute.
PADDING_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# P(spam): uniform 0.05 steps, so a threshold at any multiple of 0.05 can be read straight off the
# buckets (how many messages would flip if the threshold moved) and score drift shows as a shape.
SPAM_SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(21))
# A refit (rebalance, fit, evaluate) takes seconds for a head-only tiny model to hours for gpt2-xl.
REFIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0)


class StreamMetrics:
    """The Redis consumer's hooks (filterd.net.streams.StreamObserver): backlog, pending, up, errors.

    `filterd_stream_backlog` is the group's lag (entries not yet delivered to any consumer: what the
    queue-depth gauge, bounded by what one process holds, cannot show); `filterd_stream_pending` the
    entries delivered and not yet acknowledged. Both are refreshed every few seconds by the consumer.
    """

    def _init_stream_metrics(self, r: CollectorRegistry) -> None:
        self.stream_backlog = Gauge(
            "filterd_stream_backlog", "Entries of a stream not yet delivered to its consumer group (XINFO GROUPS lag).",
            ["stream", "group"], registry=r,
        )  # fmt: skip
        self.stream_pending = Gauge(
            "filterd_stream_pending", "Entries delivered to the consumer group and not yet acknowledged.",
            ["stream", "group"], registry=r,
        )  # fmt: skip
        self.ingress_up = Gauge(
            "filterd_ingress_up", "1 while an ingress is connected/listening and can deliver results, else 0.",
            ["ingress"], registry=r,
        )  # fmt: skip
        # `error` is a short code from filterd.net.streams.error_code (oom, noperm, connection, ...), never a message.
        self.redis_errors = Counter(
            "filterd_redis_errors_total", "Redis errors, by operation (read|write) and error code.", ["op", "error"], registry=r
        )

    def on_stream_up(self, name: str, up: bool) -> None:
        self.ingress_up.labels(name).set(1 if up else 0)

    def on_stream_stats(self, stream: str, group: str, backlog: int, pending: int) -> None:
        self.stream_backlog.labels(stream, group).set(backlog)
        self.stream_pending.labels(stream, group).set(pending)

    def on_redis_error(self, op: str, error: str) -> None:
        self.redis_errors.labels(op, error).inc()


class FilterdMetrics(StreamMetrics):
    """Every filterd_* metric of INTERFACES.md (not the trainer's) on its own CollectorRegistry, plus process_*."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "filterd_messages_total", "Messages classified, by ingress and verdict.", ["source", "verdict"], registry=r
        )
        self.classify_seconds = Histogram(
            "filterd_classify_seconds",
            "Time from a message's arrival to its verdict.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "filterd_inference_seconds", "Duration of one forward pass.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("filterd_batch_size", "Messages per forward pass.", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "filterd_batch_tokens", "Padded tokens per forward pass.", buckets=BATCH_TOKEN_BUCKETS, registry=r
        )
        self.padding_ratio = Histogram(
            "filterd_padding_ratio", "Padding tokens / all tokens, per forward pass.", buckets=PADDING_RATIO_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("filterd_queue_depth", "Messages waiting for a batch.", registry=r)
        self.spam_score = Histogram(
            "filterd_spam_score", "P(spam) of each classified message.", buckets=SPAM_SCORE_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "filterd_model_info", "The model being served (always 1).", ["version", "base", "device", "dtype"], registry=r
        )
        self.model_reloads = Counter(
            "filterd_model_reloads_total", "Model hot-swap attempts, by outcome.", ["outcome"], registry=r
        )
        self.smtp_replies = Counter(
            "filterd_smtp_replies_total", "SMTP replies sent to clients, by reply code.", ["code"], registry=r
        )
        self.request_seconds = Histogram(
            "filterd_request_seconds", "Milter: end of message to reply; HTTP: request read to reply written.",
            ["source"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.actions = Counter(
            "filterd_actions_total", "What each door did with a message ([policy] decision, or on_error), by door.",
            ["source", "action"], registry=r,
        )  # fmt: skip
        # `reason` must come from a small fixed set (never an exception message): each value is a series.
        self.dead_letters = Counter(
            "filterd_dead_letters_total", "Entries written to the dead-letter stream, by reason.", ["reason"], registry=r
        )
        # The optional reservoir of classified texts ([trainer] reservoir); `reason`: queue-full | write-error.
        self.reservoir_written = Counter(
            "filterd_reservoir_written_total", "Texts handed to the reservoir file (each kept there with probability size/i).", registry=r
        )
        self.reservoir_dropped = Counter(
            "filterd_reservoir_dropped_total", "Texts not handed to the reservoir, by reason.", ["reason"], registry=r
        )
        # The optional verdict history ([history]); `reason`: queue-full | write-error.
        self.history_written = Counter("filterd_history_written_total", "Decisions written to the verdict history.", registry=r)
        self.history_dropped = Counter(
            "filterd_history_dropped_total", "Decisions not written to the verdict history, by reason.", ["reason"], registry=r
        )
        # [explain]: `outcome` explained | busy | queue-full | deadline | error (skips: the message went on without one)
        self.explanations = Counter(
            "filterd_explanations_total", "Verdict explanations asked for, by door and outcome.", ["source", "outcome"], registry=r
        )
        self.explain_seconds = Histogram(
            "filterd_explain_seconds", "Time to explain one message (in the explaining thread).", buckets=LATENCY_BUCKETS, registry=r
        )
        self._model_labels: tuple[str, str, str, str] | None = None
        self._init_stream_metrics(r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds, ...
        PlatformCollector(registry=r)

    def set_model(self, version: str, base: str, device: str, dtype: str) -> None:
        """Point model_info at the model now served: exactly one series at a time, value 1."""
        labels = (version, base, device, dtype)
        if self._model_labels is not None and self._model_labels != labels:
            self.model_info.remove(*self._model_labels)
        self.model_info.labels(*labels).set(1)
        self._model_labels = labels

    def observe_batch(self, *, size: int, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        """One forward pass: `padded_tokens` is size x longest message, `real_tokens` the unpadded sum."""
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        if padded_tokens > 0:  # an empty batch has no ratio; don't invent one
            self.padding_ratio.observe((padded_tokens - real_tokens) / padded_tokens)
        self.inference_seconds.observe(seconds)

    # The batcher's `BatchObserver` hooks, so a FilterdMetrics can be handed to it as is.
    def on_batch(self, size: int, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        self.observe_batch(size=size, padded_tokens=padded_tokens, real_tokens=real_tokens, seconds=seconds)

    def on_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def observe_result(self, *, source: str, verdict: str, score: float | None, seconds: float) -> None:
        """One message done. Errors count and are timed too (a slow failure is still latency), but have no score."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        self.messages.labels(source, verdict).inc()
        self.classify_seconds.labels(source).observe(seconds)
        if verdict != "error" and score is not None and not math.isnan(score):
            self.spam_score.observe(score)

    def observe_request(self, source: str, seconds: float) -> None:
        """One milter or HTTP request answered (or given up on): its latency as the MTA or client sees it."""
        if source not in REQUEST_SOURCES:
            raise ValueError(f"source must be one of {REQUEST_SOURCES}, got {source!r}")
        self.request_seconds.labels(source).observe(seconds)

    def count_action(self, source: str, action: str) -> None:
        """One message acted on by a door (`action` from ACTIONS: a fixed set, each value a series)."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        self.actions.labels(source, action).inc()

    def prime(self, sources: Sequence[str], actions: Mapping[str, Iterable[str]] | None = None) -> None:
        """Create the zero-valued series up front: rate() and absent-series alerts need them from the first scrape.

        `actions`: per source, the actions it can take (its [policy] levels); default every action."""
        for source in sources:
            self.classify_seconds.labels(source)
            for verdict in VERDICTS:
                self.messages.labels(source, verdict)
            for action in (actions or {}).get(source, ACTIONS):
                self.actions.labels(source, action)
            if source in REQUEST_SOURCES:
                self.request_seconds.labels(source)
        for outcome in RELOAD_OUTCOMES:
            self.model_reloads.labels(outcome)
        for source in sources:
            self.ingress_up.labels(source)


class TrainerMetrics(StreamMetrics):
    """The filterd_trainer_* metrics of INTERFACES.md on their own CollectorRegistry, plus the label intake's
    stream metrics (`ingress="intake"`).

    Served by `filterd-trainer serve`, or written with `write_textfile` after a one-shot
    `refit --once` (e.g. from a systemd timer) for node_exporter's textfile collector.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.labels = Counter(
            "filterd_trainer_labels_total", "Labelled messages added to the label store.", ["label"], registry=r
        )
        self.refits = Counter("filterd_trainer_refits_total", "Refit cycles, by outcome.", ["outcome"], registry=r)
        self.last_refit = Gauge(
            "filterd_trainer_last_refit_timestamp_seconds",
            "Unix time the last refit cycle completed (promoted or rejected).",
            registry=r,
        )
        self.eval_accuracy = Gauge(
            "filterd_trainer_eval_accuracy", "Accuracy of the last evaluation.", ["split", "model"], registry=r
        )
        self.eval_ham_fpr = Gauge(
            "filterd_trainer_eval_ham_fpr", "Ham false-positive rate of the last evaluation.", ["split", "model"], registry=r
        )
        self.eval_spam_recall = Gauge(
            "filterd_trainer_eval_spam_recall", "Spam recall of the last evaluation.", ["split", "model"], registry=r
        )
        self.refit_seconds = Histogram(
            "filterd_trainer_refit_seconds", "Duration of one refit cycle.", buckets=REFIT_BUCKETS, registry=r
        )
        self.dataset_size = Gauge(
            "filterd_trainer_dataset_size", "Messages in the training data set, by label.", ["label"], registry=r
        )
        self.over_ham_fpr_bound = Gauge(
            "filterd_trainer_over_ham_fpr_bound",
            "1 when the live model after the last refit has a ham FPR over [trainer] max_ham_fpr on an evaluated set.",
            registry=r,
        )
        self._init_stream_metrics(r)
        # Counters only: a zero-primed accuracy gauge would read as a broken model and fire alerts.
        for outcome in REFIT_OUTCOMES:
            self.refits.labels(outcome)
        for label in LABELS:
            self.labels.labels(label)

    def observe_refit(self, outcome: str, seconds: float, *, now: float | None = None) -> None:
        """A refit cycle ended. Only completed cycles move the timestamp, so 'no refit for 2 intervals' also fires on repeated failures."""
        if outcome not in REFIT_OUTCOMES:
            raise ValueError(f"outcome must be one of {REFIT_OUTCOMES}, got {outcome!r}")
        self.refits.labels(outcome).inc()
        self.refit_seconds.observe(seconds)
        if outcome != "failed":
            self.last_refit.set(time.time() if now is None else now)

    def set_eval(self, split: str, model: str, accuracy: float, ham_fpr: float, spam_recall: float) -> None:
        if model not in EVAL_MODELS:
            raise ValueError(f"model must be one of {EVAL_MODELS}, got {model!r}")
        self.eval_accuracy.labels(split, model).set(accuracy)
        self.eval_ham_fpr.labels(split, model).set(ham_fpr)
        self.eval_spam_recall.labels(split, model).set(spam_recall)

    def set_over_ham_fpr_bound(self, over: bool) -> None:
        self.over_ham_fpr_bound.set(1 if over else 0)

    def set_dataset_size(self, label: str, n: int) -> None:
        self.dataset_size.labels(label).set(n)

    def count_label(self, label: str, n: int = 1) -> None:
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        self.labels.labels(label).inc(n)

    def write_textfile(self, path: str | Path) -> None:
        """Atomically (temp file + rename in the same directory) write the exposition for node_exporter."""
        if not str(path).endswith(".prom"):  # node_exporter silently skips any other file name
            raise ValueError(f"textfile collector files must end in .prom: {path}")
        write_to_textfile(str(path), self.registry)


# --- HTTP endpoint --------------------------------------------------------------------------------

MAX_HEAD_BYTES = 8192  # request line + headers; a scrape sends a few hundred bytes


class MetricsServer(Server):
    """`GET /metrics` (Prometheus text format) and `GET /healthz` on filterd.net.http's server; one request per
    connection, read within `timeout` (also the bound for writing the reply)."""

    def __init__(
        self,
        listen: tuple[str, int],
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, str]],
        *,
        timeout: float = 10.0,
    ) -> None:
        settings = ServerSettings(name="metrics", host=listen[0], port=listen[1], max_body_bytes=MAX_HEAD_BYTES,
                                  read_timeout=timeout, max_head_bytes=MAX_HEAD_BYTES, keep_alive=False,
                                  password_off_loopback=False, listening="endpoint listening on {host}:{port}")  # fmt: skip
        super().__init__(settings, self._route)
        self.registry = registry
        self.health = health
        self.timeout = timeout

    async def _route(self, req: Request) -> Response:
        if req.path not in ("/metrics", "/healthz"):
            return Response(404, b"not found\n")
        if req.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=[("Allow", "GET, HEAD")])
        if req.path == "/healthz":
            return self._healthz()
        try:
            body = generate_latest(self.registry)
        except Exception:  # a failing collector must not kill the endpoint
            log.exception("metrics collection failed")
            return Response(500, b"metrics collection failed\n")
        return Response(200, body, CONTENT_TYPE_LATEST)

    def _healthz(self) -> Response:
        try:
            ok, reason = self.health()
        except Exception as exc:  # a broken health check means unhealthy, not a crashed endpoint
            ok, reason = False, f"health check failed: {exc!r}"
        if ok:
            return Response(200, b"ok\n")
        line = " ".join(str(reason).split()) or "unhealthy"  # one line, whatever the callable returned
        return Response(503, f"{line}\n".encode())
