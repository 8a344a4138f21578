"""docs/configuration.md is the page the code generates from the sections' fields (it cannot drift from the keys)."""

import subprocess
import sys

from filterd.config import Config
from filterd.config.kinds import _all_keys, _field_at
from filterd.config.reference import REGENERATE, configuration_page

from tests.conftest import REPO


def test_committed_page_is_the_generated_one():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == configuration_page(), f"docs/configuration.md is out of date: regenerate it with `{REGENERATE}`"


def test_every_key_is_in_its_own_section_with_its_description():
    sections: dict[str, str] = {}
    for part in configuration_page().split("\n## ")[1:]:
        heading, _, body = part.partition("\n")
        sections[heading] = body
    for where in _all_keys(Config):
        table = f"[{'.'.join(where[:-1])}]"
        assert table in sections, table
        doc = _field_at(Config, where).metadata["doc"].replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")
        row = next((ln for ln in sections[table].splitlines() if ln.startswith(f"| `{where[-1]}` |")), None)
        assert row is not None and row.endswith(f"| {doc} |"), (where, row)


def test_the_regenerate_command_prints_the_page():
    out = subprocess.run([sys.executable, "-m", "filterd.config"], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout == configuration_page()
    assert out.stderr == ""  # no runpy warning, nothing else


def test_importing_the_config_does_not_import_the_decision_code():
    code = "import sys, filterd.config; print(sorted(m for m in sys.modules if m.startswith('filterd.policy')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "filterd.policy.decision" not in out.stdout, out.stdout  # the vocabulary (levels, lists) only
