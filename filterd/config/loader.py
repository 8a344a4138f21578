"""Loading: defaults, then the TOML file, then `--set section.key=value` overrides, into a `Config`.

Errors are one line naming the file (or the `--set` option) and the key, e.g.
`filterd.toml: [batching] max_wait_ms: must be a number >= 0, got "fast"`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from filterd.config.checks import first_problem
from filterd.config.kinds import Kind, Section, Where, _all_keys, _label
from filterd.config.sections import Config
from filterd.errors import ConfigError


@dataclass(frozen=True)
class _Origin:
    label: str  # what messages name: the file, "--set section.key" or "defaults"
    base: Path | None = None  # relative paths in a file are relative to the file's directory


OriginOf = Callable[[Where], _Origin]


def load_config(path: Path | str | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file (if any), then `section.key=value` overrides; ConfigError if invalid."""
    return _load(path, overrides)[0]


def check_config(path: Path | str | None, overrides: Sequence[str] = ()) -> Config:
    """`load_config` plus the checks that involve several keys (what `filterd check-config` and serve run)."""
    cfg, origin_of = _load(path, overrides)
    problem = first_problem(cfg)
    if problem:
        where, message = problem
        raise ConfigError(f"{origin_of(where).label}: {_label(where)}: {message}")
    return cfg


def _load(path: Path | str | None, overrides: Sequence[str]) -> tuple[Config, OriginOf]:
    if path is None:
        file_origin, raw = _Origin("defaults"), {}
    else:
        path = Path(path)
        file_origin, raw = _Origin(str(path), path.absolute().parent), _read_toml(path)
    cfg = _build(Config, raw, (), lambda where: file_origin)  # the file must be valid on its own
    if not overrides:
        return _with_explicit(cfg, raw), lambda where: file_origin
    origins: dict[Where, _Origin] = {}
    for text in overrides:
        where, value = _parse_override(text)
        _assign(raw, where, value)
        for old in [w for w in origins if w[: len(where)] == where]:  # a replaced table drops its keys' origins
            del origins[old]
        origins[where] = _Origin("--set " + ".".join(where))

    def origin_of(where: Where) -> _Origin:
        for n in range(len(where), 0, -1):
            if where[:n] in origins:
                return origins[where[:n]]
        return file_origin

    return _with_explicit(_build(Config, raw, (), origin_of), raw), origin_of


def _with_explicit(cfg: Config, raw: Mapping[str, Any]) -> Config:
    """Note which keys the user wrote (not a field: equality and dumps ignore it), for `deprecations`."""

    def paths(table: Mapping[str, Any], where: Where) -> list[Where]:
        out: list[Where] = []
        for k, v in table.items():
            out += paths(v, where + (k,)) if isinstance(v, dict) else [where + (k,)]
        return out

    object.__setattr__(cfg, "_explicit", frozenset(paths(raw, ())))
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is harmless
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # tomllib's message ends "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {' '.join(str(e).split())}") from None


def _build(cls: type, raw: Mapping[str, Any], where: Where, origin_of: OriginOf) -> Any:
    """An instance of the dataclass `cls` from a TOML table, every key parsed and checked."""
    spec = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        at = where + (key,)
        if key not in spec and not where and not isinstance(value, dict):
            raise ConfigError(f"{origin_of(at).label}: {key}: {_unknown_top_level(key)}")
        if key not in spec:
            raise _error(origin_of(at), at, _unknown(key, spec, where))
        kind: Kind = spec[key].metadata["kind"]
        if isinstance(kind, Section):
            if not isinstance(value, dict):
                raise _error(origin_of(at), at, f"must be a table [{'.'.join(at)}], got {_show(value)}")
            values[key] = _build(kind.cls, value, at, origin_of)
            continue
        origin = origin_of(at)
        try:
            parsed = kind.parse(value)
        except ValueError as e:
            raise _error(origin, at, f"{e}, got {_show(value, kind)}") from None
        values[key] = kind.anchor(parsed, origin.base) if origin.base else parsed
    return cls(**values)


def _unknown(key: str, spec: Mapping[str, Any], where: Where) -> str:
    """ "unknown key", with the closest known key or the section the key belongs in."""
    noun = "section" if not where else "key"
    close = difflib.get_close_matches(key, list(spec), n=1, cutoff=0.6)
    if close:
        hint = f"[{close[0]}]" if not where else close[0]
        return f"unknown {noun} (did you mean {hint}?)"
    home = [".".join(w[:-1]) for w in _all_keys(Config) if w[-1] == key and w[:-1] != where]
    if home:
        return f"unknown {noun} (it belongs in [{home[0]}])" if where else f"unknown section (set it in [{home[0]}])"
    known = ", ".join(spec)
    return f"unknown {noun} (known: {known})"


def _unknown_top_level(key: str) -> str:
    home = [w[0] for w in _all_keys(Config) if w[-1] == key]
    hint = f"set it in [{home[0]}]" if home else "settings go in a section such as [model]"
    return f"unknown top-level key ({hint})"


def _error(origin: _Origin, where: Where, message: str) -> ConfigError:
    return ConfigError(f"{origin.label}: {_label(where)}: {message}")


def _show(value: Any, kind: Kind | None = None) -> str:
    """A value as the user wrote it, on one short line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, str):
        text = json.dumps(kind.redact(value) if kind is not None and kind.secret else value)  # escapes newlines: stays one line
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:76] + '..."'


# --------------------------------------------------------------------------------------------
# --set overrides


def _parse_override(text: str) -> tuple[Where, Any]:
    """(("batching", "max_batch_size"), 32) from "batching.max_batch_size=32"."""
    name, sep, value_text = text.partition("=")
    where = tuple(name.strip().split("."))
    if not sep or len(where) < 2 or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in where):
        raise ConfigError(f"--set {text}: expected section.key=value, e.g. batching.max_batch_size=32")
    kind = _kind_at(where)
    value = _toml_value(value_text)
    if kind.text_like and not isinstance(value, str):  # --set redis.group=2024 means the name "2024"
        value = value_text
    return where, value


def _kind_at(where: Where) -> Kind:
    """The kind of the key at `where`, or ConfigError naming the override's unknown part."""
    cls: type = Config
    for i, part in enumerate(where):
        spec = {f.name: f for f in fields(cls)}
        at = where[: i + 1]
        if part not in spec:
            raise _error(_Origin("--set " + ".".join(where)), at, _unknown(part, spec, at[:-1]))
        kind: Kind = spec[part].metadata["kind"]
        if i == len(where) - 1:
            return kind
        if not isinstance(kind, Section):
            raise _error(_Origin("--set " + ".".join(where)), at, "is a value, not a table")
        cls = kind.cls
    raise AssertionError("unreachable")


def _toml_value(text: str) -> Any:
    """The value as TOML reads it (32, false, "x", [..], {..}); anything else is the text itself."""
    if "\n" in text or "\r" in text:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assign(raw: dict[str, Any], where: Where, value: Any) -> None:
    node = raw
    for part in where[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):  # the file was validated first, so this is only a missing table
            child = node[part] = {}
        node = child
    node[where[-1]] = value
