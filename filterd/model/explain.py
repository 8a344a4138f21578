"""Why a message scored as it did: the words that raised and lowered P(spam) most, with signed weights.

Four methods, measured against each other in bench/explain.py (faithfulness and cost, bench/RESULTS.md
section 13); `integrated-gradients` is the default: on the SpamAssassin test split, deleting its top-5
raising words lowered the spam logit significantly more than any other method's (paired bootstrap),
at a cost that lets it run on every spam at a small site's rate.
- `occlusion`: delete each word's tokens and score what is left (batched forward passes, no backward).
  A word's weight is the full text's spam logit minus the logit without it: what that word is worth,
  in the unit the decision uses (log-odds; P(spam) = sigmoid(logit)). It answers exactly "what if this
  one word were not there": deleting any one top raising word alone lowers the score by its weight.
  Deleting several at once is not the sum (words interact), which is what the bench measures.
- `gradient`: gradient x input at the token embeddings, one forward and one backward pass. Cheap, but a
  first-order guess; its weights are not in log-odds (a local linear estimate of them).
- `integrated-gradients` (the default): gradient x input averaged over a straight path from a zero token
  embedding (`IG_STEPS` midpoints, one batched forward and backward pass). Its weights add up (over
  all tokens) to the logit of the text minus the logit of the all-zero input: log-odds, shared out.
- `screened-occlusion`: the gradient screens, occlusion weighs. One backward pass ranks the
  words by |gradient x input|; the `SCREEN` (at least 4 x top) strongest are occluded, so the cost is
  bounded (~SCREEN forward passes) however long the message, and every reported weight is an occlusion
  weight. Full occlusion costs one pass per word (hundreds for a 1,024-token mail).

Tokens are merged into words as GPT-2's BPE splits them: a piece that starts with whitespace starts a
new word, so " viagra" + "!!" is one word. Offsets index the text the model read (after mail
extraction; only the head that fits `max_length` tokens is explained). Everything is deterministic: no
sampling, ties broken by position, and `explain` runs its passes in fixed-size batches in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from filterd.config import EXPLAIN_METHODS
from filterd.model.gpt2 import LABELS, PAD_TOKEN_ID, GPT2Classifier
from filterd.model.tokenizer import CHARS_PER_TOKEN_BOUND, _encoding, pad_batch

if TYPE_CHECKING:
    from filterd.model.engine import Engine

METHODS = EXPLAIN_METHODS  # (in config.py, which must not import torch)
DEFAULT_METHOD = "integrated-gradients"  # the most faithful on the SpamAssassin split (bench/explain.py)
DEFAULT_TOP = 5
IG_STEPS = 16
SCREEN = 24  # screened-occlusion: words kept by the gradient screen, at least 4 x top
OCCLUSION_BATCH_TOKENS = 16384  # padded tokens per forward pass while occluding (bounds memory, not results)
MAX_WORD_CHARS = 64  # a "word" of 2,000 characters (a base64 line) is reported by its head


@dataclass(frozen=True)
class Contribution:
    word: str  # the word as it appears in the text
    start: int  # character offsets of the word in the text the model read
    end: int
    weight: float  # signed, in spam log-odds (logit) units: > 0 raised P(spam), < 0 lowered it


@dataclass(frozen=True)
class Explanation:
    score: float  # P(spam) of the full text
    method: str
    words: tuple[Contribution, ...]  # top raising and top lowering words, strongest first

    def to_json(self) -> dict:
        return {"score": self.score, "method": self.method,
                "words": [{"word": c.word, "start": c.start, "end": c.end, "weight": round(c.weight, 6)} for c in self.words]}  # fmt: skip

    @property
    def raising(self) -> tuple[Contribution, ...]:
        return tuple(c for c in self.words if c.weight > 0)

    @property
    def lowering(self) -> tuple[Contribution, ...]:
        return tuple(c for c in self.words if c.weight < 0)


@dataclass(frozen=True)
class Word:
    """One unit of explanation: token indices [first, last) and the characters they cover."""

    first: int
    last: int
    start: int
    end: int
    text: str


def token_offsets(text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) character offsets of each token in `text`, which the tokens encode (a prefix of it).

    GPT-2's BPE works on UTF-8 bytes, so one character can span tokens: such a token gets the
    characters it completes (a token holding only the first bytes of a character is empty).
    """
    enc = _encoding()
    data = text.encode("utf-8", "surrogatepass")
    # character index at each byte offset (the character that byte belongs to) + one past the end
    char_at = [0] * (len(data) + 1)
    b = 0
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8", "surrogatepass"))
        char_at[b : b + n] = [i] * n
        b += n
    char_at[len(data)] = len(text)
    out, pos = [], 0
    for t in ids:
        n = len(enc.decode_single_token_bytes(t)) if t != PAD_TOKEN_ID or pos < len(data) else 0
        s, e = pos, min(len(data), pos + n)
        # a character belongs to the token holding its last byte
        cs = char_at[s] if s == 0 or char_at[s - 1] != char_at[s] else char_at[s] + 1
        ce = char_at[e - 1] + 1 if e > s else cs
        out.append((min(cs, ce), ce))
        pos = e
    return out


def words_of(text: str, ids: Sequence[int]) -> list[Word]:
    """Tokens merged into words: a token whose text starts with whitespace starts a new word; whitespace-only
    runs are no word (nothing to report, so not occluded either)."""
    offsets = token_offsets(text, ids)
    pieces = [text[s:e] for s, e in offsets]
    words: list[Word] = []
    first = 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and not (pieces[i][:1].isspace() or pieces[i - 1][-1:].isspace()):
            continue  # a piece inside a word
        start, end = offsets[first][0], offsets[i - 1][1]
        raw = text[start:end]
        stripped = raw.strip()
        if stripped:
            lead = len(raw) - len(raw.lstrip())
            words.append(Word(first, i, start + lead, start + lead + len(stripped), stripped[:MAX_WORD_CHARS]))
        first = i
    return words


def spam_logit(logits: torch.Tensor) -> torch.Tensor:
    """log P(spam)/P(ham) from (B, 2) class logits: the score before the sigmoid."""
    spam = LABELS.index("spam")
    return logits[:, spam].float() - logits[:, 1 - spam].float()


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@torch.inference_mode()
def logits_of(model: GPT2Classifier, sequences: Sequence[Sequence[int]], device: torch.device,
              batch_tokens: int = OCCLUSION_BATCH_TOKENS) -> list[float]:  # fmt: skip
    """Spam logit per sequence, in input order, in batches of at most `batch_tokens` padded tokens."""
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
    out = [0.0] * len(sequences)
    i = 0
    while i < len(order):
        width = len(sequences[order[i]])
        j = i + 1
        while j < len(order) and (j - i + 1) * max(width, len(sequences[order[j]])) <= batch_tokens:
            width = max(width, len(sequences[order[j]]))
            j += 1
        chunk = order[i:j]
        ids, lengths = pad_batch([sequences[k] for k in chunk])
        values = spam_logit(model(ids.to(device), lengths.to(device))).tolist()
        for k, v in zip(chunk, values):
            out[k] = v
        i = j
    return out


def _logit_from_embeddings(model: GPT2Classifier, emb: torch.Tensor) -> torch.Tensor:
    """The spam logit from token embeddings (B, T, C) of unpadded sequences: model.pooled, from the embedding on."""
    B, T, _ = emb.shape
    x = model.drop(emb + model.wpe(torch.arange(T, device=emb.device)))
    for block in model.h[:-1]:
        x = block(x)
    idx = torch.full((B,), T - 1, device=emb.device, dtype=torch.long)
    return spam_logit(model.head(model.ln_f(model.h[-1].forward_at(x, idx))))


def _token_gradient_x_input(model: GPT2Classifier, ids: list[int], device: torch.device, steps: int) -> list[float]:
    """Per-token attribution: gradient x input (steps=1) or integrated gradients from a zero embedding."""
    with torch.no_grad():
        emb = model.wte(torch.tensor([ids], device=device)).float()
    dtype = next(model.parameters()).dtype
    if steps <= 1:
        alphas = torch.ones(1, 1, 1, device=device)
    else:  # midpoint rule: deterministic, no endpoint counted twice
        alphas = ((torch.arange(steps, device=device, dtype=torch.float32) + 0.5) / steps).view(-1, 1, 1)
    path = (alphas * emb).to(dtype).requires_grad_(True)
    with torch.enable_grad():
        logits = _logit_from_embeddings(model, path)
        (grad,) = torch.autograd.grad(logits.sum(), path)  # w.r.t. the input only: parameters' .grad untouched
    return (grad.float().mean(dim=0) * emb[0]).sum(dim=-1).tolist()


def attribute(
    engine: Engine, text: str, method: str = DEFAULT_METHOD, screen: int = SCREEN
) -> tuple[float, list[Word], list[float]]:
    """(full-text spam logit, words, weight per word) for one text; the raw material of `explain` and the bench.

    screened-occlusion returns only the `screen` words the gradient screen kept (the others are not weighed)."""
    if method not in METHODS:
        raise ValueError(f"explanation method must be one of {', '.join(METHODS)}, got {method!r}")
    ids = engine.tokenizer.encode(text)
    read = text[: engine.tokenizer.max_length * CHARS_PER_TOKEN_BOUND]
    words = words_of(read, ids) if ids != [PAD_TOKEN_ID] or text else []
    model, device = engine.model, engine.device
    if method == "occlusion":
        return _occlude(model, device, ids, words)
    if method == "screened-occlusion" and len(words) <= screen:
        return _occlude(model, device, ids, words)
    full = logits_of(model, [ids], device)[0]
    per_token = _token_gradient_x_input(model, ids, device, 1 if method != "integrated-gradients" else IG_STEPS)
    weights = [sum(per_token[w.first : w.last]) for w in words]
    if method != "screened-occlusion":
        return full, words, weights
    kept = sorted(sorted(range(len(words)), key=lambda i: (-abs(weights[i]), i))[:screen])
    full, _, occluded = _occlude(model, device, ids, [words[i] for i in kept])
    return full, [words[i] for i in kept], occluded


def _occlude(
    model: GPT2Classifier, device: torch.device, ids: list[int], words: list[Word]
) -> tuple[float, list[Word], list[float]]:
    variants = [ids] + [ids[: w.first] + ids[w.last :] or [PAD_TOKEN_ID] for w in words]
    logits = logits_of(model, variants, device)
    return logits[0], words, [logits[0] - x for x in logits[1:]]


def top_words(words: Sequence[Word], weights: Sequence[float], top: int) -> tuple[Contribution, ...]:
    """The `top` strongest raising words, then the `top` strongest lowering ones; ties by position."""
    ranked = sorted(range(len(words)), key=lambda i: (-abs(weights[i]), i))
    up = [i for i in ranked if weights[i] > 0][:top]
    down = [i for i in ranked if weights[i] < 0][:top]
    return tuple(Contribution(words[i].text, words[i].start, words[i].end, float(weights[i])) for i in up + down)


def explain(engine: Engine, text: str, *, top: int = DEFAULT_TOP, method: str = DEFAULT_METHOD) -> Explanation:
    """The words of `text` that raised and lowered P(spam) most (at most `top` of each), strongest first.

    Weights are in spam log-odds (see the module docstring). Runs forward passes on the engine's
    model: call it from a worker thread, never on the event loop.
    """
    full, words, weights = attribute(engine, text, method, max(SCREEN, 4 * top))
    return Explanation(_sigmoid(full), method, top_words(words, weights, top))


def delete_words(ids: Sequence[int], words: Sequence[Word], which: Sequence[int]) -> list[int]:
    """`ids` without the tokens of the words at indices `which` (the faithfulness check's perturbation)."""
    drop = set()
    for i in which:
        drop.update(range(words[i].first, words[i].last))
    return [t for k, t in enumerate(ids) if k not in drop] or [PAD_TOKEN_ID]


def explanation_from_json(obj: Any) -> Explanation:
    """The inverse of `Explanation.to_json` (for readers of stored results)."""
    return Explanation(float(obj["score"]), str(obj["method"]),
                       tuple(Contribution(str(w["word"]), int(w["start"]), int(w["end"]), float(w["weight"])) for w in obj["words"]))  # fmt: skip
