"""GPT-2 with a two-class spam head, in one file.

Numerically the GPT-2 of OpenAI and Hugging Face (pre-norm blocks, tanh-GELU, learned positions,
weight-tied LM head), so pretrained checkpoints load unchanged (see weights.py). The classifier
reads the final hidden state at each message's *last real token*: with right padding and causal
attention a real token never sees the padding after it, so a message scores the same alone or in
any batch. The chapter's recipe read the last *padded* position instead, which made the score
depend on its neighbours' lengths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD_TOKEN_ID = 50256  # <|endoftext|>: GPT-2's only special token, used as padding
LABELS = ("ham", "spam")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # fine-tuning runs without dropout, as the chapter does
    n_labels: int = 2

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def n_params(self, *, embeddings: bool = True) -> int:
        """Parameter count of the backbone + head (tied LM head counted once)."""
        c = self.n_embd
        per_block = 12 * c * c + 13 * c  # attn qkv+proj, mlp fc+proj, two layer norms
        total = self.n_layer * per_block + 2 * c + (c * self.n_labels + self.n_labels)
        if embeddings:
            total += self.vocab_size * c + self.n_positions * c
        return total


CONFIGS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_embd=64, n_layer=2, n_head=2),  # tests and offline demos only
    "small": GPTConfig(n_embd=128, n_layer=4, n_head=4),  # 7.4M; tests and offline demos only (bench/RESULTS.md "Pretraining")
    "gpt2": GPTConfig(n_embd=768, n_layer=12, n_head=12),  # 124M
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),  # 355M
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),  # 774M
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward_at(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The attention output at one position per sequence (`idx`, shape (B,)), shape (B, C).

        Keys and values are needed at every position, the query only at `idx`: a third of c_attn,
        all of c_proj and the attention's other queries are skipped.
        """
        B, T, C = x.shape
        hd = C // self.n_head
        w, b = self.c_attn.weight, self.c_attn.bias
        k, v = F.linear(x, w[C:], b[C:]).split(C, dim=2)
        q = F.linear(x[torch.arange(B, device=x.device), idx], w[:C], b[:C])
        q = q.view(B, self.n_head, 1, hd)
        k, v = (t.view(B, T, self.n_head, hd).transpose(1, 2) for t in (k, v))
        visible = (torch.arange(T, device=x.device) <= idx[:, None]).view(B, 1, 1, T)  # causal, from idx
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.reshape(B, C)))


_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU, 0.5x(1 + tanh(z)), written as x * sigmoid(2z): the same function
    (to float rounding), and on CPU a third cheaper than F.gelu(approximate="tanh"), whose tanh kernel
    is slow (a sixth of the tiny model's forward pass)."""
    return x * torch.sigmoid(_GELU_K * (x + 0.044715 * x * x * x))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The block's output at one position per sequence, shape (B, C): what `forward(x)[arange(B), idx]`
        gives, for about a sixth of the work (the MLP and projections run on B rows, not B x T)."""
        rows = x[torch.arange(x.shape[0], device=x.device), idx] + self.attn.forward_at(self.ln_1(x), idx)
        return rows + self.mlp(self.ln_2(rows))


class GPT2Classifier(nn.Module):
    """GPT-2 backbone + `head` (Linear(n_embd, 2)) for spam; `lm_logits` for generation only."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.head = nn.Linear(cfg.n_embd, cfg.n_labels)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2's initialisation (used for `random:` bases and for a fresh head)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_"):
                nn.init.ones_(p)
            else:
                std = 0.02
                if name.endswith("c_proj.weight"):  # residual projections, scaled by depth as in GPT-2
                    std = 0.02 / math.sqrt(2 * self.config.n_layer)
                with torch.no_grad():
                    p.normal_(0.0, std, generator=gen)

    # -- backbone ---------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, *, frozen_blocks: int = 0, blocks: int | None = None) -> torch.Tensor:
        """Final-block output (before ln_f), shape (B, T, n_embd); with `blocks`, the output of the first N.

        `frozen_blocks`: the embeddings and the first N blocks run without autograd, which saves
        their activations' memory and backward time when only the top of the model is trained.
        """
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"sequence of {T} tokens exceeds the model's {self.config.n_positions} positions")
        pos = torch.arange(T, device=input_ids.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_blocks <= 0):
            x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for i, block in enumerate(self.h[:blocks]):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= frozen_blocks):
                x = block(x)
        return x

    @staticmethod
    def last_token_index(lengths: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Index of each sequence's last real token, from lengths or a (B, T) attention mask."""
        if lengths is None:
            if mask is None:
                raise ValueError("give lengths or an attention mask")
            lengths = mask.long().sum(dim=1)
        if bool((lengths < 1).any()):
            raise ValueError("every sequence needs at least one real token")
        return lengths.long() - 1

    def pooled(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        frozen_blocks: int = 0,
    ) -> torch.Tensor:
        """ln_f(hidden state at each sequence's last real token), shape (B, n_embd).

        Right padding is assumed (real tokens first); without lengths or a mask every position
        is taken as real, i.e. the last position is pooled.
        """
        top = len(self.h) - 1
        h = self.hidden_states(input_ids, frozen_blocks=frozen_blocks, blocks=top)
        if lengths is None and mask is None:
            lengths = torch.full((h.shape[0],), h.shape[1], device=h.device)
        idx = self.last_token_index(lengths, mask).to(h.device)
        # Only the pooled position of the last block reaches the head: the block computes that row alone
        # (keys and values still at every position). ln_f is per position, so it too runs on those rows.
        with torch.set_grad_enabled(torch.is_grad_enabled() and top >= frozen_blocks):
            last = self.h[top].forward_at(h, idx)
        return self.ln_f(last)

    def forward(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        frozen_blocks: int = 0,
    ) -> torch.Tensor:
        """Class logits (B, 2): [ham, spam]. Never computes the vocabulary projection."""
        return self.head(self.pooled(input_ids, lengths, mask, frozen_blocks=frozen_blocks))

    # -- language modelling (weight loading sanity check) -------------------------------------
    def lm_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab) with the LM head tied to the token embedding."""
        return F.linear(self.ln_f(self.hidden_states(input_ids)), self.wte.weight)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation; returns the prompt followed by the new tokens."""
        ids = input_ids
        for _ in range(max_new_tokens):
            context = ids[:, -self.config.n_positions :]
            next_id = self.lm_logits(context)[:, -1, :].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        return ids


def state_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in GPT2Classifier's state dict, without building the model."""
    c = cfg.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (cfg.vocab_size, c),
        "wpe.weight": (cfg.n_positions, c),
    }
    per_block = {
        "ln_1.weight": (c,), "ln_1.bias": (c,),
        "attn.c_attn.weight": (3 * c, c), "attn.c_attn.bias": (3 * c,),
        "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,),
        "ln_2.weight": (c,), "ln_2.bias": (c,),
        "mlp.c_fc.weight": (4 * c, c), "mlp.c_fc.bias": (4 * c,),
        "mlp.c_proj.weight": (c, 4 * c), "mlp.c_proj.bias": (c,),
    }  # fmt: skip
    for i in range(cfg.n_layer):
        shapes.update({f"h.{i}.{k}": v for k, v in per_block.items()})
    shapes.update({"ln_f.weight": (c,), "ln_f.bias": (c,), "head.weight": (cfg.n_labels, c), "head.bias": (cfg.n_labels,)})
    return shapes


def config_for(name: str, **overrides: object) -> GPTConfig:
    """A named size (`tiny`, `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`)."""
    if name not in CONFIGS:
        raise KeyError(name)
    return replace(CONFIGS[name], **overrides)  # type: ignore[arg-type]
