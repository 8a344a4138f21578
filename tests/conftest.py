"""Shared fixtures: where the shared corpora and tokenizer files are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testing.corpus import REPO, SHARED, SMS_FILE, SPAMASSASSIN  # noqa: F401  (where the shared corpora are: one home)

# The tokenizer must work offline: point tiktoken at the shared copy of its GPT-2 files.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))



@pytest.fixture(scope="session")
def sms_file() -> Path:
    return SMS_FILE


@pytest.fixture(scope="session")
def spamassassin_dir() -> Path:
    return SPAMASSASSIN


@pytest.fixture(scope="session")
def sms_data(tmp_path_factory) -> Path:
    """The UCI corpus prepared as the chapter does (seed 123)."""
    from trainer.data import prepare

    out = tmp_path_factory.mktemp("sms")
    prepare(out, sms=SMS_FILE, seed=123)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sms_data):
    """A random-init tiny GPT-2 fine-tuned for two epochs on the UCI split (a FitResult)."""
    from trainer.fit import FitConfig, fit

    out = tmp_path_factory.mktemp("models") / "tiny"
    return fit(FitConfig(data=sms_data, base="random:tiny", out=out, trainable="all", epochs=2, eval_every=40, progress=False))


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server on a free loopback port for one test."""
    from testing.services import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


# `make test-quick` leaves these out: a real `filterd serve`, Postfix, Prometheus or Chromium, or a model fit.
SLOW_FIXTURES = {"tiny_model", "sms_data", "milter_postfix", "browser", "hf_tiny"}
SLOW_WORDS = ("postfix", "chromium", "browser", "serve", "dovecot", "promtool", "prometheus", "rspamd",  # real peers
              "transformers", "[gpt2]", "whole_corpus", "full_spamassassin", "acl_user", "trainer_policy",  # > 3 s each
              "sigterm_from_outside", "held_out_loss", "unusable_history_file")


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        path = str(item.fspath)
        if "/e2e/" in path or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or any(w in item.name.lower() for w in SLOW_WORDS):
            item.add_marker(slow)
