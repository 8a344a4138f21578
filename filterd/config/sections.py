"""The sections that are not a door's ([model], [batching], [policy] with its door tables, [explain],
[metrics], [trainer], [history], [console], [logging]; the doors' are in doors.py) and `Config`.

Each TOML section is a frozen dataclass and every key has a default, so `filterd serve` runs with
no file at all. A key's dataclass field carries its `Kind` (how the value is read, checked and
written back) and a one-line description; the loader, the `--set` parser, `Config.to_toml()` and
the configuration reference are all driven by those, so adding a key is one line.
Durations are stored as seconds (float); host:port values as `HostPort(host, port)`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from filterd.config import checks
from filterd.config.doors import HeadersConfig, HttpConfig, MilterConfig, RedisConfig, SmtpConfig
from filterd.config.kinds import (
    Address,
    AddressList,
    NetworkList,
    Bool,
    Choice,
    Duration,
    Int,
    Kind,
    LevelKind,
    Number,
    Password,
    PathKind,
    Section,
    Text,
    Threshold,
    Where,
    _key,
    _section,
    _stream,
    _toml_scalar,
)
from filterd.config.values import HostPort, parse_hostport
from filterd.policy.levels import SOFT_REJECT, level_key
from filterd.policy.lists import REQUIRE

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
TRAINABLE = ("head", "last-block", "last-2-blocks", "all")  # as `filterd-trainer fit --trainable`
LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
GPT2_CONTEXT = 1024  # GPT-2's positions: the longest message a model reads


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the model directory the daemon serves, and where it runs."""

    path: Path = _key(Path("/var/lib/filterd/models/current"), PathKind(), "model directory; swapped in when it changes")
    device: str = _key("auto", Choice(options=DEVICES), "auto | cpu | cuda (auto: cuda when available)")
    dtype: str = _key("auto", Choice(options=DTYPES), "auto | float32 | bfloat16 (auto: bfloat16 on cuda, float32 on cpu)")
    poll_interval: float = _key(2.0, Duration(), "how often the model path is checked for a new model")
    min_reload_interval: float = _key(
        5.0, Duration(positive=False), "reloads at most this often (SIGHUP excepted); an unchanged model is never reloaded"
    )
    threshold: float | None = _key(
        None, Threshold(), 'deprecated, use [policy] tag_score: "model" (the model\'s own) or P(spam) 0..1 at which mail is spam'
    )

    def resolved_dtype(self, device_type: str) -> str:
        """The dtype to load with on a torch device type ("cuda" or "cpu")."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device_type == "cuda" else "float32"


@dataclass(frozen=True)
class BatchingConfig:
    """[batching]: how messages are grouped into forward passes."""

    max_batch_size: int = _key(64, Int(1), "messages per forward pass")
    max_batch_tokens: int = _key(
        8192, Int(GPT2_CONTEXT, why="one message of up to 1024 tokens must fit in a batch"), "padded tokens per forward pass"
    )
    max_wait_ms: float = _key(5.0, Number(0.0), "longest a message waits for a batch to fill (ms)")
    max_queue: int = _key(4096, Int(1), "messages waiting for a batch; when full, ingress stops reading (backpressure)")


def _level(default: str, action: str, inherit: bool = False) -> Any:
    if inherit:
        return _key(
            default, LevelKind(inherit=True), f'the {action} level for this door; "inherit" = [policy] {level_key(action)}'
        )
    docs = {
        "tag": "spam threshold: at or above it mail is spam and tagged (X-Spam-Flag: YES)",
        "subject": "spam at or above it also gets [smtp] subject_prefix in the Subject",
        "quarantine": "spam at or above it is quarantined (SMTP: sent to [smtp] quarantine_rcpt only)",
        "discard": "spam at or above it is dropped while the sender is told it was delivered",
        "reject": "spam at or above it is refused (5xx) by doors before the queue; SMTP takes it only from [policy.smtp]",
        SOFT_REJECT: "from it up to the next level: deferred with 4xx (doors before the queue only)",
    }
    return _key(default, LevelKind(), docs[action])


@dataclass(frozen=True)
class PolicyDoorConfig:
    """[policy.smtp], [policy.milter], [policy.http], [policy.redis]: one door's levels. "inherit" takes the
    [policy] key of the same name; a level the door cannot carry out may only be "inherit" (skipped) or "off"."""

    tag_score: float | str = _level("inherit", "tag", True)
    subject_score: float | str = _level("inherit", "subject", True)
    quarantine_score: float | str = _level("inherit", "quarantine", True)
    discard_score: float | str = _level("inherit", "discard", True)
    reject_score: float | str = _level("inherit", "reject", True)
    soft_reject_score: float | str = _level("inherit", SOFT_REJECT, True)


def _door(source: str) -> Any:
    return _section(PolicyDoorConfig, f"[policy.{source}] levels for the {source} door")


@dataclass(frozen=True)
class PolicyConfig:
    """[policy]: what happens to spam (levels, lists), for every door; see filterd/policy/decision.py."""

    tag_score: float | str = _level("model", "tag")
    subject_score: float | str = _level("off", "subject")
    quarantine_score: float | str = _level("off", "quarantine")
    discard_score: float | str = _level("off", "discard")
    reject_score: float | str = _level("off", "reject")
    soft_reject_score: float | str = _level("off", SOFT_REJECT)
    allow_senders: tuple[str, ...] = _key((), AddressList(), "envelope senders (address or domain) never scored: ham")
    allow_recipients: tuple[str, ...] = _key((), AddressList(), "mail whose every recipient is listed is never scored: ham")
    deny_senders: tuple[str, ...] = _key((), AddressList(), "envelope senders never scored: spam, at the door's top level")
    deny_recipients: tuple[str, ...] = _key((), AddressList(), "mail to any listed recipient (spam traps) is spam, not scored")
    allow_senders_require: str = _key(
        "none",
        Choice(options=REQUIRE),
        'who may claim an allow_senders entry: "authenticated" (SASL login), "trusted_networks" (client address in '
        'trusted_networks), "authenticated_or_trusted_networks", or "none" (any client, forgeable: check-config warns)',
    )
    trusted_networks: tuple[str, ...] = _key((), NetworkList(), "client networks (CIDR) for allow_senders_require; empty: none")
    smtp: PolicyDoorConfig = _door("smtp")
    milter: PolicyDoorConfig = _door("milter")
    http: PolicyDoorConfig = _door("http")
    redis: PolicyDoorConfig = _door("redis")


EXPLAIN_METHODS = (
    "integrated-gradients",
    "gradient",
    "screened-occlusion",
    "occlusion",
)  # filterd/model/explain.py; the first is the default


@dataclass(frozen=True)
class ExplainConfig:
    """[explain]: per-verdict explanations (the words that moved P(spam)), computed beside the batcher."""

    enabled: str = _key("off", Choice(options=("off", "spam", "all")), "which verdicts get an explanation: off | spam | all")
    method: str = _key(EXPLAIN_METHODS[0], Choice(options=EXPLAIN_METHODS), "how word contributions are computed (see README)")
    top_words: int = _key(5, Int(1, 50), "words of each sign (raising, lowering P(spam)) reported")
    header: bool = _key(False, Bool(), "add an X-Spam-Report header with the top words (SMTP, milter)")
    max_header_bytes: int = _key(256, Int(64, 900), "X-Spam-Report's value is cut to this many bytes (whole words)")
    max_queue: int = _key(16, Int(1), "messages waiting for an explanation; beyond, a message goes without (counted)")
    deadline: float = _key(2.0, Duration(), "longest a message waits for its explanation; then it goes on without one (counted)")
    nice: int = _key(10, Int(0, 19), "niceness of the explaining thread and its torch threads, so scoring keeps the CPU first")


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: Prometheus /metrics and /healthz of the daemon."""

    listen: HostPort = _key(parse_hostport("127.0.0.1:9464"), Address(), "/metrics and /healthz")


@dataclass(frozen=True)
class TrainerConfig:
    """[trainer]: the label store and the periodic refit service (filterd-trainer)."""

    store: Path = _key(Path("/var/lib/filterd/labels.sqlite"), PathKind(), "label store (SQLite)")
    models_dir: Path = _key(
        Path("/var/lib/filterd/models"), PathKind(), "versioned model directories; current points at the live one"
    )
    interval: float = _key(3600.0, Duration(), "time between refit attempts")
    metrics_listen: HostPort = _key(parse_hostport("127.0.0.1:9465"), Address(), "the trainer's /metrics")
    min_new_labels: int = _key(100, Int(0), "new labels needed since the last refit before refitting")
    mode: str = _key(
        "auto", Choice(options=("auto", *TRAINABLE)),
        "what a refit trains: auto (all up to 30M parameters, else head) | head | last-block | last-2-blocks | all",
    )  # fmt: skip
    max_regression: float = _key(0.01, Number(0.0, 1.0), "a candidate may lose at most this much accuracy vs the current model")
    max_ham_fpr: float = _key(
        0.02,
        Number(0.0, 1.0),
        "ham false-positive rate bound: gates a first model; over it a better candidate still wins and an alert is raised",
    )
    balance: str = _key(
        "weight",
        Choice(options=("weight", "oversample", "undersample")),
        "refit class balance: weight | oversample | undersample (drops labels)",
    )
    min_per_class: int = _key(20, Int(1), "labels of each class needed before any refit")
    keep: int = _key(5, Int(1), "model versions kept in models_dir (the live one always stays)")
    golden_set: Path | None = _key(
        None, PathKind(optional=True), 'CSV (id,label,text) every candidate must pass; "" = the live model\'s golden.csv'
    )
    golden_tolerance: float = _key(
        0.01,
        Number(0.0, 1.0),
        "on the golden set a candidate may lose at most this much accuracy, or gain this much ham FPR, vs the current model",
    )
    replay: int = _key(
        1000, Int(0), "refit: at most this many messages per class of the live model's replay.csv mixed into training (0 = off)"
    )
    final_fit: str = _key(
        "all",
        Choice(options=("all", "fold")),
        "after promotion: all = retrain on every label (+ replay) and publish that; fold = publish the gated candidate",
    )
    epochs: int = _key(2, Int(1), "top modes (last-block, last-2-blocks, all): training epochs per refit")
    lr: float = _key(5e-5, Number(1e-9, 1.0), "top modes: AdamW learning rate")
    max_cycle_seconds: float = _key(
        0.0,
        Duration(positive=False),
        "top modes: training stops at this much time per cycle, keeping the best state so far (0 = no limit)",
    )
    group: str = _key("filterd-trainer", _stream("a consumer group name"), "consumer group on label_stream")
    reservoir: Path | None = _key(
        None, PathKind(optional=True), 'keep a sample of classified texts here (SQLite, 0600) for pretrain --reservoir; "" = off'
    )
    reservoir_size: int = _key(
        20000, Int(1), "texts the reservoir keeps at most (a uniform sample of the last reservoir_max_age)"
    )
    reservoir_max_age: float = _key(30 * 86400.0, Duration(), "reservoir texts older than this are deleted")


@dataclass(frozen=True)
class HistoryConfig:
    """[history]: the verdict history the web console shows (filterd/store/history.py)."""

    enabled: bool = _key(False, Bool(), "record every decision (time, door, ids, envelope, Subject, score, action, model)")
    path: Path = _key(Path("/var/lib/filterd/history.sqlite"), PathKind(), "the history file (SQLite, created 0600)")
    max_rows: int = _key(100000, Int(1), "decisions kept at most (the oldest are deleted)")
    max_age_days: float = _key(30.0, Number(0.001), "decisions older than this many days are deleted")
    store_text: bool = _key(
        False, Bool(), "also keep the text the model read (the console then highlights it and can learn from it)"
    )


@dataclass(frozen=True)
class ConsoleConfig:
    """[console]: the web console for operators (filterd/console/)."""

    enabled: bool = _key(False, Bool(), "serve the web console (history, explanations, learn, models, rollback)")
    listen: HostPort = _key(
        parse_hostport("127.0.0.1:11334"), Address(), "host:port of the console; off loopback it needs a password"
    )
    password: str = _key("", Password(), "HTTP Basic password (any user name) on every request when set; mandatory off loopback")
    grafana_url: str = _key(
        "",
        Text("an http(s) URL", pattern=r"https?://[^\s\"'<>]+"),
        'link to the Grafana dashboard shown in the console, "" = none',
    )


@dataclass(frozen=True)
class LoggingConfig:
    """[logging]: the log lines filterd and filterd-trainer write to stderr (filterd/obs/logs.py)."""

    level: str = _key("info", Choice(options=LEVELS), "debug | info | warning | error")
    format: str = _key("text", Choice(options=LOG_FORMATS), "text | json (one object per line: time, level, logger, message)")


@dataclass(frozen=True)
class Config:
    """The whole configuration: one attribute per TOML section."""

    model: ModelConfig = _section(ModelConfig, "[model]")
    batching: BatchingConfig = _section(BatchingConfig, "[batching]")
    redis: RedisConfig = _section(RedisConfig, "[redis]")
    smtp: SmtpConfig = _section(SmtpConfig, "[smtp]")
    policy: PolicyConfig = _section(PolicyConfig, "[policy]")
    headers: HeadersConfig = _section(HeadersConfig, "[headers]")
    milter: MilterConfig = _section(MilterConfig, "[milter]")
    http: HttpConfig = _section(HttpConfig, "[http]")
    explain: ExplainConfig = _section(ExplainConfig, "[explain]")
    metrics: MetricsConfig = _section(MetricsConfig, "[metrics]")
    trainer: TrainerConfig = _section(TrainerConfig, "[trainer]")
    history: HistoryConfig = _section(HistoryConfig, "[history]")
    console: ConsoleConfig = _section(ConsoleConfig, "[console]")
    logging: LoggingConfig = _section(LoggingConfig, "[logging]")

    def warnings(self) -> list[str]:
        """Risky but valid settings (non-loopback listeners, plaintext remote Redis...), one line each."""
        return checks.warnings(self)

    def deprecations(self) -> list[str]:
        """One line per deprecated key set in the file or a --set (it still works, mapped onto [policy])."""
        return checks.deprecations(self)

    def to_toml(self, *, redact: bool = True) -> str:
        """The effective configuration as TOML (loads back to an equal Config unless a password was redacted)."""
        lines = ["# filterd effective configuration"]
        for f in fields(self):
            lines.append("")
            _dump_table(getattr(self, f.name), (f.name,), redact, lines)
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Writing TOML


def _dump_table(obj: Any, where: Where, redact: bool, lines: list[str]) -> None:
    lines.append(f"[{'.'.join(where)}]")
    tables = []
    for f in fields(obj):
        kind: Kind = f.metadata["kind"]
        value = getattr(obj, f.name)
        if isinstance(kind, Section):
            tables.append((value, where + (f.name,)))  # TOML: sub-tables after the section's own keys
            continue
        shown = kind.dump(value)
        if redact and kind.secret:
            shown = kind.redact(shown)
        lines.append(f"{f.name} = {_toml_scalar(shown)}  # {f.metadata['doc']}")
    for value, sub in tables:
        lines.append("")
        _dump_table(value, sub, redact, lines)
