"""Checkpoint loading, model directories and their failure modes: one clear line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from filterd.errors import ModelError
from filterd.model.bases import build_model, load_hf_checkpoint, resolve_base
from filterd.model.weights import ModelMeta, load_model_dir, publish_directory, staging_dir, write_model_files

from testing.checkpoints import write_hf_checkpoint

TINY = dict(n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-tiny")
    write_hf_checkpoint(path, **TINY)
    return path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_pytorch_bin_checkpoint_loads_like_safetensors(hf_tiny, tmp_path):
    hf = write_hf_checkpoint(tmp_path / "bin", **TINY, safe=False)
    _, state = load_hf_checkpoint(tmp_path / "bin")
    _, state_safe = load_hf_checkpoint(hf_tiny)
    assert state.keys() == state_safe.keys()
    assert torch.equal(state["h.0.attn.c_attn.weight"], hf.transformer.h[0].attn.c_attn.weight.t())


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base(str(_mkdir(tmp_path / "empty")))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(
        json.dumps({"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 50257, "n_positions": 1024})
    )
    with pytest.raises(ModelError, match="no model.safetensors or pytorch_model.bin"):
        resolve_base(str(tmp_path / "noweights"))


def _mkdir(p):
    p.mkdir()
    return p


def test_truncated_checkpoint_names_the_file(hf_tiny, tmp_path):
    d = _copy(hf_tiny, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"model\.safetensors: cannot read weights"):
        resolve_base(str(d))


def test_wrong_shape_names_the_tensor(hf_tiny, tmp_path):
    d = _copy(hf_tiny, tmp_path / "shape")
    state = load_file(str(d / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 100)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight' has shape \(64, 100\)"):
        resolve_base(str(d))


def test_missing_and_unexpected_tensors_are_named(hf_tiny, tmp_path):
    d = _copy(hf_tiny, tmp_path / "missing")
    state = load_file(str(d / "model.safetensors"))
    del state["transformer.ln_f.bias"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelError, match=r"missing tensor 'ln_f\.bias'"):
        resolve_base(str(d))
    state = load_file(str(hf_tiny / "model.safetensors")) | {"transformer.h.0.extra.weight": torch.zeros(3)}
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelError, match=r"unexpected tensor 'transformer\.h\.0\.extra\.weight'"):
        resolve_base(str(d))


def test_unknown_base_and_offline_pretrained(monkeypatch, tmp_path):
    with pytest.raises(ModelError, match="unknown base 'gpt5'"):
        resolve_base("gpt5")
    with pytest.raises(ModelError, match="random: takes one of"):
        resolve_base("random:huge")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FILTERD_GPT2_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"cannot get pretrained gpt2: .*FILTERD_GPT2_DIR/gpt2"):
        resolve_base("gpt2")


def test_named_base_found_in_filterd_gpt2_dir(monkeypatch, hf_tiny, tmp_path):
    """A checkpoint of the right size under $FILTERD_GPT2_DIR/<name> is used; a wrong size is not."""
    monkeypatch.setenv("FILTERD_GPT2_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _copy(hf_tiny, tmp_path / "gpt2")  # tiny config: not gpt2's shape
    with pytest.raises(ModelError, match="cannot get pretrained gpt2"):
        resolve_base("gpt2")


def _tiny_model_dir(tmp_path, name="model"):
    model = build_model(resolve_base("random:tiny"), seed=5)
    meta = ModelMeta(version="", base="random:tiny", base_kind="random", config=model.config, max_length=64)
    staged = staging_dir(tmp_path / name)
    meta = write_model_files(model, meta, staged)
    publish_directory(staged, tmp_path / name)
    return tmp_path / name, model, meta


def test_model_dir_round_trip(tmp_path):
    path, model, meta = _tiny_model_dir(tmp_path)
    loaded, meta2 = load_model_dir(path)
    assert meta2.version == meta.version and meta2.base_kind == "random" and meta2.pad_token_id == 50256
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    on_disk = json.loads((path / "filterd.json").read_text())
    for key in (
        "format",
        "version",
        "base",
        "config",
        "labels",
        "pad_token_id",
        "max_length",
        "threshold",
        "pooling",
        "metrics",
        "data_manifest_sha256",
    ):
        assert key in on_disk
    assert not list(tmp_path.glob(".model.staging-*"))


def test_random_small_resolves_builds_and_classifies(tmp_path):
    """The larger random base: 4 layers, 128 wide; small enough that refit's "auto" still fine-tunes all of it."""
    from filterd.model.engine import Engine
    from trainer.refit import resolve_mode

    base = resolve_base("random:small")
    assert base.kind == "random" and (base.config.n_layer, base.config.n_embd, base.config.n_head) == (4, 128, 4)
    model = build_model(base, seed=5)
    assert sum(p.numel() for p in model.parameters()) == base.config.n_params() > resolve_base("random:tiny").config.n_params()
    meta = ModelMeta(version="", base="random:small", base_kind="random", config=model.config, max_length=64)
    staged = staging_dir(tmp_path / "small")
    write_model_files(model, meta, staged)
    publish_directory(staged, tmp_path / "small")
    engine = Engine.load(tmp_path / "small", device="cpu")
    texts = ["WIN a prize now", "see you at lunch", "WIN a prize now"]
    scores = [v.score for v in engine.classify_texts(texts)]
    assert all(0.0 <= s <= 1.0 for s in scores) and scores[0] == pytest.approx(scores[2], abs=1e-6)
    assert resolve_mode("auto", tmp_path / "small") == "all"  # 7.4M parameters, under AUTO_ALL_MAX_PARAMS


def test_bad_model_dirs(tmp_path):
    path, _, _ = _tiny_model_dir(tmp_path)
    with pytest.raises(ModelError, match="no such model directory"):
        load_model_dir(tmp_path / "absent")
    bad = _copy(path, tmp_path / "bad")
    (bad / "filterd.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"filterd\.json: not valid JSON"):
        load_model_dir(bad)
    meta = json.loads((path / "filterd.json").read_text())
    (bad / "filterd.json").write_text(json.dumps(meta | {"max_length": 5000}))
    with pytest.raises(ModelError, match="max_length 5000 outside"):
        load_model_dir(bad)
    (bad / "filterd.json").write_text(json.dumps(meta))
    data = (path / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model_dir(bad)
    state = load_file(str(path / "model.safetensors"))
    state["head.weight"] = torch.zeros(3, 64)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ModelError, match=r"'head\.weight' has shape \(3, 64\)"):
        load_model_dir(bad)
    state["head.weight"] = torch.full((2, 64), float("nan"))
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ModelError, match="NaN"):
        load_model_dir(bad)


def test_publish_replaces_atomically_while_readers_poll(tmp_path):
    """Readers polling the path always find a complete directory (old or new), never a gap."""
    path, _, first = _tiny_model_dir(tmp_path)
    seen, problems, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(json.loads((path / "filterd.json").read_text())["version"])
            except (OSError, ValueError) as e:
                problems.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(5):
            _, _, latest = _tiny_model_dir(tmp_path)
    finally:
        stop.set()
        t.join()
    assert not problems
    assert first.version in seen and latest.version in seen
    assert json.loads((path / "filterd.json").read_text())["version"] == latest.version
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["generate", "--base", "random:nope", "hi"], "unknown base"),
        (["generate", "--base", "/nonexistent/ckpt", "hi"], "unknown base '/nonexistent/ckpt'"),
    ],
)
def test_cli_errors_are_one_line(argv, expect):
    r = subprocess.run([sys.executable, "-m", "trainer", *argv], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and expect in r.stderr and "Traceback" not in r.stderr
