"""The documentation cannot drift from the repository: links resolve, the README stays short, no
issue-tracker references reach users, the shell commands and TOML examples shown run here, and
docs/interfaces.md (the outside contract) agrees with the code.

Code blocks fenced as `sh` are run; blocks fenced as `console` are shown only (they need a server, a
model, data or a running daemon). docs/development.md documents the convention."""

from __future__ import annotations

from testing.metrics import exported_metrics

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
INTERFACES = DOCS / "interfaces.md"
README_MAX_BYTES = 12 * 1024

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1", re.S)
ISSUE_REF = re.compile(r"\bissues?\s*#?\s*\d+", re.I)


def markdown_files() -> list[Path]:
    """README.md and every page under docs/ (the generated configuration.md included)."""
    return [README, *sorted(DOCS.glob("*.md"))]


def user_facing_files() -> list[Path]:
    return [*markdown_files(), *sorted((REPO / "deploy").glob("*/README.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def code_blocks(text: str, lang: str | None = None) -> list[str]:
    """The bodies of fenced blocks (indented ones inside lists too), dedented; only `lang` when given."""
    out = []
    for m in FENCE.finditer(text):
        if lang is None or m.group("lang") == lang:
            indent = len(m.group("indent"))
            out.append("\n".join(line[indent:] for line in m.group("body").splitlines()))
    return out


def prose(text: str) -> str:
    """The text outside code blocks and inline code, where links are links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip())
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


# --- (a) links ------------------------------------------------------------------------------------


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {rel(dest)}")
    return bad


@pytest.mark.parametrize("path", markdown_files(), ids=rel)
def test_every_relative_link_resolves(path):
    assert not broken_links(path), broken_links(path)


def test_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A heading: `with` code (and more)\n\n## Again\n\n## Again\n")
    page.write_text(
        "[ok](other.md#a-heading-with-code-and-more) [ok2](other.md#again-1) [web](https://example.com/x)\n"
        "[gone](missing.md) [bad anchor](other.md#nothing) `[in code](nowhere.md)`\n"
        "```\n[in a block](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        f"other.md#nothing: no heading with that anchor in {tmp_path / 'other.md'}",
    ]


# --- (b) the README's size, (c) issue references ---------------------------------------------------


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail into docs/"


@pytest.mark.parametrize("path", user_facing_files(), ids=rel)
def test_no_issue_numbers_in_user_facing_text(path):
    hits = [line.strip() for line in path.read_text().splitlines() if ISSUE_REF.search(line)]
    assert not hits, f"{rel(path)} refers to issue numbers: {hits}"


def test_measured_numbers_are_linked_not_copied():
    """bench/RESULTS.md keeps the figures; pages link to its sections (which must exist: see the link test)."""
    linked = [p for p in markdown_files() if "bench/RESULTS.md" in p.read_text()]
    assert README in linked and DOCS / "development.md" in linked
    for phrase in ("messages/s |", "msg/s |", "Measured on this machine"):
        hits = [rel(p) for p in markdown_files() if phrase in p.read_text()]
        assert not hits, f"a table of measured figures ({phrase!r}) in {hits}: it belongs in bench/RESULTS.md"


# --- (d) the commands and configurations shown -----------------------------------------------------


def shell_commands(text: str) -> list[str]:
    """Each command of the `sh` blocks: a line (joined with its `\\` continuations), comments dropped."""
    out = []
    for block in code_blocks(text, "sh"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def documented_commands() -> list[tuple[str, str]]:
    return [(rel(p), c) for p in markdown_files() for c in shell_commands(p.read_text())]


@pytest.fixture(scope="module")
def doc_env(tmp_path_factory) -> dict[str, str]:
    """PATH with `filterd` and `filterd-trainer` running this checkout (not whatever is installed)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, module in (("filterd", "filterd"), ("filterd-trainer", "trainer")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m {module} "$@"\n')
        script.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    return env


@pytest.mark.parametrize(("page", "command"), documented_commands(), ids=[f"{p}: {c}" for p, c in documented_commands()])
def test_documented_shell_command_runs(page, command, doc_env):
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], cwd=REPO, env=doc_env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"{page}: `{command}` exited {r.returncode}: {r.stderr.strip()[-2000:]}"
    assert r.stdout.strip(), f"{page}: `{command}` printed nothing"


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def cli_commands() -> dict[str, set[str]]:
    from filterd.cli import build_parser as filterd_parser
    from trainer.cli import build_parser as trainer_parser

    return {"filterd": subcommands(filterd_parser()), "filterd-trainer": subcommands(trainer_parser())}


def test_docs_show_the_help_of_every_command():
    """`filterd --help`, `filterd-trainer --help` and each subcommand's `--help` are among the commands run."""
    shown = {c for _, c in documented_commands()}
    for prog, subs in cli_commands().items():
        assert f"{prog} --help" in shown
        missing = sorted(s for s in subs if f"{prog} {s} --help" not in shown)
        assert not missing, f"no `{prog} SUB --help` in an sh block for {missing} (docs/development.md lists them)"


def toml_examples() -> list[tuple[str, int, str]]:
    return [(rel(p), i, b) for p in markdown_files() for i, b in enumerate(code_blocks(p.read_text(), "toml"))]


@pytest.mark.parametrize(("page", "index", "body"), toml_examples(), ids=[f"{p}#{i}" for p, i, _ in toml_examples()])
def test_documented_configuration_passes_check_config(page, index, body, tmp_path, doc_env):
    config = tmp_path / "example.toml"
    config.write_text(body)
    r = subprocess.run(
        ["filterd", "check-config", "--config", str(config)], env=doc_env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"{page}, TOML block {index}: {r.stderr.strip()}"


def test_toml_examples_exist_where_a_page_configures_something():
    pages = {p for p, _, _ in toml_examples()}
    for page in (
        "docs/interfaces.md",
        "docs/install.md",
        "docs/policy-and-headers.md",
        "docs/milter.md",
        "docs/http.md",
        "docs/redis.md",
    ):
        assert page in pages, f"{page} shows no TOML block"


# --- (e) docs/interfaces.md against the code ------------------------------------------------------


def section(text: str, heading: str) -> str:
    """The text of a `## heading` section (up to the next `## `)."""
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"\|\s*-", line):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows[1:] if rows else rows


def contract_metrics() -> dict[str, str]:
    """{metric name: type} from the Metrics table of docs/interfaces.md."""
    out = {}
    for row in table_rows(section(INTERFACES.read_text(), "Metrics")):
        for name in re.findall(r"`(filterd_\w+)`", row[0]):
            out[name] = row[1].split()[0]  # "gauge (=1)" -> gauge
    return out


def test_interfaces_metrics_are_exported_with_their_type():
    contract, exported = contract_metrics(), exported_metrics()
    assert len(contract) >= 20, "the Metrics table of docs/interfaces.md was not found"
    wrong = {n: (k, exported.get(n)) for n, k in contract.items() if exported.get(n) != k}
    assert not wrong, f"docs/interfaces.md lists (name: (type, exported type)) {wrong}"


def test_interfaces_redis_fields_are_written_by_the_redis_door():
    rows = {row[0]: row for row in table_rows(section(INTERFACES.read_text(), "Redis"))}
    out_row = next(r for k, r in rows.items() if k == "`filterd:out`")
    dead_row = next(r for k, r in rows.items() if k == "`filterd:dead`")
    route_row = next(r for k, r in rows.items() if k.startswith("route streams"))
    fields = set(re.findall(r"`(\w+)`", out_row[2])) | set(re.findall(r"`(\w+)`", dead_row[2]))
    fields |= set(re.findall(r"`(\w+)`", route_row[2]))
    assert {"id", "entry", "verdict", "score", "model", "latency_ms", "action", "error"} <= fields, fields
    # The door writes them; the shared message path may build part of a result.
    code = "".join(p.read_text() for p in (REPO / "filterd" / "doors").glob("*.py") if p.name in ("redis.py", "path.py"))
    missing = sorted(f for f in fields if not re.search(rf"""b?["']{f}["']""", code))
    assert not missing, f"docs/interfaces.md lists Redis fields that filterd/doors/redis.py never writes: {missing}"


def contract_commands() -> dict[str, list[tuple[str, set[str]]]]:
    """{program: [(subcommand, options shown)]} from the Commands tables of docs/interfaces.md."""
    text = section(INTERFACES.read_text(), "Commands")
    out: dict[str, list[tuple[str, set[str]]]] = {}
    for prog in ("filterd", "filterd-trainer"):
        part = text.split(f"### `{prog}`", 1)[1].split("\n### ", 1)[0]
        for row in table_rows(part):
            usage = row[0].strip("`")
            words = usage.split()
            sub = words[1] if words[0] == prog else words[0]
            out.setdefault(prog, []).append((sub, set(re.findall(r"--[\w-]+", usage))))
    return out


def test_interfaces_commands_and_their_options_exist(doc_env):
    real = cli_commands()
    listed = contract_commands()
    assert set(listed) == {"filterd", "filterd-trainer"}
    for prog, rows in listed.items():
        for sub, options in rows:
            assert sub in real[prog], f"docs/interfaces.md lists `{prog} {sub}`, which does not exist"
            help_text = subprocess.run([prog, sub, "--help"], env=doc_env, capture_output=True, text=True, timeout=60).stdout
            missing = sorted(o for o in options if not re.search(rf"{re.escape(o)}\b", help_text))
            assert not missing, f"docs/interfaces.md shows `{prog} {sub}` with {missing}, which its --help lacks"
        unlisted = real[prog] - {s for s, _ in rows}
        assert not unlisted, f"`{prog}` has commands docs/interfaces.md does not list: {sorted(unlisted)}"
