"""Configuration: one typed, validated settings object read from TOML plus `--set` overrides.

Split by job, each module importing only those above it: `values` (durations, host:port, unix:/path,
Redis URLs: parsed alike in files, CLIs and doors), `kinds` (how one key is read, checked and
written back), `doors` and `sections` (the dataclass of each [section]: the doors' and [headers],
then the rest and the whole `Config`), `checks` (across keys, warnings, deprecations), `loader`
(file + overrides -> Config, errors naming the key) and `reference` (docs/configuration.md). Every
name other code uses is importable from `filterd.config` itself, as before the split.
"""

from filterd.config.doors import HeadersConfig, HttpConfig, MilterConfig, RedisConfig, RoutesConfig, SmtpConfig
from filterd.config.loader import check_config, load_config
from filterd.config.reference import config_reference, configuration_page
from filterd.config.sections import (
    EXPLAIN_METHODS,
    BatchingConfig,
    Config,
    ConsoleConfig,
    ExplainConfig,
    HistoryConfig,
    LoggingConfig,
    MetricsConfig,
    ModelConfig,
    PolicyConfig,
    PolicyDoorConfig,
    TrainerConfig,
)
from filterd.config.values import (
    HostPort,
    UnixSocket,
    format_duration,
    is_loopback,
    parse_duration,
    parse_hostport,
    parse_listen,
    redact_url,
)
from filterd.errors import ConfigError

__all__ = [
    "EXPLAIN_METHODS",
    "BatchingConfig",
    "Config",
    "ConfigError",
    "ConsoleConfig",
    "ExplainConfig",
    "HeadersConfig",
    "HistoryConfig",
    "HostPort",
    "HttpConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MilterConfig",
    "ModelConfig",
    "RedisConfig",
    "PolicyConfig",
    "PolicyDoorConfig",
    "RoutesConfig",
    "SmtpConfig",
    "TrainerConfig",
    "UnixSocket",
    "check_config",
    "config_reference",
    "configuration_page",
    "format_duration",
    "is_loopback",
    "load_config",
    "parse_duration",
    "parse_hostport",
    "parse_listen",
    "redact_url",
]
