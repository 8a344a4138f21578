"""filterd.model.explainer: which verdicts get explained, and a message never waits past the deadline or a full queue."""

from __future__ import annotations

import asyncio
import functools
import threading
from dataclasses import replace

import pytest

from filterd.config import ExplainConfig
from filterd.policy.decision import Decision
from filterd.model.engine import Engine
from filterd.model.explain import Explanation
from filterd.mail.spam_fields import explanation_header
from filterd.model.explainer import Explainer
from filterd.obs.metrics import FilterdMetrics

SPAM = Decision("spam", "tag", 0.97, (), 0.5)
HAM = Decision("ham", "pass", 0.02, (), 0.5)
LISTED = Decision("spam", "reject", None, (), 0.5, listed="deny_senders")


def count(metrics: FilterdMetrics, outcome: str, source: str = "smtp") -> float:
    return metrics.explanations.labels(source, outcome)._value.get()


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine.load(tiny_model.model_dir, device="cpu")


@pytest.mark.parametrize("enabled, spam, ham", [("off", False, False), ("spam", True, False), ("all", True, True)])
def test_which_verdicts_are_explained(engine, enabled, spam, ham):
    m = FilterdMetrics()
    ex = Explainer(ExplainConfig(enabled=enabled, top_words=3), lambda: engine, m)
    door = functools.partial(ex.explain, "smtp")

    async def go():
        return await door("win a free prize now", SPAM), await door("see you at lunch", HAM), await door("x", LISTED)

    s, h, listed = asyncio.run(go())
    assert (s is not None, h is not None, listed) == (spam, ham, None)
    if s is not None:
        assert isinstance(s, Explanation) and len(s.raising) <= 3 and len(s.lowering) <= 3
    assert count(m, "explained") == spam + ham
    ex.close()


class Blocked:
    """An engine getter that holds the explaining thread until released (a slow explanation, on demand)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.gate = engine, threading.Event()

    def __call__(self) -> Engine:
        self.gate.wait(30)
        return self.engine


def test_a_full_queue_and_the_deadline_skip_and_are_counted(engine):
    m, slow = FilterdMetrics(), Blocked(engine)
    ex = Explainer(replace(ExplainConfig(enabled="all"), max_queue=1, deadline=0.3), slow, m)
    door = functools.partial(ex.explain, "smtp")

    async def go():
        first = asyncio.create_task(door("one", SPAM))
        while ex.pending == 0:
            await asyncio.sleep(0.01)
        second = await door("two", SPAM)  # the queue (1) holds the first: skipped at once
        first_done_before_second = first.done()
        first_result = await asyncio.wait_for(first, 20)  # back after the deadline, while the thread is still blocked
        blocked = not slow.gate.is_set()
        slow.gate.set()
        while ex.pending:  # the thread finishes; its late result is dropped
            await asyncio.sleep(0.05)
        return first_result, second, first_done_before_second, blocked

    first, second, first_done_before_second, blocked = asyncio.run(go())
    assert first is None and second is None and not first_done_before_second and blocked
    assert count(m, "queue-full") == 1 and count(m, "deadline") == 1 and count(m, "explained") == 0
    ex.close()


def test_busy_scoring_skips_explanations(engine):
    m = FilterdMetrics()
    backlog = [200]
    ex = Explainer(ExplainConfig(enabled="all"), lambda: engine, m, backlog=lambda: backlog[0], max_backlog=64)
    door = functools.partial(ex.explain, "redis")
    assert asyncio.run(door("free money", SPAM)) is None
    backlog[0] = 3
    assert asyncio.run(door("free money", SPAM)) is not None
    assert count(m, "busy", "redis") == 1 and count(m, "explained", "redis") == 1
    ex.close()


def test_header_value_only_when_header_is_on(engine):
    e = asyncio.run(Explainer(ExplainConfig(enabled="all"), lambda: engine).explain("smtp", "free money now", SPAM))
    assert e is not None
    assert explanation_header(e, ExplainConfig(enabled="all", header=False)) == ""
    value = explanation_header(e, ExplainConfig(enabled="all", header=True, max_header_bytes=80))
    assert value and len(value) <= 80 and value.endswith("log-odds)")
