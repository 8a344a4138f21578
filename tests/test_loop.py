"""trainer.loop: the one fine-tuning loop fit and refit train through (a tiny random model, a few steps)."""

from __future__ import annotations

import copy
import random
import time

import pytest
import torch

from filterd.model.bases import build_model, resolve_base
from trainer.loop import Encoded, LoopSettings, count_trainable, train, val_loss_acc

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def base():
    return build_model(resolve_base("random:tiny"), seed=123)


def encoded(n: int, seed: int) -> Encoded:
    """Separable toy data: spam sequences use low token ids, ham high ones."""
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    tokens = [[rng.randrange(0, 500) if y else rng.randrange(20000, 20500) for _ in range(rng.randint(3, 9))] for y in labels]
    return Encoded(tokens, labels)


def run(base, settings: LoopSettings, val: Encoded | None = None):
    model = copy.deepcopy(base)
    torch.manual_seed(0)  # dropout's draws, as fit seeds them
    result = train(model, encoded(24, 1), encoded(8, 2) if val is None else val, DEVICE, settings)
    return model, result


def quiet(**kw) -> LoopSettings:
    return LoopSettings(log=lambda line: None, **kw)


def test_same_settings_same_weights_and_the_best_epoch_is_kept(base):
    settings = quiet(trainable="all", epochs=3, batch_size=4, lr=1e-3, eval_every=2)
    a, ra = run(base, settings)
    b, rb = run(base, settings)
    assert all(torch.equal(p, b.state_dict()[k]) for k, p in a.state_dict().items())
    assert ra.history == {**rb.history, "seconds": ra.history["seconds"]} and ra.steps == 18 and not ra.stopped
    assert ra.history["steps"]["step"] == list(range(2, 19, 2)) and ra.trainable_params == count_trainable(base, "all")
    # the model holds the kept epoch's state: its validation loss is the one recorded for that epoch
    assert val_loss_acc(a, encoded(8, 2), DEVICE)[0] == ra.history["val_loss"][ra.best_epoch - 1]
    c, _ = run(base, quiet(trainable="all", epochs=3, batch_size=4, lr=1e-3, eval_every=2, seed=7))
    assert not all(torch.equal(p, c.state_dict()[k]) for k, p in a.state_dict().items())  # another shuffle


def test_head_mode_trains_only_the_head(base):
    model, result = run(base, quiet(trainable="head", epochs=1, batch_size=8, lr=1e-2))
    changed = {k for k, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[k])}
    assert changed == {"head.weight", "head.bias"} and "steps" not in result.history


def test_deadline_and_no_validation_split(base):
    _, stopped = run(base, quiet(epochs=3, deadline=time.perf_counter()))
    assert (stopped.stopped, stopped.steps, stopped.epochs_run, stopped.history["epoch"]) == (True, 1, 1, [1])
    _, no_val = run(base, quiet(epochs=2), val=Encoded())
    assert no_val.best_epoch == 2 and no_val.history["val_acc"] == [0.0, 0.0]  # nothing to choose by: the last epoch
