"""Configuration: one typed, validated settings object read from TOML plus `--set` overrides.

The modules are named by job, listed in import order (when loaded, each imports only ones before it):
`values` (durations, host:port, unix:/path, Redis URLs: parsed alike in files, CLIs and doors),
`kinds` (how one key is read, checked and written back), `doors` (the sections the doors read,
which change with them), `checks` (across keys, warnings, deprecations), `sections` (the other
sections and the whole `Config`), `loader` (file + overrides -> Config, errors naming the key) and
`reference` (docs/configuration.md: `python -m filterd.config --write`). Every name other code
imports is importable from `filterd.config` itself, as before the split.
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
