"""Errors that reach the user as one line (the CLIs print them without a traceback)."""


class FilterdError(Exception):
    """Base class: the message is complete and names the file, line or tensor at fault."""


class ModelError(FilterdError):
    """A checkpoint or model directory that cannot be loaded."""


class DataError(FilterdError):
    """A corpus, CSV split or message that cannot be read."""


class ConfigError(FilterdError):
    """An invalid configuration or command-line value."""
