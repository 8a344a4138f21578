"""ModelHolder: reload only a changed model, at most once per interval, SIGHUP always; a model whose
probe scores are not probabilities is refused at reload (and at start) with the old one serving."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from filterd.model.engine import Engine, sanity_check
from filterd.errors import ModelError
from filterd.obs.metrics import FilterdMetrics
from filterd.model.gpt2 import GPT2Classifier, GPTConfig
from filterd.model.reload import ModelHolder
from filterd.model.weights import ModelMeta, write_model_files

CFG = GPTConfig(vocab_size=50257, n_positions=32, n_embd=8, n_layer=1, n_head=2)


@dataclass
class FakeEngine:
    """What the holder and the metrics read of an Engine."""

    version: str
    meta: object = field(default_factory=lambda: type("M", (), {"base": "random:tiny"})())
    device: torch.device = torch.device("cpu")
    dtype: str = "float32"


class CountingLoader:
    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> FakeEngine:
        self.calls.append(path)
        return FakeEngine((Path(path) / "filterd.json").read_text().strip())


def _reloads(m: FilterdMetrics, outcome: str) -> float:
    return m.registry.get_sample_value("filterd_model_reloads_total", {"outcome": outcome}) or 0.0


def _version_dir(root: Path, version: str) -> Path:
    d = root / "versions" / version
    d.mkdir(parents=True)
    (d / "filterd.json").write_text(version + "\n")
    return d


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name(".tmp-link")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def test_announcements_of_an_unchanged_model_reload_nothing(tmp_path):
    _version_dir(tmp_path, "v1")
    _point(tmp_path / "current", tmp_path / "versions" / "v1")
    loader, metrics = CountingLoader(), FilterdMetrics()
    holder = ModelHolder(tmp_path / "current", loader, metrics, min_interval_s=0.0, check=None)
    holder.load_initial()

    async def main() -> list[bool]:
        return [await holder.reload("announced on filterd:model") for _ in range(10)]

    assert asyncio.run(main()) == [False] * 10
    assert len(loader.calls) == 1  # the initial load only
    assert _reloads(metrics, "ok") == 0 and _reloads(metrics, "failed") == 0
    assert holder.current().version == "v1"


def test_sighup_forces_a_reload_of_the_same_model(tmp_path):
    _version_dir(tmp_path, "v1")
    loader, metrics = CountingLoader(), FilterdMetrics()
    holder = ModelHolder(tmp_path / "versions" / "v1", loader, metrics, min_interval_s=3600.0, check=None)
    holder.load_initial()

    async def main() -> list[bool]:
        return [await holder.reload("SIGHUP", force=True), await holder.reload("SIGHUP", force=True)]

    assert asyncio.run(main()) == [True, True]  # neither unchanged files nor the interval stop the operator
    assert len(loader.calls) == 3 and _reloads(metrics, "ok") == 2


def test_changes_reload_at_most_once_per_interval_and_the_last_one_wins(tmp_path):
    for v in ("v1", "v2", "v3", "v4"):
        _version_dir(tmp_path, v)
    link = tmp_path / "current"
    _point(link, tmp_path / "versions" / "v1")
    loader, metrics = CountingLoader(), FilterdMetrics()
    holder = ModelHolder(link, loader, metrics, min_interval_s=0.5, check=None)
    holder.load_initial()

    async def main() -> tuple[list[bool], float]:
        _point(link, tmp_path / "versions" / "v2")
        first = await holder.reload("announced")  # the first change loads at once
        t0 = time.monotonic()
        results = [first]
        for v in ("v3", "v4"):  # two more inside the interval: deferred, coalesced into one
            _point(link, tmp_path / "versions" / v)
            results.append(await holder.reload("announced"))
        while holder.current().version != "v4" and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.02)
        return results, time.monotonic() - t0

    results, waited = asyncio.run(main())
    assert results == [True, False, False]
    assert holder.current().version == "v4" and waited >= 0.4  # loaded when the interval ended, not before
    assert [p.name for p in loader.calls] == ["v1", "v2", "v4"] and _reloads(metrics, "ok") == 2


# -- the sanity check, with real model directories -------------------------------------------------
def _write_model(directory: Path, version: str, head_weight: float | None = None, points: list | None = None) -> Path:
    model = GPT2Classifier(CFG)
    model.reset_parameters(seed=1)
    if head_weight is not None:  # finite weights (load_model_dir accepts them) that overflow to inf - inf = NaN
        with torch.no_grad():
            model.head.weight.fill_(head_weight)
    meta = ModelMeta(version=version, base="random:tiny", base_kind="random", config=CFG, max_length=32, operating_points=points or [])
    write_model_files(model, meta, directory)
    return directory


def _load(path: Path) -> Engine:
    return Engine.load(path, device="cpu")


def test_a_model_scoring_nan_is_refused_at_reload_and_the_old_one_keeps_serving(tmp_path):
    good = _write_model(tmp_path / "versions" / "good-v1", "good-v1")
    bad = _write_model(tmp_path / "versions" / "nan-v2", "nan-v2", head_weight=3e38)
    assert torch.isfinite(Engine.load(bad, device="cpu").model.head.weight).all()  # it does load
    link = tmp_path / "current"
    _point(link, good)
    metrics = FilterdMetrics()
    holder = ModelHolder(link, _load, metrics, min_interval_s=0.0)
    holder.load_initial()
    _point(link, bad)
    assert asyncio.run(holder.reload("announced")) is False
    assert holder.current().version == "good-v1"
    assert _reloads(metrics, "failed") == 1 and _reloads(metrics, "ok") == 0
    score = holder.current().score_tokens([[262, 318, 257]])[0]
    assert 0.0 <= score <= 1.0


def test_a_model_scoring_nan_does_not_start(tmp_path):
    bad = _write_model(tmp_path / "nan-v2", "nan-v2", head_weight=3e38)
    holder = ModelHolder(bad, _load, FilterdMetrics())
    with pytest.raises(ModelError, match=r"nan-v2.*sanity check: probe score nan is not a probability"):
        holder.load_initial()


def test_sanity_check_passes_a_healthy_model(tmp_path):
    sanity_check(_load(_write_model(tmp_path / "ok", "ok-v1")))


def test_a_model_without_the_operating_point_the_policy_needs_is_refused_and_the_old_one_keeps_serving(tmp_path, caplog):
    from filterd.config import load_config
    from filterd.daemon import Daemon

    cfg = load_config(None, ["redis.enabled=false", 'policy.tag_score="fpr:0.005"', f"model.path={tmp_path / 'current'}"])
    daemon = Daemon(cfg)
    good = _write_model(tmp_path / "versions" / "v1", "v1", points=[{"ham_fpr_target": 0.005, "threshold": 0.73}])
    bare = _write_model(tmp_path / "versions" / "v2", "v2")  # fitted before operating points existed
    holder = ModelHolder(tmp_path / "current", daemon._load, FilterdMetrics(), min_interval_s=0)
    _point(tmp_path / "current", good)
    assert holder.load_initial().operating_points == {0.005: 0.73}
    _point(tmp_path / "current", bare)
    assert asyncio.run(holder.reload("test")) is False
    assert holder.current().version == "v1"
    assert "model v2 has no operating point for [policy] level(s) fpr:0.005 (it has: none)" in caplog.text
    with pytest.raises(ModelError, match="no operating point"):
        ModelHolder(tmp_path / "versions" / "v2", daemon._load, FilterdMetrics()).load_initial()  # at start: one line, no serving
