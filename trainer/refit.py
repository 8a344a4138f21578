"""The refit cycle: labels in the store -> a candidate model -> gate against the live one -> publish or not.

One cycle (`refit_once`): read every labelled message, split each by a hash of its id (so a message
never moves between train and test as the store grows, and, with `final_fit = "fold"`, the test split
never holds a message some earlier refit trained on), rebalance the classes (`[trainer] balance`: class weights by default, or
oversampling; undersampling, the chapter's method, discards majority labels), train a candidate from
the live model, and score candidate and live model on the same test split and the golden set at the
live model's threshold. The golden set is `[trainer] golden_set`, else the live model's own
`golden.csv` (a sample of its fit's test split, carried into every promoted version): the labellers
cannot touch it, so a candidate trained on mislabelled data is stopped by it.

The gate promotes a candidate that is no worse than the live model on every evaluated set (accuracy
within `max_regression`, ham FPR within `max_ham_fpr` or not above the live model's). Over the
absolute `max_ham_fpr`, a better candidate is still promoted and the bound becomes an alert (a
warning and `filterd_trainer_over_ham_fpr_bound`); only a first model (no live one) must pass it.

Replay: the live model's `replay.csv` (a sample of its fit's train split, carried into every
promoted version like golden.csv) is mixed into the train split, up to `[trainer] replay` messages
per class, so a refit adapts to the site without forgetting the original data. Replay messages that
are in the store or the golden set are dropped, and replay never reaches the test fold or the golden set.

Final fit: the gate needs a fold the candidate has not seen (the hash "test" fold). With
`[trainer] final_fit = "all"` (the default), once the gate promotes, the same recipe (mode, seed,
hyper-parameters; in top modes the number of epochs the gated candidate kept) is run again on
every label in the store but the golden set, plus replay, and that model is published, with the
gated candidate's metrics (meta extra `final_fit: "all labels"`). No label is kept out of
training for good. The final model must still pass the golden-set part of the gate against the
live model (the golden set is never trained on); if it does not, the gated candidate is published.
A final fit records the last label change it saw (`test_seen_through`): the next cycle moves
the test-fold messages up to it into train (the live model learnt them, so judging on them would
favour it) and gates on the test-fold messages labelled since, which neither model has seen; the
golden set is unseen throughout. "fold" publishes the gated candidate itself.

Mode "auto" (the default, `resolve_mode`) is "all" for small models and "head" for GPT-2-sized ones.
Mode "head" trains only the head, on cached backbone features (trainer.features):
seconds, even on a CPU. "last-block" (and the heavier "last-2-blocks", "all") fine-tunes the top of
the model on the texts through trainer.loop, fit's loop (`[trainer] epochs`, `lr`); there a final fit
doubles the training time. `[trainer] max_cycle_seconds` bounds a top-mode cycle's training: at the
budget the current step finishes and the best state so far is kept; a final fit cut short by it is
dropped and the gated candidate published instead (both logged).

A cycle never raises: a failure is an outcome (`failed`, with a one-line reason), so the
service's loop keeps running. `RefitService` runs cycles every `interval`, or sooner once
`min_new_labels` labels arrived, next to the Redis label intake.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from filterd.config import Config
from filterd.model.engine import pick_device
from filterd.errors import FilterdError
from filterd.obs.metrics import TrainerMetrics
from filterd.model.gpt2 import LABELS, GPT2Classifier
from filterd.model.tokenizer import Tokenizer
from filterd.model.weights import ModelMeta, load_model_dir
from filterd.policy.decision import Policy

from trainer.data import Example
from trainer.evaluate import Metrics, compute_metrics
from trainer.report import SplitReport, format_metrics_line
from trainer.features import FeatureCache, features_for, fit_head, spam_probabilities
from trainer.fit import GOLDEN_FILE, REPLAY_FILE
from trainer.loop import Encoded, LoopResult, LoopSettings, score, train
from trainer.operating import OperatingPoint, operating_points
from trainer.gate import gate, over_bound
from trainer.publish import ModelStore
from trainer.refit_data import RefitData, label_counts, load_data, rebalance
from filterd.store.labels import LabelStore

log = logging.getLogger("filterd.trainer")

Scores = dict[str, list[float]]  # split -> P(spam) per message

OUTCOMES = ("promoted", "rejected", "skipped", "failed")
FEATURES_FILE = "features.sqlite"  # in models_dir, beside versions/ and current
LAST_SEQ_KEY, LAST_TIME_KEY = "last_refit_seq", "last_refit_time"


@dataclass
class RefitOutcome:
    outcome: str  # promoted | rejected | skipped | failed
    reason: str
    mode: str
    version: str | None = None  # the new version, when promoted
    current_version: str | None = None  # the model the candidate was trained from and compared with
    candidate: dict[str, Metrics] = field(default_factory=dict)  # "test", "golden" (and "train", "val")
    current: dict[str, Metrics] = field(default_factory=dict)  # "test", "golden"
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # "store", "trained", "train", "val", "test", "golden"
    seconds: float = 0.0
    golden_source: str = ""  # where the golden set came from: the golden_set path, "<live model>/golden.csv", or ""
    over_ham_fpr_bound: list[str] = field(default_factory=list)  # sets where the model live after the cycle is over max_ham_fpr
    final_fit: str = ""  # what was published: "all labels", "fold" (the gated candidate), "fold (<why the final fit was not>)"
    final_golden: Metrics | None = None  # the final fit's golden-set metrics (it must pass the golden gate too)
    train_seconds: dict[str, float] = field(default_factory=dict)  # "candidate", "final_fit"

    @property
    def trained_share(self) -> float:
        """Stored labels the published model (else the candidate) trained on / labels stored (distinct messages).

        The golden set is never trained on; the test fold only by a final fit; replay messages are not counted."""
        stored = sum(self.counts.get("store", {}).values())
        return sum(self.counts.get("trained", {}).values()) / stored if stored else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidate"] = {k: m.to_dict() for k, m in self.candidate.items()}
        d["current"] = {k: m.to_dict() for k, m in self.current.items()}
        d["trained_share"] = self.trained_share
        d["final_golden"] = self.final_golden.to_dict() if self.final_golden else None
        return d


def _refit_head(
    model: GPT2Classifier, meta: ModelMeta, data: RefitData, cfg: Config, device: torch.device, seed: int
) -> tuple[GPT2Classifier, Scores, Scores]:
    """A new head on cached features; candidate and current scored from the same features."""
    names = list(data.splits)
    rows = [e for name in names for e in data.splits[name]]
    with FeatureCache(cfg.trainer.models_dir / FEATURES_FILE) as cache:  # one pass: one length-batched forward
        all_x = features_for(model, rows, cache, device, cfg.batching.max_batch_tokens, max_length=meta.max_length)
        cache.prune(cfg.trainer.keep)
    ends = np.cumsum([len(data.splits[name]) for name in names])
    X = dict(zip(names, np.split(all_x, ends[:-1])))
    weight, bias = fit_head(X["train"], data.labels("train"), (model.head.weight, model.head.bias), seed=seed,
                            class_weight=data.class_weight)  # fmt: skip
    cand = {name: spam_probabilities(x, weight, bias) for name, x in X.items()}
    cur = {name: spam_probabilities(X[name], model.head.weight, model.head.bias) for name in ("test", "golden") if name in X}
    with torch.no_grad():  # the loaded copy becomes the candidate: no second copy of the backbone in memory
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    return model, cand, cur


def _final_head(model: GPT2Classifier, meta: ModelMeta, rows: list[Example], golden: list[Example],
                class_weight: tuple[float, float] | None, init: tuple[torch.Tensor, torch.Tensor], cfg: Config,
                device: torch.device, seed: int) -> tuple[GPT2Classifier, list[float]]:  # fmt: skip
    """The head fitted again, as the candidate's was (from the live head), on `rows`; its golden-set scores.

    Every feature is cached by now."""
    with FeatureCache(cfg.trainer.models_dir / FEATURES_FILE) as cache:
        x = features_for(model, rows + golden, cache, device, cfg.batching.max_batch_tokens, max_length=meta.max_length)
    weight, bias = fit_head(x[: len(rows)], [LABELS.index(e.label) for e in rows], init, seed=seed, class_weight=class_weight)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    return model, spam_probabilities(x[len(rows) :], weight, bias) if golden else []


def _train_top(model: GPT2Classifier, mode: str, train_data: Encoded, val: Encoded, device: torch.device, seed: int,
               epochs: int = 2, lr: float = 5e-5, deadline: float | None = None) -> tuple[GPT2Classifier, LoopResult]:  # fmt: skip
    """Fine-tune the top of a float32 copy of `model` with trainer.loop (fit's loop); `model` itself is not changed.

    No val messages (a final fit): the last epoch is kept. `deadline` (time.perf_counter()): training stops after
    the step that reaches it; the epoch so far is evaluated and the best state so far kept.
    """
    candidate = copy.deepcopy(model).to(device=device, dtype=torch.float32)
    settings = LoopSettings(trainable=mode, epochs=epochs, lr=lr, seed=seed, deadline=deadline,
                            log=lambda line: log.info("%s", line), log_prefix="refit: ")  # fmt: skip
    run = train(candidate, train_data, val, device, settings)
    if run.stopped:
        log.warning("refit: time budget (max_cycle_seconds) reached after %d steps in epoch %d/%d: keeping epoch %d's state",
                    run.steps, run.epochs_run, epochs, run.best_epoch)  # fmt: skip
    return candidate, run


def _refit_top(
    model: GPT2Classifier, meta: ModelMeta, data: RefitData, cfg: Config, device: torch.device, seed: int, deadline: float | None
) -> tuple[GPT2Classifier, Scores, Scores, dict, LoopResult]:
    """last-block / last-2-blocks / all: fine-tune on the texts; both models scored with forward passes."""
    tc = cfg.trainer
    tokenizer = Tokenizer(meta.max_length)
    enc = {name: Encoded(tokenizer.encode_batch([e.text for e in ex]), data.labels(name)) for name, ex in data.splits.items()}
    candidate, run = _train_top(model, tc.mode, enc["train"], enc["val"], device, seed, epochs=tc.epochs, lr=tc.lr,
                                         deadline=deadline)  # fmt: skip
    tokens = cfg.batching.max_batch_tokens
    cand = {name: score(candidate, e.tokens, device, tokens) for name, e in enc.items()}
    cur = {name: score(model, enc[name].tokens, device, tokens) for name in ("test", "golden") if name in enc}
    return candidate.cpu(), cand, cur, run.history, run


def _final_fit(model: GPT2Classifier, candidate: GPT2Classifier, meta: ModelMeta, data: RefitData, cfg: Config,
               device: torch.device, seed: int, init: tuple[torch.Tensor, torch.Tensor], run: LoopResult | None,
               deadline: float | None) -> tuple[GPT2Classifier | None, list[float]]:  # fmt: skip
    """The promoted candidate's recipe again on every label but the golden set, plus replay, and its golden-set scores.

    None when the time budget cut it short."""
    tc = cfg.trainer
    rows, class_weight = rebalance(data.labelled + data.replay, tc.balance, tc.mode, seed)
    golden = data.splits.get("golden", [])
    if {e.id for e in rows} & {e.id for e in golden}:  # load_data's promise, checked where it counts
        raise FilterdError("refit: the final fit would train on the golden set")
    if tc.mode == "head":
        return _final_head(candidate, meta, rows, golden, class_weight, init, cfg, device, seed)
    tokenizer = Tokenizer(meta.max_length)
    everything = Encoded(tokenizer.encode_batch([e.text for e in rows]), [LABELS.index(e.label) for e in rows])
    epochs = max(1, run.best_epoch if run else tc.epochs)  # as many epochs as the gated candidate kept
    final, final_run = _train_top(model, tc.mode, everything, Encoded([], []), device, seed, epochs=epochs, lr=tc.lr,
                                     deadline=deadline)  # fmt: skip
    if final_run.stopped:
        return None, []
    golden_tokens = tokenizer.encode_batch([e.text for e in golden])
    return final.cpu(), score(final, golden_tokens, device, cfg.batching.max_batch_tokens) if golden else []


# -- one cycle ----------------------------------------------------------------------------------
def refit_once(
    cfg: Config,
    store: LabelStore,
    *,
    seed: int = 123,
    metrics: TrainerMetrics | None = None,
    base_model_dir: Path | None = None,
) -> RefitOutcome:
    """One refit cycle; never raises (a failure is `outcome == "failed"` with a one-line reason)."""
    t0 = time.perf_counter()
    seq = store.last_seq()  # labels arriving during the cycle count as new for the next one
    try:
        budget = cfg.trainer.max_cycle_seconds
        result = _cycle(cfg, store, seed, base_model_dir, t0 + budget if budget > 0 else None)
    except Exception as e:  # noqa: BLE001 -- a cycle's failure must not end the service's loop
        reason = " ".join(str(e).split()) or type(e).__name__
        log.debug("refit failed", exc_info=True)
        result = RefitOutcome("failed", reason[:500], cfg.trainer.mode)
    result.seconds = time.perf_counter() - t0
    if result.outcome != "skipped":
        try:
            store.meta_set(LAST_SEQ_KEY, seq)
            store.meta_set(LAST_TIME_KEY, time.time())
        except FilterdError as e:
            log.warning("refit: cannot record the cycle in the store: %s", e)
        try:
            ModelStore(cfg.trainer.models_dir).record_refit(result.to_dict())
        except OSError as e:
            log.warning("refit: cannot append to %s: %s", cfg.trainer.models_dir, e)
    _report(result, metrics)
    return result


AUTO_ALL_MAX_PARAMS = 30_000_000  # mode "auto": fine-tune everything up to this size (minutes per cycle on a CPU), else the head


def resolve_mode(mode: str, model_dir: Path | None) -> str:
    """The refit mode a cycle runs: `mode`, or for "auto" "all" on models up to AUTO_ALL_MAX_PARAMS and "head" above.

    Measured with bench/online.py (bench/RESULTS.md): on small models a full fine-tune adapts to a site where a head
    on a backbone that never saw its mail cannot (a cold start from a random base is hopeless in head mode), at tens
    of seconds per cycle; for GPT-2 124M and up a full fine-tune per cycle costs hours on a CPU, and head stays.
    """
    if mode != "auto":
        return mode
    if model_dir is None:
        return "head"
    meta = ModelMeta.from_json((Path(model_dir) / "filterd.json").read_text(), str(model_dir))
    return "all" if meta.config.n_params() <= AUTO_ALL_MAX_PARAMS else "head"


def _cycle(cfg: Config, store: LabelStore, seed: int, base_model_dir: Path | None, deadline: float | None) -> RefitOutcome:
    models = ModelStore(cfg.trainer.models_dir)
    live_dir = models.current()
    source = live_dir or (Path(base_model_dir) if base_model_dir is not None else None)
    mode = resolve_mode(cfg.trainer.mode, source)
    if mode != cfg.trainer.mode:
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, mode=mode))
    tc = cfg.trainer
    data = load_data(cfg, store, seed, source)
    if isinstance(data, str):
        return RefitOutcome("skipped", data, tc.mode, counts={"store": store.counts()})
    if not data.golden_source and source is not None:
        log.warning("refit: no golden set (no [trainer] golden_set, no %s in %s): only the test split guards against bad labels",
                    GOLDEN_FILE, source)  # fmt: skip
    if source is None:
        raise FilterdError(f"{tc.models_dir}: no current model to refit from (publish one there, or give a base model directory)")
    model, meta = load_model_dir(source)
    device = pick_device(cfg.model.device)
    model.to(device).eval()
    sizes = " / ".join(f"{name} {len(ex)}" for name, ex in data.splits.items())
    log.info("refit: %s from %s on %s: %s; balance %s, trained on %d of %d stored labels (+%d replay)", tc.mode, meta.version,
             device, sizes, tc.balance, sum(data.counts["trained"].values()), sum(data.counts["store"].values()),
             len(data.replay))  # fmt: skip
    init = (model.head.weight.detach().clone(), model.head.bias.detach().clone())  # the head a final head fit starts from
    history, run, t_train = None, None, time.perf_counter()
    if tc.mode == "head":
        candidate, cand_scores, cur_scores = _refit_head(model, meta, data, cfg, device, seed)
    else:
        candidate, cand_scores, cur_scores, history, run = _refit_top(model, meta, data, cfg, device, seed, deadline)
    train_seconds = {"candidate": round(time.perf_counter() - t_train, 2)}
    cand_head = (candidate.head.weight.detach().clone(), candidate.head.bias.detach().clone())
    threshold = meta.threshold
    cand = {name: compute_metrics(data.labels(name), s, threshold) for name, s in cand_scores.items()}
    cur = {name: compute_metrics(data.labels(name), s, threshold) for name, s in cur_scores.items()}
    for name in cur:
        log.info("refit: candidate %s | current acc %.2f%%", format_metrics_line(name, cand[name]), 100 * cur[name].accuracy)
    promote, why = gate({n: cand[n] for n in cur}, cur, tc.max_regression, tc.max_ham_fpr, live=live_dir is not None,
                         golden_tolerance=tc.golden_tolerance)  # fmt: skip
    points = refit_points(data, cand_scores)
    if promote and (missing := _missing_points(cfg, points)):
        promote, why = False, f"no operating point for [policy] {missing} (too few unseen ham), so the daemon would refuse it"
    why += _lacking_note(data)
    outcome = RefitOutcome("promoted" if promote else "rejected", why, tc.mode, current_version=meta.version,
                           candidate=cand, current=cur, counts=data.counts, golden_source=data.golden_source,
                           final_fit="fold" if promote else "", train_seconds=train_seconds)  # fmt: skip
    if promote or live_dir is not None:  # the model serving after this cycle
        outcome.over_ham_fpr_bound = over_bound({n: (cand if promote else cur)[n] for n in cur}, tc.max_ham_fpr)
    if outcome.over_ham_fpr_bound:
        log.warning("refit: the live model's ham FPR is over max_ham_fpr %.2f%% on %s (an alert; no-worse candidates still win)",
                    100 * tc.max_ham_fpr, ", ".join(outcome.over_ham_fpr_bound))  # fmt: skip
    if promote:
        if tc.final_fit == "all":
            t_final = time.perf_counter()
            final, final_golden = _final_fit(model, candidate, meta, data, cfg, device, seed, init, run, deadline)
            train_seconds["final_fit"] = round(time.perf_counter() - t_final, 2)
            if final is not None and "golden" in cur:  # never trained on the golden set, so it can still judge the final model
                outcome.final_golden = compute_metrics(data.labels("golden"), final_golden, threshold)
                ok, why_final = gate({"golden": outcome.final_golden}, {"golden": cur["golden"]}, tc.max_regression,
                                     tc.max_ham_fpr, live=live_dir is not None, golden_tolerance=tc.golden_tolerance)  # fmt: skip
                if not ok:
                    final, outcome.final_fit = None, "fold (final fit failed the golden set)"
                    log.warning(
                        "refit: the final fit on all labels fails the golden set (%s): publishing the gated candidate", why_final
                    )
            if final is None:
                if not outcome.final_fit.startswith("fold ("):
                    outcome.final_fit = "fold (time budget)"
                    log.warning("refit: the final fit on all labels ran out of max_cycle_seconds: publishing the gated candidate")
                if tc.mode == "head":  # the final head was written into the candidate's model: put the gated one back
                    _set_head(candidate, cand_head)
            else:
                candidate, outcome.final_fit = final, "all labels"
                data.counts["trained_candidate"] = data.counts["trained"]
                data.counts["trained"] = label_counts(data.labelled)  # what the published model trained on
            log.info("refit: candidate trained in %.1fs, final fit on %d labels + %d replay in %.1fs (%s published)",
                     train_seconds["candidate"], len(data.labelled), len(data.replay), train_seconds["final_fit"],
                     outcome.final_fit)  # fmt: skip
        golden = data.splits.get("golden") if data.golden_source else None
        outcome.version = _publish(cfg, models, candidate, meta, data, cand, cand_scores, history, seed, golden, outcome, run, points)
    return outcome


def refit_points(data: RefitData, cand_scores: Scores) -> list[OperatingPoint]:
    """The candidate's operating points: thresholds set on the ham it did not train on (val and the golden
    set), checked on the test fold. Refit labels are balanced, so this ham is not at its natural rate."""
    ham = [s for name in ("val", "golden") if name in cand_scores for y, s in zip(data.labels(name), cand_scores[name]) if y == 0]
    if "test" not in cand_scores:
        return []
    return operating_points(ham, data.labels("test"), cand_scores["test"])


def _missing_points(cfg: Config, points: list[OperatingPoint]) -> str:
    """The "fpr:" levels of [policy] that `points` cannot serve ("" when none)."""
    have = {p.ham_fpr_target for p in points if p.threshold is not None}
    return ", ".join(f"fpr:{t:g}" for t in sorted(Policy.from_config(cfg).targets() - have))


def _set_head(model: GPT2Classifier, head: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        model.head.weight.copy_(head[0])
        model.head.bias.copy_(head[1])


def _lacking_note(data: RefitData) -> str:
    notes = [f"{name} split has no {label}" for name in ("test", "golden") if name in data.splits
             for label, n in label_counts(data.splits[name]).items() if n == 0]  # fmt: skip
    return f" (note: {'; '.join(notes)})" if notes else ""


def _publish(cfg: Config, models: ModelStore, candidate: GPT2Classifier, meta: ModelMeta, data: RefitData,
             cand: dict[str, Metrics], cand_scores: Scores, history: dict | None, seed: int,
             golden: list[Example] | None, outcome: RefitOutcome, run: LoopResult | None,
             points: list[OperatingPoint]) -> str:  # fmt: skip
    tc = cfg.trainer
    extra: dict[str, Any] = {"parent": meta.version, "mode": tc.mode, "seed": seed, "counts": data.counts, "balance": tc.balance,
                             "golden_source": data.golden_source, "replay": data.counts["replay"],
                             "final_fit": outcome.final_fit, "train_seconds": outcome.train_seconds,
                             "final_fit_golden": outcome.final_golden.to_dict() if outcome.final_golden else None,
                             "test_seen_through": data.max_seq if outcome.final_fit == "all labels" else data.seen_through}  # fmt: skip
    if run is not None:  # top modes: the gated candidate's training
        extra["training"] = {"epochs": tc.epochs, "lr": tc.lr, "epochs_run": run.epochs_run, "best_epoch": run.best_epoch,
                             "steps": run.steps, "stopped_at_time_budget": run.stopped}  # fmt: skip
    new = ModelMeta(
        version="", base=meta.base, base_kind=meta.base_kind, config=meta.config, max_length=meta.max_length,
        threshold=meta.threshold, trainable=tc.mode, metrics={n: m.to_dict() for n, m in cand.items()},  # the gated candidate's
        data_manifest_sha256=data.sha256(final=outcome.final_fit == "all labels"), extra={"refit": extra},
        operating_points=[p.to_dict() for p in points],
    )  # fmt: skip
    reports = [SplitReport(n, cand[n], data.labels(n), cand_scores[n]) for n in cand]
    # The golden set and the replay sample travel with every promotion, so they outlive the model whose fit sampled them.
    files = {name: ex for name, ex in ((GOLDEN_FILE, golden), (REPLAY_FILE, data.replay_file)) if ex} or None
    path = models.publish(candidate, new, reports, history, files=files)
    try:  # the new model is live: housekeeping trouble is logged, not turned into a failed cycle
        models.prune(tc.keep)
    except OSError as e:
        log.warning("refit: pruning %s failed: %s", models.versions_dir, e)
    if cfg.redis.enabled:
        models.announce(cfg.redis.url, cfg.redis.model_channel, path.name)
    return path.name


def _report(result: RefitOutcome, metrics: TrainerMetrics | None) -> None:
    level = logging.WARNING if result.outcome == "failed" else logging.INFO
    trained = f" (trained on {result.trained_share:.0%} of stored labels)" if "trained" in result.counts else ""
    log.log(level, "refit: %s in %.1fs: %s%s%s", result.outcome, result.seconds, result.reason,
            f" -> {result.version}" if result.version else "", trained)  # fmt: skip
    if metrics is None:
        return
    if result.outcome != "skipped":
        metrics.observe_refit(result.outcome, result.seconds)
    if result.outcome in ("promoted", "rejected"):
        metrics.set_over_ham_fpr_bound(bool(result.over_ham_fpr_bound))
    for model, by_split in (("candidate", result.candidate), ("current", result.current)):
        for split, m in by_split.items():
            if split in ("test", "golden"):
                metrics.set_eval(split, model, m.accuracy, m.ham_fpr, m.spam_recall)
    for label, n in result.counts.get("balanced", {}).items():
        metrics.set_dataset_size(label, n)


# -- the service --------------------------------------------------------------------------------
class RefitService:
    """Runs `refit_once` every `interval`, or sooner once `min_new_labels` labels arrived since the last attempt.

    No cycle runs while nothing changed since the last attempt, whatever the clock says. Cycles run in a
    worker thread; the label intake runs beside the service under `filterd.net.supervise` (trainer/service.py).
    `min_new_labels = 0` means the interval alone decides.
    """

    def __init__(self, cfg: Config, store: LabelStore, metrics: TrainerMetrics | None = None, *,
                 check_every: float = 5.0, base_model_dir: Path | None = None,
                 on_outcome: Callable[[RefitOutcome], None] | None = None) -> None:  # fmt: skip
        self.cfg, self.store, self.metrics = cfg, store, metrics
        self.check_every = check_every
        self.base_model_dir = base_model_dir
        self.on_outcome = on_outcome
        self.last: RefitOutcome | None = None

    def _due(self, next_time: float, seen_seq: int) -> str | None:
        new = self.store.new_since(seen_seq)
        if new == 0:  # nothing to learn: another fit on the same data would only drift (`refit --once` still can)
            return None
        if time.time() >= next_time:
            return f"interval, {new} new labels"
        n = self.cfg.trainer.min_new_labels
        return f"{new} new labels" if n and new >= n else None

    async def run(self, stop: asyncio.Event) -> None:
        seen_seq = int(self.store.meta_get(LAST_SEQ_KEY, 0))
        next_time = float(self.store.meta_get(LAST_TIME_KEY, 0.0)) + self.cfg.trainer.interval
        while not stop.is_set():
            why = await asyncio.to_thread(self._due, next_time, seen_seq)
            if why:
                seen_seq = await asyncio.to_thread(self.store.last_seq)
                log.info("refit: starting a cycle (%s)", why)
                result = await asyncio.to_thread(refit_once, self.cfg, self.store, metrics=self.metrics,
                                                 base_model_dir=self.base_model_dir)  # fmt: skip
                self.last = result
                if self.on_outcome is not None:
                    self.on_outcome(result)
                next_time = time.time() + self.cfg.trainer.interval
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.check_every)
            except asyncio.TimeoutError:
                pass
