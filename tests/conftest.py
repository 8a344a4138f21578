"""Shared fixtures: where the shared corpora and tokenizer files are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path:
    for candidate in (os.environ.get("FILTERD_SHARED"), REPO.parent / "shared", "/work/shared"):
        if candidate and (Path(candidate) / "tiktoken").is_dir():
            return Path(candidate)
    raise RuntimeError("shared data not found: set FILTERD_SHARED to the directory holding tiktoken/ and data/")


SHARED = _shared_dir()
# The tokenizer must work offline: point tiktoken at the shared copy of its GPT-2 files.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))

SMS_FILE = SHARED / "data" / "sms-spam-collection" / "SMSSpamCollection"
SPAMASSASSIN = SHARED / "data" / "spamassassin-publiccorpus"


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
