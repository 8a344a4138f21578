"""`filterd-trainer pretrain`: continued next-token training of the GPT-2 backbone on unlabelled text.

Domain-adaptive pretraining ("Don't Stop Pretraining", Gururangan et al. 2020) of a pretrained
GPT-2, or self-pretraining of a `random:` base, before `fit`. The corpus is read by the readers
the rest of the trainer uses (mail through `learn`'s reader and `extract_text`, CSV splits through
`read_split` with the labels ignored, the label store), tokenised, and packed into one stream with
<|endoftext|> between documents. A fraction of the documents (chosen by a hash of their text, so
the choice is stable across runs) is held out for the LM validation loss, reported before and after.

The result is a Hugging Face GPT-2 checkpoint (`config.json` + `model.safetensors`, Conv1D
weights transposed back) plus `pretrain.json`, published atomically at OUT: `fit --base OUT`
loads it like any checkpoint. Progress is checkpointed to a sibling state directory
(`.OUT.pretrain-state`: weights and AdamW moments in safetensors, step and sampler state in JSON),
so an interrupted run continues with `--resume`; SIGINT/SIGTERM finish the current step and save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from filterd.model.engine import pick_device
from filterd.errors import ConfigError, DataError, FilterdError
from filterd.mail.text import extract_text
from filterd.model.gpt2 import PAD_TOKEN_ID, GPT2Classifier, GPTConfig
from filterd.model.tokenizer import _encoding
from filterd.model.bases import build_model, resolve_base
from filterd.model.weights import publish_directory, staging_dir

from trainer.data import read_split
from trainer.loop import autocast
from trainer.mailbox import iter_messages

log = logging.getLogger("filterd.trainer")

EOT = PAD_TOKEN_ID  # <|endoftext|> separates documents in the packed stream
MAX_DOC_CHARS = 16_000  # text kept per document (as data.MAX_TEXT_CHARS): a 50 MB mail costs no more than a long one
MAX_MAIL_BYTES = 1 << 20  # raw bytes of a message handed to the mail parser
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB: not text (images, archives, executables)
CSV_SPLITS = ("train", "val", "holdout")  # a data directory's test.csv stays unseen, so test scores stay honest
VAL_MAX_BLOCKS = 64  # held-out blocks scored per evaluation: bounds its cost on a big corpus
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PRETRAIN_FILE = "pretrain.json"


class PretrainInterrupted(FilterdError):
    """Stopped by SIGINT/SIGTERM after saving the state; `--resume` continues."""


@dataclass
class PretrainConfig:
    base: str
    out: Path
    text: list[Path] = field(default_factory=list)  # one document per line
    mail: list[Path] = field(default_factory=list)  # files, directories, mbox, Maildir
    csv: list[Path] = field(default_factory=list)  # split files, or data directories (train/val/holdout)
    store: Path | None = None  # label store (SQLite)
    reservoir: list[Path] = field(default_factory=list)  # the daemon's reservoirs of classified texts ([trainer] reservoir)
    steps: int | None = None  # None with time_s None: DEFAULT_STEPS
    time_s: float | None = None  # wall-clock budget; stops after the step that crosses it
    block_size: int = 256
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup: int = 100  # linear warm-up steps (capped at a tenth of a step budget)
    val_fraction: float = 0.05
    seed: int = 123
    resume: bool = False
    device: str = "auto"
    checkpoint_every: int = 200  # steps between saves of the resume state
    eval_every: int = 200  # steps between held-out loss points
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal
    on_step: Callable[[int], None] | None = field(default=None, repr=False)  # called after each step (tests)

    DEFAULT_STEPS = 1000

    def validate(self) -> None:
        if not (self.text or self.mail or self.csv or self.store or self.reservoir):
            raise ConfigError("pretrain needs a corpus: --text, --mail, --csv, --store and/or --reservoir")
        for p in [*self.text, *self.mail, *self.csv, *([self.store] if self.store else []), *self.reservoir]:
            if not Path(p).exists():
                raise DataError(f"{p}: no such file or directory")
        for name in ("batch_size", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("--steps must be at least 1")
        if self.time_s is not None and not (self.time_s > 0 and math.isfinite(self.time_s)):
            raise ConfigError("--time must be a positive duration")
        if not 2 <= self.block_size <= 1024:
            raise ConfigError(f"--block-size must be within 2..1024, got {self.block_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be within [0, 1), got {self.val_fraction}")
        if self.warmup < 0:
            raise ConfigError("--warmup must be at least 0")

    @property
    def max_steps(self) -> int | None:
        if self.steps is None and self.time_s is None:
            return self.DEFAULT_STEPS
        return self.steps


@dataclass
class Corpus:
    """The packed token streams and what went into them."""

    train: np.ndarray  # uint16 token ids, documents separated by EOT
    val: np.ndarray
    documents: dict[str, int]  # source kind -> documents read
    train_docs: int
    val_docs: int
    skipped: dict[str, int]  # reason -> count
    clipped: int  # documents cut to MAX_DOC_CHARS / MAX_MAIL_BYTES
    sha256: str  # over the documents' texts, in order


@dataclass
class PretrainResult:
    out: Path
    steps: int
    tokens_seen: int
    val_loss_before: float | None
    val_loss_after: float | None
    seconds: float
    resumed_from: int  # step the run continued from (0: a fresh start)
    record: dict  # what pretrain.json holds


# --------------------------------------------------------------------------- the corpus


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:BINARY_SNIFF_BYTES]


def _text_documents(path: Path, skip: Callable[[str, str], None]) -> Iterator[tuple[str, bool]]:
    """(line, clipped) for each non-blank line of the text files under `path`."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for f in files:
        try:
            with open(f, "rb") as fh:
                if _looks_binary(fh.read(BINARY_SNIFF_BYTES)):
                    skip(str(f), "binary")
                    continue
                fh.seek(0)
                while raw := fh.readline(MAX_DOC_CHARS * 4):  # a line without newlines is read in bounded pieces
                    long = len(raw) == MAX_DOC_CHARS * 4 and not raw.endswith(b"\n")
                    if long:  # keep the head, drop the rest of the line
                        while (more := fh.readline(1 << 20)) and not more.endswith(b"\n"):
                            pass
                    line = raw.decode("utf-8", "replace").strip()
                    if line:
                        yield line[:MAX_DOC_CHARS], long or len(line) > MAX_DOC_CHARS
        except OSError as e:
            skip(str(f), f"cannot read: {e.strerror or e}")


def _mail_documents(path: Path, skip: Callable[[str, str], None]) -> Iterator[tuple[str, bool]]:
    # the reader prepare and learn use; big mail is read only as far as it is used
    for where, raw in iter_messages(path, skip, max_bytes=MAX_MAIL_BYTES, clip=True):
        if _looks_binary(raw):
            skip(where, "binary")
            continue
        text = extract_text(raw[:MAX_MAIL_BYTES])
        if text.strip():
            yield text[:MAX_DOC_CHARS], len(raw) > MAX_MAIL_BYTES or len(text) > MAX_DOC_CHARS
        else:
            skip(where, "no text")


def _csv_documents(path: Path) -> Iterator[tuple[str, bool]]:
    files = [path / f"{s}.csv" for s in CSV_SPLITS if (path / f"{s}.csv").is_file()] if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no {', '.join(s + '.csv' for s in CSV_SPLITS)}")
    for f in files:
        for ex in read_split(f):  # labels ignored
            yield ex.text[:MAX_DOC_CHARS], len(ex.text) > MAX_DOC_CHARS


def _store_documents(path: Path) -> Iterator[tuple[str, bool]]:
    from filterd.store.labels import LabelStore

    with LabelStore(path) as store:
        for row in store.rows():
            yield row.text[:MAX_DOC_CHARS], len(row.text) > MAX_DOC_CHARS


def _reservoir_documents(path: Path) -> Iterator[tuple[str, bool]]:
    from filterd.store.reservoir import read_reservoir

    for sampled in read_reservoir(path):  # already clipped by the daemon
        yield sampled.text[:MAX_DOC_CHARS], len(sampled.text) > MAX_DOC_CHARS


def read_corpus(cfg: PretrainConfig) -> Corpus:
    """Read, tokenise and pack every source; DataError when nothing usable is left."""
    skipped: dict[str, int] = {}

    def skip(where: str, reason: str) -> None:
        log.warning("pretrain: skipped %s: %s", where, reason)
        key = reason.split(":")[0]
        skipped[key] = skipped.get(key, 0) + 1

    sources: list[tuple[str, Iterator[tuple[str, bool]]]] = []
    sources += [("text", _text_documents(Path(p), skip)) for p in cfg.text]
    sources += [("mail", _mail_documents(Path(p), skip)) for p in cfg.mail]
    sources += [("csv", _csv_documents(Path(p))) for p in cfg.csv]
    if cfg.store:
        sources.append(("store", _store_documents(Path(cfg.store))))
    sources += [("reservoir", _reservoir_documents(Path(p))) for p in cfg.reservoir]

    enc = _encoding()
    digest = hashlib.sha256()
    streams: dict[bool, list[np.ndarray]] = {False: [], True: []}
    documents: dict[str, int] = {}
    clipped = 0
    cut = int(cfg.val_fraction * 2**32)
    for kind, docs in sources:
        for text, was_clipped in docs:
            data = text.encode("utf-8", "replace")
            digest.update(len(data).to_bytes(8, "little") + data)
            h = int.from_bytes(hashlib.blake2b(data, digest_size=4, key=str(cfg.seed).encode()).digest(), "little")
            ids = enc.encode_ordinary(text)
            ids.append(EOT)
            streams[h < cut].append(np.asarray(ids, dtype=np.uint16))
            documents[kind] = documents.get(kind, 0) + 1
            clipped += was_clipped
    total = sum(documents.values())
    if total == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.items())
        raise DataError("pretrain: the corpus has no text" + (f" (skipped: {reasons})" if reasons else ""))
    if cfg.val_fraction > 0 and not streams[True] and len(streams[False]) > 1:
        streams[True].append(streams[False].pop())  # a small corpus still gets a held-out loss
    train_docs, val_docs = len(streams[False]), len(streams[True])
    if not streams[False]:
        streams[False], streams[True] = streams[True], []
        train_docs, val_docs = val_docs, 0
    join = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)  # noqa: E731
    train = np.concatenate([np.array([EOT], dtype=np.uint16), join(streams[False])])  # every block starts after an EOT
    return Corpus(train, join(streams[True]), documents, train_docs, val_docs, skipped, clipped, digest.hexdigest())


# --------------------------------------------------------------------------- Hugging Face export


def hf_config(cfg: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": 0.02,
        "bos_token_id": EOT, "eos_token_id": EOT, "tie_word_embeddings": True,
    }  # fmt: skip


def hf_state_dict(model: GPT2Classifier) -> dict[str, torch.Tensor]:
    """The backbone under Hugging Face's GPT2LMHeadModel names (the inverse of weights.map_hf_state_dict).

    Conv1D weights are stored (in, out), so ours are transposed; the LM head is tied to wte and
    the spam head is no part of a GPT-2 checkpoint, so neither is written.
    """
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("head."):
            continue
        t = t.detach().to("cpu", torch.float32)
        out[f"transformer.{name}"] = (t.t() if name.endswith(HF_CONV1D) else t).contiguous()
    return out


def write_checkpoint(model: GPT2Classifier, directory: Path, record: dict) -> None:
    from safetensors.torch import save_file

    (directory / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
    save_file(hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "model.safetensors").chmod(0o644)
    (directory / PRETRAIN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- resume state


def state_dir_for(out: Path) -> Path:
    """Beside OUT, not inside it: OUT only ever appears complete."""
    out = Path(out)
    return out.parent / f".{out.name}.pretrain-state"


def _fingerprint(cfg: PretrainConfig, corpus: Corpus) -> dict:
    return {"base": cfg.base, "corpus_sha256": corpus.sha256, "block_size": cfg.block_size, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "val_fraction": cfg.val_fraction}  # fmt: skip


def _save_state(
    directory: Path, model: GPT2Classifier, optimizer: torch.optim.Optimizer, gen: torch.Generator, info: dict
) -> None:
    """Weights, AdamW moments and the sampler's RNG in safetensors, the rest in JSON; replaced atomically."""
    from safetensors.torch import save_file

    staged = staging_dir(directory)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(staged / "model.safetensors"))
        moments: dict[str, torch.Tensor] = {"rng": gen.get_state()}
        for i, p in enumerate(optimizer.param_groups[0]["params"]):
            st = optimizer.state.get(p)
            if st:
                for k in ("exp_avg", "exp_avg_sq"):
                    moments[f"{i}.{k}"] = st[k].detach().cpu().contiguous()
                moments[f"{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        save_file(moments, str(staged / "optimizer.safetensors"))
        (staged / "state.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        publish_directory(staged, directory)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _load_state(
    directory: Path, model: GPT2Classifier, optimizer: torch.optim.Optimizer, gen: torch.Generator, fingerprint: dict
) -> dict:
    from safetensors.torch import load_file

    try:
        info = json.loads((directory / "state.json").read_text())
        weights = load_file(str(directory / "model.safetensors"))
        moments = load_file(str(directory / "optimizer.safetensors"))
    except Exception as e:  # truncated or foreign files: never half-resume
        raise DataError(
            f"{directory}: cannot read the pretraining state ({str(e).splitlines()[0] if str(e) else type(e).__name__}); delete it to start over"
        ) from None
    if info.get("fingerprint") != fingerprint:
        diff = sorted(k for k in fingerprint if info.get("fingerprint", {}).get(k) != fingerprint[k])
        raise DataError(
            f"{directory}: saved for a different run ({', '.join(diff)} changed); delete it to start over, or rerun with the same settings"
        )
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in weights.items()})
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        if f"{i}.exp_avg" in moments:
            optimizer.state[p] = {
                "step": moments[f"{i}.step"].reshape(()).clone(),
                "exp_avg": moments[f"{i}.exp_avg"].to(device),
                "exp_avg_sq": moments[f"{i}.exp_avg_sq"].to(device),
            }
    gen.set_state(moments["rng"])
    return info


# --------------------------------------------------------------------------- training


def lm_loss(model: GPT2Classifier, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    with autocast(device):
        logits = model.lm_logits(x)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))


def _batch(stream: torch.Tensor, block: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(stream) - block, (batch,), generator=gen)
    rows = torch.stack([stream[s : s + block + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def val_loss(model: GPT2Classifier, stream: torch.Tensor, block: int, device: torch.device, batch: int = 8) -> float | None:
    """Mean next-token loss over consecutive blocks of the held-out stream (at most VAL_MAX_BLOCKS)."""
    n = min((len(stream) - 1) // block, VAL_MAX_BLOCKS)
    if n < 1:
        return None
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch):
        rows = torch.stack([stream[j * block : j * block + block + 1] for j in range(i, min(i + batch, n))]).to(device)
        total += lm_loss(model, rows[:, :-1], rows[:, 1:], device).item() * len(rows)
    model.train(was)
    return total / n


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop reads between steps (no half-applied optimiser step)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    cfg.validate()
    torch.manual_seed(cfg.seed)
    out, state_dir = Path(cfg.out), state_dir_for(Path(cfg.out))
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if state_dir.exists() and not cfg.resume:
        raise DataError(f"{state_dir}: an interrupted pretraining run is saved there; add --resume to continue it, or delete it")
    corpus = read_corpus(cfg)
    device = pick_device(cfg.device)
    base = resolve_base(cfg.base)
    block = min(cfg.block_size, base.config.n_positions, len(corpus.train) - 1)
    if block < 2:
        raise DataError(f"pretrain: the corpus is too small ({len(corpus.train) - 1} tokens)")
    if block < cfg.block_size:
        log.warning("pretrain: block size %d -> %d (corpus or model positions)", cfg.block_size, block)
    train_t, val_t = torch.from_numpy(corpus.train.astype(np.int64)), torch.from_numpy(corpus.val.astype(np.int64))

    model = build_model(base, seed=cfg.seed).to(device)
    model.head.requires_grad_(False)  # the LM objective never reaches the spam head
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    fingerprint = _fingerprint(cfg, corpus)

    step = tokens = 0
    elapsed_before = 0.0
    v_before: float | None
    if cfg.resume and state_dir.exists():
        info = _load_state(state_dir, model, optimizer, gen, fingerprint)
        step, tokens, elapsed_before, v_before = info["step"], info["tokens_seen"], info["seconds"], info["val_loss_before"]
        _log(f"pretrain: resuming at step {step} from {state_dir}")
    else:
        if cfg.resume:
            _log(f"pretrain: nothing to resume at {state_dir}; starting at step 0")
        v_before = val_loss(model, val_t, block, device)
    resumed_from = step
    max_steps = cfg.max_steps
    warmup = min(cfg.warmup, max_steps // 10) if max_steps else cfg.warmup
    _log(
        f"pretrain: base {base.name} ({base.kind}), {sum(corpus.documents.values())} documents "
        f"({', '.join(f'{k} {n}' for k, n in corpus.documents.items())}), {len(corpus.train):,} train / {len(corpus.val):,} "
        f"held-out tokens, skipped {sum(corpus.skipped.values())}, clipped {corpus.clipped}, block {block}, "
        f"batch {cfg.batch_size}, device {device}, held-out loss {_fmt(v_before)}"
    )

    def state_info() -> dict:
        return {"step": step, "tokens_seen": tokens, "seconds": elapsed_before + time.perf_counter() - t_run,
                "val_loss_before": v_before, "fingerprint": fingerprint}  # fmt: skip

    t_run = time.perf_counter()
    history: dict[str, list] = {"step": [], "train_loss": [], "val_loss": []}
    bar = tqdm(total=max_steps, initial=step, desc="pretrain", disable=None if cfg.progress is None else not cfg.progress,
               leave=False, file=sys.stderr)  # fmt: skip
    window: list[float] = []
    model.train()
    with _StopFlag() as stop:
        try:
            while max_steps is None or step < max_steps:
                if cfg.time_s is not None and elapsed_before + time.perf_counter() - t_run >= cfg.time_s:
                    break
                lr = cfg.lr * min(1.0, (step + 1) / warmup) if warmup else cfg.lr
                for g in optimizer.param_groups:
                    g["lr"] = lr
                x, y = _batch(train_t, block, cfg.batch_size, gen)
                loss = lm_loss(model, x.to(device), y.to(device), device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                step += 1
                tokens += x.numel()
                window.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1]:.3f}")
                if cfg.on_step is not None:
                    cfg.on_step(step)
                if step % cfg.eval_every == 0:
                    v = val_loss(model, val_t, block, device)
                    for k, val in (("step", step), ("train_loss", sum(window) / len(window)), ("val_loss", v)):
                        history[k].append(val)
                    window = []
                    if bar.disable:
                        _log(f"pretrain: step {step}: train loss {history['train_loss'][-1]:.4f} held-out loss {_fmt(v)}")
                if stop.signal is not None:
                    _save_state(state_dir, model, optimizer, gen, state_info())
                    raise PretrainInterrupted(
                        f"pretrain: stopped by {signal.Signals(stop.signal).name} at step {step}; state saved in {state_dir}, rerun with --resume"
                    )
                if step % cfg.checkpoint_every == 0 and (max_steps is None or step < max_steps):
                    _save_state(state_dir, model, optimizer, gen, state_info())
        finally:
            bar.close()

    v_after = val_loss(model, val_t, block, device)
    seconds = elapsed_before + time.perf_counter() - t_run
    record = {
        "base": base.name, "base_kind": base.kind, "config": asdict(base.config), "objective": "next-token",
        "corpus": {"sha256": corpus.sha256, "documents": corpus.documents, "train_documents": corpus.train_docs,
                   "held_out_documents": corpus.val_docs, "train_tokens": int(len(corpus.train)),
                   "held_out_tokens": int(len(corpus.val)), "skipped": corpus.skipped, "clipped": corpus.clipped},
        "steps": step, "tokens_seen": tokens, "block_size": block, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "weight_decay": cfg.weight_decay, "warmup": warmup, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
        "val_loss_before": v_before, "val_loss_after": v_after, "seconds": round(seconds, 1), "resumed_from": resumed_from,
        "device": str(device), "history": history,
    }  # fmt: skip
    staged = staging_dir(out)
    try:
        write_checkpoint(model.cpu(), staged, record)
        publish_directory(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(state_dir, ignore_errors=True)  # the run is complete: nothing left to resume
    _log(
        f"pretrain: wrote {out}: {step} steps, {tokens:,} tokens, held-out loss {_fmt(v_before)} -> {_fmt(v_after)}, {seconds:.1f}s"
    )
    return PretrainResult(out, step, tokens, v_before, v_after, seconds, resumed_from, record)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
