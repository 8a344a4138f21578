"""Configuration (being split into modules; this step only moves filterd/config.py)."""

from filterd.config.sections import *  # noqa: F403
from filterd.config.sections import EXPLAIN_METHODS, ConfigError, ConsoleConfig, HeadersConfig, HistoryConfig  # noqa: F401
