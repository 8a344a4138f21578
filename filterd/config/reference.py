"""The configuration reference, generated from the sections' fields so it cannot drift from the code:
`configuration_page()` is docs/configuration.md (rewrite it with `python -m filterd.config --write`),
`config_reference()` the one-table form the README has carried."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Sequence

from filterd.config.kinds import Kind, Section, Where, _all_keys, _field_at, _label, _toml_scalar
from filterd.config.sections import Config

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "python -m filterd.config --write"

_INTRO = f"""\
# Configuration reference

<!-- Generated from filterd/config/ by `{REGENERATE}`: edit the descriptions there, not here. -->

filterd and filterd-trainer read one TOML file (`--config filterd.toml`) and then any number of
`--set section.key=value` overrides (`--set batching.max_batch_size=32`), the last one winning.
Every key has a default, so `filterd serve` runs with no file at all. An unknown key, or a value
of the wrong type, stops the program with one line naming the file (or the `--set`) and the key;
`filterd check-config --config FILE --print` checks a file, including the checks across keys,
and prints the effective configuration.

Durations are written `"500ms"`, `"5s"`, `"2m"`, `"1h"`, `"1d"`, `"1h30m"` or as a number of
seconds; relative paths in a file are relative to the file's directory. Keys marked deprecated
still work, and `check-config` says what replaces them.
"""


def config_reference() -> str:
    """Every key with its default and meaning, as one Markdown table (the README's configuration reference)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for where in _all_keys(Config):
        f = _field_at(Config, where)
        doc = f.metadata["doc"].replace("|", "\\|")
        rows.append(f"| `{_label(where)}` | `{_default(f)}` | {doc} |")
    return "\n".join(rows) + "\n"


def configuration_page() -> str:
    """docs/configuration.md: one section per TOML table, each key with its type, default and description."""
    tables = _tables(Config, ())
    contents = " · ".join(f"[`[{'.'.join(w)}]`](#{''.join(w)})" for w, _ in tables)  # GitHub's anchor for "[a.b]" is "ab"
    out = [_INTRO, f"Sections: {contents}", ""]
    for where, cls in tables:
        out += [f"## [{'.'.join(where)}]", "", _cell(_about(cls)), ""]
        subs = [f"`[{'.'.join(where + (f.name,))}]`" for f in fields(cls) if isinstance(f.metadata["kind"], Section)]
        if subs:
            out += [f"Tables inside it: {', '.join(subs)}.", ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for f in fields(cls):
            kind: Kind = f.metadata["kind"]
            if not isinstance(kind, Section):
                cells = (f"`{f.name}`", _cell(kind.what_type), f"`{_default(f)}`", _cell(f.metadata["doc"]))
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _tables(cls: type, where: Where) -> list[tuple[Where, type]]:
    """Every TOML table under `cls`, in the order of the fields (a table's own sub-tables right after it)."""
    out: list[tuple[Where, type]] = [(where, cls)] if where else []
    for f in fields(cls):
        kind = f.metadata["kind"]
        if isinstance(kind, Section):
            out += _tables(kind.cls, where + (f.name,))
    return out


def _about(cls: type) -> str:
    """A table's description: its class docstring, less the "[name]: " it starts with."""
    text = " ".join((cls.__doc__ or "").split())
    if text.startswith("["):
        text = text.partition(": ")[2]
    return text[:1].upper() + text[1:]


def _default(f: Field) -> str:
    default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    return _toml_scalar(f.metadata["kind"].dump(default)).replace("|", "\\|")


def _cell(text: str) -> str:
    """Prose for Markdown: a | would end a table cell, <prefix> would be an HTML tag, X-Spam-* ... * emphasis."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m filterd.config", description="print the configuration reference page")
    parser.add_argument("--write", action="store_true", help=f"write it to {PAGE.relative_to(PAGE.parents[1])} instead")
    args = parser.parse_args(argv)
    page = configuration_page()
    if args.write:
        PAGE.write_text(page)
        print(f"wrote {PAGE}", file=sys.stderr)
    else:
        sys.stdout.write(page)
    return 0
