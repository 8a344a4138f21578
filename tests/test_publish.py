"""trainer.publish: versioned model directories, an atomic `current` symlink, prune, rollback, announce."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time

import pytest
import torch

from filterd.errors import FilterdError
from filterd.model.gpt2 import GPT2Classifier, GPTConfig
from filterd.model.reload import fingerprint
from filterd.model.weights import ModelMeta, load_model_dir, write_model_files
from trainer.evaluate import compute_metrics
from trainer.report import SplitReport
from trainer.publish import ModelStore

CFG = GPTConfig(vocab_size=64, n_positions=16, n_embd=8, n_layer=1, n_head=2)  # small files: fast publishes


def model(seed: int) -> GPT2Classifier:
    m = GPT2Classifier(CFG)
    m.reset_parameters(seed=seed)
    return m


def meta() -> ModelMeta:
    return ModelMeta(version="", base="random:test", base_kind="random", config=CFG, max_length=16)


def publish(store: ModelStore, seed: int, reports: list | None = None) -> str:
    return store.publish(model(seed), meta(), reports or [], None).name


def test_publish_writes_a_version_and_points_current_at_it(tmp_path):
    store = ModelStore(tmp_path / "models")
    assert store.current() is None and store.versions() == []
    labels, scores = [0, 1, 0, 1], [0.1, 0.9, 0.4, 0.7]
    first = publish(store, 1, [SplitReport("test", compute_metrics(labels, scores), labels, scores)])
    assert (tmp_path / "models" / "versions" / first / "report.md").is_file()
    second = publish(store, 2)
    assert store.versions() == [second, first]
    link = tmp_path / "models" / "current"
    assert link.is_symlink() and os.readlink(link) == os.path.join("versions", second)  # relative: the tree can move
    assert store.current() == (tmp_path / "models" / "versions" / second).resolve()
    loaded, m = load_model_dir(link)  # what filterd does with [model] path = .../current
    assert m.version == second and torch.equal(loaded.head.weight, model(2).head.weight)
    assert not [p for p in (tmp_path / "models").rglob(".*")]  # no staging dirs or temp links left


def _complete(path: str) -> str:
    """The version in `path`, after checking its weights are the ones its filterd.json names."""
    meta = json.loads(open(os.path.join(path, "filterd.json")).read())
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == meta["weights_sha256"]
    return meta["version"]


def test_a_reader_during_publishes_always_sees_a_complete_model(tmp_path):
    store = ModelStore(tmp_path / "models")
    published = [publish(store, 0)]
    link = str(tmp_path / "models" / "current")
    seen: set[str] = set()
    errors: list[BaseException] = []
    fingerprints = set()
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.add(_complete(os.path.realpath(link)))  # as ModelHolder resolves it
                fingerprints.add(fingerprint(tmp_path / "models" / "current"))
                json.loads(open(os.path.join(link, "filterd.json")).read())  # and through the link itself
            except BaseException as e:  # noqa: BLE001 -- any failure is the finding
                errors.append(e)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for seed in range(1, 6):
            published.append(publish(store, seed))
            time.sleep(0.02)
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert seen <= set(published) and len(seen) >= 2
    assert None not in fingerprints and len({fp[0] for fp in fingerprints}) >= 2  # the daemon's poll sees each swap


def test_prune_keeps_the_newest_and_current(tmp_path):
    store = ModelStore(tmp_path / "models")
    v1, v2, v3, v4 = (publish(store, s) for s in range(4))
    assert store.rollback() == v3 and store.rollback() == v2  # current is now an older version
    assert sorted(store.prune(1)) == sorted([v1, v3])
    assert store.versions() == [v4, v2] and store.current().name == v2
    assert store.prune(5) == []


def test_rollback_to_the_previous_version_and_none_before_the_first(tmp_path):
    store = ModelStore(tmp_path / "models")
    with pytest.raises(FilterdError, match="no published current version"):
        store.rollback()
    v1 = publish(store, 1)
    v2 = publish(store, 2)
    assert store.rollback() == v1
    assert store.current().name == v1 and store.versions()[0] == v2  # v2 stays, for a roll forward by hand
    with pytest.raises(FilterdError) as e:
        store.rollback()
    assert "\n" not in str(e.value) and f"no version older than {v1}" in str(e.value)


def test_a_real_current_directory_is_adopted_as_a_version(tmp_path):
    root = tmp_path / "models"
    old = write_model_files(model(7), meta(), root / "current")  # as `fit --out models/current` leaves it
    store = ModelStore(root)
    assert store.current() == (root / "current").resolve() and store.versions() == []
    new = publish(store, 8)
    assert (root / "current").is_symlink() and store.current().name == new
    assert store.versions() == [new, old.version]
    assert store.rollback() == old.version


def test_announce_publishes_the_version(redis_server):
    client = redis_server.client()
    sub = client.pubsub()
    sub.subscribe("filterd:model")
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    assert ModelStore.announce(redis_server.url, "filterd:model", "v123") == 1
    msg = sub.get_message(timeout=2)
    assert msg["type"] == "message" and msg["data"] == b"v123"
    sub.close()


def test_announce_without_redis_is_logged_not_raised(caplog):
    with caplog.at_level(logging.WARNING, logger="filterd.trainer"):
        assert ModelStore.announce("redis://127.0.0.1:1/0", "filterd:model", "v1", timeout_s=1.0) is None
    assert "announce: v1 on filterd:model" in caplog.text and "still see the new path" in caplog.text


@pytest.mark.parametrize("version", ["a\nb", "../..", "..", ".", "v1/../../x", "", " v1", "v1\r", "x" * 129])
def test_a_bad_version_is_refused_by_publish_and_by_load(tmp_path, version):
    root = tmp_path / "models"
    store = ModelStore(root)
    bad = meta()
    bad.version = version
    if version:  # empty means "make one from the weights' hash": that one is fine
        with pytest.raises(FilterdError, match="invalid version"):
            store.publish(model(1), bad, [], None)
        assert store.current() is None and store.versions() == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # nothing written beside models_dir
    # a directory written by other means (by hand, an older trainer) is refused when loaded
    d = tmp_path / "handmade"
    write_model_files(model(1), meta(), d)
    doc = json.loads((d / "filterd.json").read_text())
    doc["version"] = version
    (d / "filterd.json").write_text(json.dumps(doc))
    with pytest.raises(FilterdError, match="invalid version"):
        load_model_dir(d)


def test_adopting_a_current_with_a_traversal_version_stays_inside_models_dir(tmp_path):
    root = tmp_path / "deep" / "models"
    old = write_model_files(model(7), meta(), root / "current")
    doc = json.loads((root / "current" / "filterd.json").read_text())
    doc["version"] = "../.."
    (root / "current" / "filterd.json").write_text(json.dumps(doc))
    store = ModelStore(root)
    new = publish(store, 8)
    assert store.current().name == new
    adopted = [p.name for p in (root / "versions").iterdir() if p.name != new]
    assert len(adopted) == 1 and adopted[0].startswith("adopted-"), adopted
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["models"]  # nothing moved out
    assert (root / "versions" / adopted[0] / "model.safetensors").read_bytes() and old.version != "../.."


def test_the_console_side_reads_and_rolls_back_what_the_trainer_published(tmp_path):
    """filterd.store.models.ModelStore (what the console uses, no trainer import) sees the trainer's versions."""
    from filterd.store import models

    trainer_side = ModelStore(tmp_path / "models")
    first, second = publish(trainer_side, 1), publish(trainer_side, 2)
    trainer_side.record_refit({"outcome": "promoted", "version": second})
    console = models.ModelStore(tmp_path / "models")
    assert console.versions() == [second, first] and console.current_version() == second
    assert [r["outcome"] for r in console.refits()] == ["promoted"]
    assert console.rollback() == first
    assert trainer_side.current_version() == first and load_model_dir(trainer_side.link)[1].version == first
    with pytest.raises(FilterdError, match="no version older than"):
        console.rollback()
