"""Test helpers: Hugging Face-format checkpoints written by the reference implementation."""

from __future__ import annotations

from pathlib import Path

import torch


def write_hf_checkpoint(path: Path, *, n_layer: int, n_head: int, n_embd: int, seed: int = 0, safe: bool = True):
    """A random GPT2LMHeadModel saved as Hugging Face writes it; returns the (eval-mode) model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).eval()
    if safe:
        hf.save_pretrained(path)
    else:  # the older pickle layout: config.json + pytorch_model.bin (Conv1D weights, mask buffers)
        path.mkdir(parents=True, exist_ok=True)
        hf.config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        for i in range(n_layer):  # old checkpoints carry the causal-mask buffers too
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 1024, 1024))
        torch.save(state, path / "pytorch_model.bin")
    return hf
