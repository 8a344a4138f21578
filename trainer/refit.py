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
import hashlib
import json
import logging
import random
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

from trainer.data import Example, balance, read_split
from trainer.evaluate import Metrics, SplitReport, compute_metrics, format_metrics_line
from trainer.features import FeatureCache, features_for, fit_head, spam_probabilities
from trainer.fit import GOLDEN_FILE, REPLAY_FILE
from trainer.loop import Encoded, LoopResult, LoopSettings, score, train
from trainer.publish import ModelStore
from filterd.store.labels import LabelStore, message_id

log = logging.getLogger("filterd.trainer")

OUTCOMES = ("promoted", "rejected", "skipped", "failed")
SPLITS = ("train", "val", "test")
FEATURES_FILE = "features.sqlite"  # in models_dir, beside versions/ and current
LAST_SEQ_KEY, LAST_TIME_KEY = "last_refit_seq", "last_refit_time"
EPS = 1e-9  # accuracies are ratios of counts: compare without float noise


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


def split_of(msg_id: str) -> str:
    """Which split a message is in, "train", "val" or "test" (70/10/20), from a hash of its id: the same answer forever."""
    bucket = int(hashlib.sha256(f"filterd-split:{msg_id}".encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 80 else "test"


def gate(
    candidate: dict[str, Metrics],
    current: dict[str, Metrics],
    max_regression: float,
    max_ham_fpr: float,
    *,
    live: bool = True,
    golden_tolerance: float | None = None,
) -> tuple[bool, str]:
    """Promote iff, on every evaluated set, the candidate is no worse than the current model.

    No worse: accuracy >= current - max_regression, and ham FPR <= max(max_ham_fpr, current's ham FPR):
    under the absolute bound the candidate may use the room up to it, over it the candidate must not
    be higher than the live model. So a site whose live model is over `max_ham_fpr` still gets a better
    candidate (the bound is an alert then, see `over_bound`) instead of staying stuck on the worse model.
    `live=False` (the current model is only the base a first model starts from, nothing serves it):
    the absolute bound is the gate, a first model must pass it.
    On the "golden" set, whose labels are trusted, `golden_tolerance` (when given) also caps how much
    accuracy may drop and ham FPR may rise against the current model: poisoned labels show there first.
    """
    for name, cand in candidate.items():
        if name not in current:
            continue
        cur = current[name]
        if cand.accuracy < cur.accuracy - max_regression - EPS:
            return False, f"{name} accuracy {cand.accuracy:.2%} < current {cur.accuracy:.2%} - {max_regression:.2%}"
        if cand.ham_fpr > max_ham_fpr + EPS and (not live or cand.ham_fpr > cur.ham_fpr + EPS):
            if not live:
                return False, f"{name} ham-FPR {cand.ham_fpr:.2%} > max {max_ham_fpr:.2%} (no live model yet)"
            return False, f"{name} ham-FPR {cand.ham_fpr:.2%} > max {max_ham_fpr:.2%} and > current {cur.ham_fpr:.2%}"
        if name == "golden" and golden_tolerance is not None:
            if cand.accuracy < cur.accuracy - golden_tolerance - EPS:
                return False, f"golden accuracy {cand.accuracy:.2%} < current {cur.accuracy:.2%} - {golden_tolerance:.2%}"
            if cand.ham_fpr > cur.ham_fpr + golden_tolerance + EPS:
                return False, f"golden ham-FPR {cand.ham_fpr:.2%} > current {cur.ham_fpr:.2%} + {golden_tolerance:.2%}"
    shown = ", ".join(
        f"{n} acc {candidate[n].accuracy:.2%} (current {current[n].accuracy:.2%}) ham-FPR {candidate[n].ham_fpr:.2%}"
        for n in candidate
        if n in current
    )
    return True, shown


def over_bound(metrics: dict[str, Metrics], max_ham_fpr: float) -> list[str]:
    """The evaluated sets on which a model's ham FPR exceeds the absolute bound (an alert, not a gate, for a live model)."""
    return [name for name, m in metrics.items() if m.ham_fpr > max_ham_fpr + EPS]


# -- the data ----------------------------------------------------------------------------------
@dataclass
class _Data:
    splits: dict[str, list[Example]]  # train/val/test (+ golden), Example.id = message id; head mode: no val
    counts: dict[str, dict[str, int]]
    class_weight: tuple[float, float] | None = None  # (ham, spam) loss weights for the head's fit (balance = "weight")
    golden_source: str = ""
    labelled: list[Example] = field(default_factory=list)  # every store message but the golden set, balanced: the final fit's
    replay: list[Example] = field(default_factory=list)  # replay messages mixed into train (and into the final fit)
    replay_file: list[Example] = field(default_factory=list)  # the source model's whole replay.csv, carried on when promoted
    max_seq: int = 0  # the latest label change among the messages read
    seen_through: int | None = None  # test-fold messages up to this change were trained on by the source model (moved to train)

    def labels(self, name: str) -> list[int]:
        return [LABELS.index(e.label) for e in self.splits[name]]

    def sha256(self, final: bool = False) -> str:
        """Identifies the training data (the `data_manifest_sha256` of a refit model); `final`: the final fit's."""
        named = {"all": self.labelled + self.replay} if final else self.splits
        lines = sorted(f"{n}\t{e.id}\t{e.label}\n" for n in (("all",) if final else SPLITS) for e in named.get(n, []))
        return hashlib.sha256("".join(lines).encode()).hexdigest()


def _count(examples: list[Example]) -> dict[str, int]:
    return {label: sum(e.label == label for e in examples) for label in LABELS}


def _golden(cfg: Config, model_dir: Path | None) -> tuple[list[Example], str]:
    """The trusted golden set: `[trainer] golden_set`, else the model's own golden.csv (a sample of its fit's test split)."""
    path = cfg.trainer.golden_set
    if path is None and model_dir is not None and (model_dir / GOLDEN_FILE).is_file():
        path = model_dir / GOLDEN_FILE
    if path is None:
        return [], ""
    return _read_by_text(path), str(path)


def _read_by_text(path: Path) -> list[Example]:
    """A split CSV with message ids (keyed by text, like the store's) as ids, one entry per text: the first copy wins."""
    unique = {message_id(e.text): e for e in reversed(read_split(path))}
    return [Example(i, e.label, e.text) for i, e in reversed(unique.items())]


def _read_replay(model_dir: Path | None) -> list[Example]:
    """The model's replay.csv, one entry per text (ids are message ids, like the store's); [] when absent or unreadable."""
    path = model_dir / REPLAY_FILE if model_dir is not None else None
    if path is None or not path.is_file():
        return []
    try:
        return _read_by_text(path)
    except (FilterdError, OSError) as e:  # a damaged replay file costs the replay, not the cycle
        log.warning("refit: %s unreadable, refitting without replay: %s", path, " ".join(str(e).split()))
        return []


def _replay_sample(replay: list[Example], exclude: set[str], per_class: int, seed: int) -> list[Example]:
    """Up to `per_class` replay messages per label (seeded), none of them in `exclude` (the store and the golden set)."""
    rng = random.Random(f"replay:{seed}")
    out: list[Example] = []
    for label in LABELS:
        pool = [e for e in replay if e.label == label and e.id not in exclude]
        out += rng.sample(pool, min(per_class, len(pool)))
    return out


def _rebalance(train: list[Example], balance_: str, mode: str, seed: int) -> tuple[list[Example], tuple[float, float] | None]:
    """The train split as trained on, and the (ham, spam) loss weights of the head's fit (balance "weight", mode head)."""
    if balance_ == "oversample" or (balance_ == "weight" and mode != "head"):  # top modes: weights as repeats
        return _oversample(train, seed), None
    if balance_ == "weight":  # n / (2 n_c): the mean weight per message stays 1
        n = _count(train)
        total = sum(n.values())
        return train, (total / (2 * n["ham"]), total / (2 * n["spam"]))
    return train, None


def _oversample(examples: list[Example], seed: int) -> list[Example]:
    """Repeat the minority class (whole copies, then a seeded sample) up to the majority's size; nothing is dropped."""
    by_label = {label: [e for e in examples if e.label == label] for label in LABELS}
    minority, majority = sorted(LABELS, key=lambda label: len(by_label[label]))
    few, need = by_label[minority], len(by_label[majority]) - len(by_label[minority])
    if not few or need <= 0:
        return examples
    extra = few * (need // len(few)) + random.Random(seed).sample(few, need % len(few))
    return examples + extra


def _load_data(cfg: Config, store: LabelStore, seed: int, model_dir: Path | None = None) -> _Data | str:
    """The hash-split, rebalanced data set, or the reason there is not enough of it.

    balance "undersample" drops majority messages (the chapter's method); "oversample" repeats minority
    messages of the train split; "weight" keeps every message once and weighs the loss by class instead.
    In mode "head" nothing needs a validation split, so val's messages are trained on too.
    """
    tc = cfg.trainer
    have = store.counts()
    if min(have.values()) < tc.min_per_class:
        return f"too few labels: {have['spam']} spam, {have['ham']} ham (min_per_class {tc.min_per_class})"
    seqs: dict[str, int] = {}
    rows = []
    for r in store.rows():
        seqs[r.id] = r.seq
        rows.append(Example(r.id, r.label, r.text))
    stored_ids = {e.id for e in rows}
    golden, golden_source = _golden(cfg, model_dir)
    held_out = {e.id for e in golden}  # keyed by text like the store; never trained on, whatever the store holds
    rows = [e for e in rows if e.id not in held_out]
    balanced = balance(rows, "undersample", seed)[0] if tc.balance == "undersample" else rows
    splits = {name: [e for e in balanced if split_of(e.id) == name] for name in SPLITS}
    seen_through = _test_seen_through(model_dir)
    if seen_through is not None:
        # The live model was fitted on every label up to change `seen_through` (a final fit): test-fold messages it
        # trained on would favour it unfairly, so they train the candidate, and the gate judges both on the
        # test-fold messages labelled (or relabelled) since, which neither has seen.
        splits["train"] += [e for e in splits["test"] if seqs[e.id] <= seen_through]
        splits["test"] = [e for e in splits["test"] if seqs[e.id] > seen_through]
    if tc.mode == "head":
        splits["train"] += splits.pop("val")
    lacking = [label for label, n in _count(splits["train"]).items() if n == 0]
    if lacking:
        return f"the train split has no {lacking[0]} messages ({len(splits['train'])} in all)"
    trained = _count(splits["train"])
    # Replay goes into train only: a message in the store (whatever its fold) or the golden set is not replayed,
    # so nothing is both trained on and evaluated.
    replay_file = _read_replay(model_dir)
    replay = _replay_sample(replay_file, stored_ids | held_out, tc.replay, seed)
    splits["train"], class_weight = _rebalance(splits["train"] + replay, tc.balance, tc.mode, seed)
    if golden:
        splits["golden"] = golden
    counts = {"store": have, "balanced": _count(balanced), "trained": trained, "replay": _count(replay)}
    counts |= {name: _count(ex) for name, ex in splits.items()}
    return _Data(splits, counts, class_weight, golden_source, balanced, replay, replay_file,
                 max(seqs.values(), default=0), seen_through)  # fmt: skip


def _test_seen_through(model_dir: Path | None) -> int | None:
    """The last label change a model's training saw in the test fold (recorded by a final fit), or None."""
    try:
        meta = json.loads((model_dir / "filterd.json").read_text()) if model_dir is not None else {}
        value = meta.get("extra", {}).get("refit", {}).get("test_seen_through")
        return int(value) if value is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


# -- training -----------------------------------------------------------------------------------
Scores = dict[str, list[float]]  # split -> P(spam) per message


def _refit_head(
    model: GPT2Classifier, meta: ModelMeta, data: _Data, cfg: Config, device: torch.device, seed: int
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
    model: GPT2Classifier, meta: ModelMeta, data: _Data, cfg: Config, device: torch.device, seed: int, deadline: float | None
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


def _final_fit(model: GPT2Classifier, candidate: GPT2Classifier, meta: ModelMeta, data: _Data, cfg: Config,
               device: torch.device, seed: int, init: tuple[torch.Tensor, torch.Tensor], run: LoopResult | None,
               deadline: float | None) -> tuple[GPT2Classifier | None, list[float]]:  # fmt: skip
    """The promoted candidate's recipe again on every label but the golden set, plus replay, and its golden-set scores.

    None when the time budget cut it short."""
    tc = cfg.trainer
    rows, class_weight = _rebalance(data.labelled + data.replay, tc.balance, tc.mode, seed)
    golden = data.splits.get("golden", [])
    if {e.id for e in rows} & {e.id for e in golden}:  # _load_data's promise, checked where it counts
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
    data = _load_data(cfg, store, seed, source)
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
                data.counts["trained"] = _count(data.labelled)  # what the published model trained on
            log.info("refit: candidate trained in %.1fs, final fit on %d labels + %d replay in %.1fs (%s published)",
                     train_seconds["candidate"], len(data.labelled), len(data.replay), train_seconds["final_fit"],
                     outcome.final_fit)  # fmt: skip
        golden = data.splits.get("golden") if data.golden_source else None
        outcome.version = _publish(cfg, models, candidate, meta, data, cand, cand_scores, history, seed, golden, outcome, run)
    return outcome


def _set_head(model: GPT2Classifier, head: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        model.head.weight.copy_(head[0])
        model.head.bias.copy_(head[1])


def _lacking_note(data: _Data) -> str:
    notes = [f"{name} split has no {label}" for name in ("test", "golden") if name in data.splits
             for label, n in _count(data.splits[name]).items() if n == 0]  # fmt: skip
    return f" (note: {'; '.join(notes)})" if notes else ""


def _publish(cfg: Config, models: ModelStore, candidate: GPT2Classifier, meta: ModelMeta, data: _Data,
             cand: dict[str, Metrics], cand_scores: Scores, history: dict | None, seed: int,
             golden: list[Example] | None, outcome: RefitOutcome, run: LoopResult | None) -> str:  # fmt: skip
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
