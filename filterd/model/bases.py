"""Where a fit starts: GPT-2 weights from a Hugging Face checkpoint, or a `random:` base.

Hugging Face stores GPT-2's attention and MLP weights as Conv1D, i.e. transposed relative to
nn.Linear; `attn.bias` / `attn.masked_bias` are causal-mask buffers, not weights. Every tensor is
checked by name and shape, and an error names the tensor at fault.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from filterd.errors import ModelError
from filterd.model.gpt2 import CONFIGS, GPT2Classifier, GPTConfig, state_shapes

PRETRAINED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_REPO = {name: f"openai-community/{name}" for name in PRETRAINED_NAMES}
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"

# Hugging Face Conv1D modules whose weight is stored (in, out) and must be transposed.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers and tied copies that some checkpoints carry and we do not load.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# -- Hugging Face checkpoints --------------------------------------------------------------------
def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """Our config from a Hugging Face GPT-2 `config.json`; refuses variants we do not implement."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ModelError(f"{source}: model_type {hf.get('model_type')!r} is not gpt2")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ModelError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise ModelError(f"{source}: {flag}=true is not supported")
    try:
        n_embd = int(hf["n_embd"])
        cfg = GPTConfig(
            vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf.get("n_positions") or hf["n_ctx"]),
            n_embd=n_embd,
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{source}: missing or invalid GPT-2 setting ({e})") from None
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise ModelError(f"{source}: n_inner={hf['n_inner']} (only 4*n_embd is supported)")
    return cfg


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # Never unpickle arbitrary objects: weights_only restricts torch.load to tensors.
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/torch raise many types for truncated or foreign files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{path}: cannot read weights ({reason})") from None


def map_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Rename and transpose a Hugging Face GPT-2 state dict into our backbone's names.

    Every expected tensor must be present with the expected shape; unknown tensors are refused.
    The classification head is not part of a GPT-2 checkpoint and is left out.
    """
    expected = state_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        key = name.removeprefix("transformer.")
        if key.endswith(_IGNORED_SUFFIXES) or key == "lm_head.weight":
            continue  # causal-mask buffers; the LM head is tied to wte
        if key not in expected or key.startswith("head."):
            raise ModelError(f"{source}: unexpected tensor {name!r} (not a GPT-2 weight)")
        conv1d = key.endswith(_CONV1D)
        want = expected[key][::-1] if conv1d else expected[key]  # shapes as the file stores them
        if tuple(tensor.shape) != want:
            raise ModelError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {want} for this config")
        out[key] = (tensor.t() if conv1d else tensor).to(torch.float32).contiguous()
    missing = [k for k in expected if k not in out and not k.startswith("head.")]
    if missing:
        raise ModelError(
            f"{source}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    return out


def load_hf_checkpoint(directory: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and mapped backbone weights from a Hugging Face GPT-2 checkpoint directory."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{directory}: no config.json (not a Hugging Face GPT-2 checkpoint)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_path}: cannot parse ({e})") from None
    cfg = config_from_hf(hf_cfg, str(cfg_path))
    for fname in ("model.safetensors", "pytorch_model.bin"):
        if (directory / fname).is_file():
            path = directory / fname
            break
    else:
        raise ModelError(f"{directory}: no model.safetensors or pytorch_model.bin")
    return cfg, map_hf_state_dict(_read_state_file(path), cfg, str(path))


# -- resolving a BASE ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Base:
    """What a fine-tune starts from: a config, weights (None for random init), and provenance."""

    name: str  # as given: "gpt2", "random:tiny", "/path/to/checkpoint"
    kind: str  # "pretrained" | "random" | "self-pretrained" (trained here by `pretrain` from random weights)
    config: GPTConfig
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    source: str = ""  # where the weights came from


def hf_cache_candidates(name: str) -> list[Path]:
    """Directories that may hold a checkpoint for a named size, in search order."""
    out: list[Path] = []
    if env := os.environ.get("FILTERD_GPT2_DIR"):
        root = Path(env)
        out += [root / name, root]
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    for repo in (HF_REPO[name], name):
        snaps = hub / f"models--{repo.replace('/', '--')}" / "snapshots"
        if snaps.is_dir():
            out += sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    out.append(Path.home() / ".cache" / "filterd" / name)
    return out


def _is_checkpoint(d: Path, name: str) -> bool:
    if not (d / "config.json").is_file():
        return False
    if not ((d / "model.safetensors").is_file() or (d / "pytorch_model.bin").is_file()):
        return False
    try:  # $FILTERD_GPT2_DIR itself may hold another size: check it is the one asked for
        hf = json.loads((d / "config.json").read_text())
        return config_from_hf(hf, str(d)) == CONFIGS[name]
    except (ModelError, ValueError, OSError):
        return False


def download_pretrained(name: str, dest: Path, timeout: float = 30.0) -> Path:
    """Fetch config.json + model.safetensors from huggingface.co into `dest` (atomically per file)."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("FILTERD_OFFLINE"):
        raise ModelError(_offline_hint(name, "offline mode is set (HF_HUB_OFFLINE/FILTERD_OFFLINE)"))
    dest.mkdir(parents=True, exist_ok=True)
    for fname in ("config.json", "model.safetensors"):
        target = dest / fname
        if target.is_file():
            continue
        tmp = dest / f".{fname}.part-{os.getpid()}"
        url = HF_URL.format(repo=HF_REPO[name], file=fname)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                shutil.copyfileobj(resp, f, length=1 << 20)
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            tmp.unlink(missing_ok=True)
            reason = getattr(e, "reason", None) or e
            raise ModelError(_offline_hint(name, f"download of {url} failed: {reason}")) from None
    return dest


def _offline_hint(name: str, why: str) -> str:
    return (
        f"cannot get pretrained {name}: {why}; put a Hugging Face GPT-2 checkpoint (config.json + "
        f"model.safetensors) in $FILTERD_GPT2_DIR/{name} or pass --base DIR, or use --base random:{name} for an untrained model"
    )


def _checkpoint_kind(directory: Path) -> str:
    """"pretrained", or "self-pretrained" for `filterd-trainer pretrain` output grown from random weights: such a
    backbone learned only from this site's text and must never pass for GPT-2 (its pretrain.json says where it began)."""
    try:
        record = json.loads((directory / "pretrain.json").read_text())
    except (OSError, ValueError):
        return "pretrained"
    return "self-pretrained" if isinstance(record, dict) and record.get("base_kind") in ("random", "self-pretrained") else "pretrained"


def resolve_base(base: str) -> Base:
    """`gpt2`… (local cache, $FILTERD_GPT2_DIR, or download), a checkpoint directory, or `random:NAME`."""
    if base.startswith("random:"):
        size = base.split(":", 1)[1]
        if size not in CONFIGS:
            raise ModelError(f"unknown base {base!r}: random: takes one of {', '.join(CONFIGS)}")
        return Base(name=base, kind="random", config=CONFIGS[size], source="random initialisation")
    if base in PRETRAINED_NAMES:
        found = next((d for d in hf_cache_candidates(base) if _is_checkpoint(d, base)), None)
        directory = found or download_pretrained(base, Path.home() / ".cache" / "filterd" / base)
        cfg, state = load_hf_checkpoint(directory)
        return Base(name=base, kind="pretrained", config=cfg, state=state, source=str(directory))
    path = Path(base)
    if path.is_dir():
        cfg, state = load_hf_checkpoint(path)
        return Base(name=str(path.resolve()), kind=_checkpoint_kind(path), config=cfg, state=state, source=str(path.resolve()))
    raise ModelError(
        f"unknown base {base!r}: use {', '.join(PRETRAINED_NAMES)}, a Hugging Face checkpoint directory, "
        f"or random:NAME with NAME in {', '.join(CONFIGS)}"
    )


def build_model(base: Base, *, seed: int = 123) -> GPT2Classifier:
    """A classifier from a base: pretrained backbone weights + a freshly initialised head."""
    torch.manual_seed(seed)
    model = GPT2Classifier(base.config)
    model.reset_parameters(seed=seed)
    if base.state is not None:
        result = model.load_state_dict(base.state, strict=False)
        if result.unexpected_keys or set(result.missing_keys) != {"head.weight", "head.bias"}:
            raise ModelError(f"{base.source}: weights do not match the model ({result})")
    return model
