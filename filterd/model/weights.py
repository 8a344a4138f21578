"""filterd's model directory: safetensors + `filterd.json` (never pickle), written, published atomically, and
loaded with every tensor checked by name and shape (an error names the tensor at fault). Where a fit
starts (Hugging Face checkpoints, `random:` bases) is filterd.model.bases."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from filterd.errors import ModelError
from filterd.model.gpt2 import LABELS, PAD_TOKEN_ID, GPT2Classifier, GPTConfig, state_shapes

FORMAT = "filterd-model/1"
META_FILE = "filterd.json"
WEIGHTS_FILE = "model.safetensors"

# A version names a directory (models_dir/versions/<version>), a metric label and a field in
# filterd:out: one path component of visible ASCII, never "." or "..", no separators or controls.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_version(version: object, source: str) -> str:
    """`version` if it is safe to use as a directory name and a field value; ModelError otherwise."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise ModelError(
            f"{source}: invalid version {version!r}: 1-128 characters of A-Z a-z 0-9 . _ + -, starting with a letter or digit"
        )
    return version


# -- filterd model directories ------------------------------------------------------------------
@dataclass
class ModelMeta:
    """Contents of `filterd.json`."""

    version: str
    base: str
    base_kind: str  # "pretrained" | "random" | "self-pretrained": an untrained backbone must never pass for GPT-2
    config: GPTConfig
    max_length: int
    threshold: float = 0.5
    trainable: str = "last-block"
    metrics: dict[str, Any] = field(default_factory=dict)
    data_manifest_sha256: str | None = None
    weights_sha256: str = ""
    created: str = ""
    labels: list[str] = field(default_factory=lambda: list(LABELS))
    pad_token_id: int = PAD_TOKEN_ID
    pooling: str = "last-token"
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    # Thresholds that meet ham-FPR targets, with what each costs in spam (trainer/operating.py writes them).
    operating_points: list[dict[str, Any]] = field(default_factory=list)

    def fpr_thresholds(self) -> dict[float, float]:
        """Ham-FPR target -> the threshold the fit measured for it (targets it could not estimate left out)."""
        return {float(p["ham_fpr_target"]): float(p["threshold"]) for p in self.operating_points
                if isinstance(p, dict) and p.get("threshold") is not None and "ham_fpr_target" in p}  # fmt: skip

    def to_json(self) -> str:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> "ModelMeta":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ModelError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ModelError(f"{source}: expected a JSON object")
        if d.get("format") != FORMAT:
            raise ModelError(f"{source}: format {d.get('format')!r} is not {FORMAT!r}")
        for key in ("version", "base", "config", "max_length"):
            if key not in d:
                raise ModelError(f"{source}: missing key {key!r}")
        if d.get("labels", list(LABELS)) != list(LABELS) or d.get("pooling", "last-token") != "last-token":
            raise ModelError(f"{source}: labels must be {list(LABELS)} and pooling 'last-token'")
        try:
            d["config"] = GPTConfig.from_dict(d["config"])
            known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            meta = cls(**known)
        except (TypeError, ValueError) as e:
            raise ModelError(f"{source}: invalid value ({e})") from None
        if not 1 <= int(meta.max_length) <= meta.config.n_positions:
            raise ModelError(f"{source}: max_length {meta.max_length} outside 1..{meta.config.n_positions}")
        if not 0.0 <= float(meta.threshold) <= 1.0:
            raise ModelError(f"{source}: threshold {meta.threshold} outside 0..1")
        for point in meta.operating_points:
            t = point.get("threshold") if isinstance(point, dict) else "?"
            if t is not None and not (isinstance(t, (int, float)) and 0.0 <= t <= 1.0):
                raise ModelError(f"{source}: operating point threshold {t!r} outside 0..1")
        check_version(meta.version, source)
        return meta


def new_version(weights_sha256: str) -> str:
    """Unique per export, sortable by time, and traceable to the weights."""
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{weights_sha256[:8]}-{secrets.token_hex(2)}"


def write_model_files(model: GPT2Classifier, meta: ModelMeta, directory: Path) -> ModelMeta:
    """Write weights and metadata into `directory` (a staging directory; see publish_directory)."""
    from safetensors.torch import save_file

    if meta.version:  # before writing anything
        check_version(meta.version, str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"format": "pt", "filterd": FORMAT})
    os.chmod(weights, 0o644)  # safetensors writes 0600; the daemon may run as another user than the trainer
    meta.weights_sha256 = _sha256_file(weights)
    meta.version = check_version(meta.version or new_version(meta.weights_sha256), str(directory))
    meta.created = meta.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    (directory / META_FILE).write_text(meta.to_json())
    return meta


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for p in sorted(directory.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def staging_dir(target: Path) -> Path:
    """A fresh sibling of `target` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    d = target.parent / f".{target.name}.staging-{os.getpid()}-{secrets.token_hex(3)}"
    d.mkdir()
    return d


def publish_directory(staged: Path, target: Path) -> None:
    """Make a fully written `staged` directory appear at `target`: readers see old or new, never half.

    A new target is one rename. An existing one is swapped with renameat2(RENAME_EXCHANGE), so the
    path never disappears; where the kernel lacks it, two renames leave a moment with no directory
    (never a partial one).
    """
    _fsync_tree(staged)
    if not target.exists():
        os.rename(staged, target)
        return
    if _exchange(staged, target):
        shutil.rmtree(staged)  # now holds the old contents
        return
    old = target.parent / f".{target.name}.old-{secrets.token_hex(3)}"
    os.rename(target, old)
    os.rename(staged, target)
    shutil.rmtree(old)


def load_model_dir(path: Path, *, map_location: str | torch.device = "cpu") -> tuple[GPT2Classifier, ModelMeta]:
    """Load a filterd model directory, checking every tensor's name and shape against filterd.json."""
    from safetensors import safe_open

    path = Path(path)
    meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
    try:
        is_dir = path.is_dir()
    except OSError as e:  # EACCES on a parent directory, a name too long...: not "missing", and not a crash
        raise ModelError(f"{path}: cannot open the model directory ({e.strerror or type(e).__name__})") from None
    if not is_dir:
        raise ModelError(f"{path}: no such model directory")
    try:  # read first: is_file() says False for a file we may not stat, which is not "missing"
        meta_text = meta_path.read_text(errors="replace")
    except FileNotFoundError:
        raise ModelError(f"{path}: no {META_FILE} (not a filterd model directory)") from None
    except OSError as e:  # unreadable (permissions), a directory, a dangling link, an I/O error
        raise ModelError(f"{meta_path}: cannot read ({e.strerror or type(e).__name__})") from None
    if not weights_path.is_file():
        raise ModelError(f"{path}: no {WEIGHTS_FILE}")
    meta = ModelMeta.from_json(meta_text, str(meta_path))
    expected = state_shapes(meta.config)
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for key in keys:
                if key not in expected:
                    raise ModelError(f"{weights_path}: unexpected tensor {key!r}")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise ModelError(f"{weights_path}: tensor {key!r} has shape {shape}, expected {expected[key]}")
                state[key] = f.get_tensor(key).to(torch.float32)
    except ModelError:
        raise
    except Exception as e:  # truncated or corrupt safetensors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{weights_path}: cannot read weights ({reason})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelError(f"{weights_path}: missing tensor {missing[0]!r}")
    bad = next((k for k, t in state.items() if not torch.isfinite(t).all()), None)
    if bad:
        raise ModelError(f"{weights_path}: tensor {bad!r} contains NaN or infinity")
    with torch.device("meta"):  # skip the random init that the loaded weights would overwrite
        model = GPT2Classifier(meta.config)
    model.load_state_dict(state, assign=True)
    model.eval()
    return model.to(map_location), meta
