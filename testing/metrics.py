"""What the daemon's and the trainer's Prometheus registries really export (for the tests that compare them with docs)."""

from __future__ import annotations

import re


def exported_metrics() -> dict[str, str]:
    """{metric name: type} the daemon's and the trainer's registries really export (every door primed)."""
    from prometheus_client import generate_latest

    from filterd.sources import SOURCES
    from filterd.obs.metrics import FilterdMetrics, TrainerMetrics

    daemon = FilterdMetrics()
    daemon.prime(SOURCES)
    out = {}
    for registry in (daemon.registry, TrainerMetrics().registry):
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                if not name.endswith("_created"):  # prometheus_client's creation-time series of counters and histograms
                    out[re.sub(r"_total$", "", name) + ("_total" if kind == "counter" else "")] = kind
    return out
