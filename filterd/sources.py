"""The doors' names: the `source` of every message, metric label, history row and reservoir text."""

SOURCES = ("smtp", "milter", "http", "redis")
