"""The labels one refit trains and judges on: the store's messages in fixed hash folds, the golden set, the
replay sample, rebalanced as [trainer] balance says (see trainer/refit.py for the cycle)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from filterd.config import Config
from filterd.errors import FilterdError
from filterd.model.gpt2 import LABELS
from filterd.store.labels import LabelStore, message_id

from trainer.data import Example, balance, read_split
from trainer.fit import GOLDEN_FILE, REPLAY_FILE

log = logging.getLogger("filterd.trainer")

SPLITS = ("train", "val", "test")


def split_of(msg_id: str) -> str:
    """Which split a message is in, "train", "val" or "test" (70/10/20), from a hash of its id: the same answer forever."""
    bucket = int(hashlib.sha256(f"filterd-split:{msg_id}".encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 80 else "test"


@dataclass
class RefitData:
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


def label_counts(examples: list[Example]) -> dict[str, int]:
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


def read_replay(model_dir: Path | None) -> list[Example]:
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


def rebalance(train: list[Example], balance_: str, mode: str, seed: int) -> tuple[list[Example], tuple[float, float] | None]:
    """The train split as trained on, and the (ham, spam) loss weights of the head's fit (balance "weight", mode head)."""
    if balance_ == "oversample" or (balance_ == "weight" and mode != "head"):  # top modes: weights as repeats
        return _oversample(train, seed), None
    if balance_ == "weight":  # n / (2 n_c): the mean weight per message stays 1
        n = label_counts(train)
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


def load_data(cfg: Config, store: LabelStore, seed: int, model_dir: Path | None = None) -> RefitData | str:
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
    lacking = [label for label, n in label_counts(splits["train"]).items() if n == 0]
    if lacking:
        return f"the train split has no {lacking[0]} messages ({len(splits['train'])} in all)"
    trained = label_counts(splits["train"])
    # Replay goes into train only: a message in the store (whatever its fold) or the golden set is not replayed,
    # so nothing is both trained on and evaluated.
    replay_file = read_replay(model_dir)
    replay = _replay_sample(replay_file, stored_ids | held_out, tc.replay, seed)
    splits["train"], class_weight = rebalance(splits["train"] + replay, tc.balance, tc.mode, seed)
    if golden:
        splits["golden"] = golden
    counts = {"store": have, "balanced": label_counts(balanced), "trained": trained, "replay": label_counts(replay)}
    counts |= {name: label_counts(ex) for name, ex in splits.items()}
    return RefitData(splits, counts, class_weight, golden_source, balanced, replay, replay_file,
                 max(seqs.values(), default=0), seen_through)  # fmt: skip


def _test_seen_through(model_dir: Path | None) -> int | None:
    """The last label change a model's training saw in the test fold (recorded by a final fit), or None."""
    try:
        meta = json.loads((model_dir / "filterd.json").read_text()) if model_dir is not None else {}
        value = meta.get("extra", {}).get("refit", {}).get("test_seen_through")
        return int(value) if value is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
