"""The README's configuration reference is the one the code generates (documentation cannot drift)."""

from filterd.config import config_reference

from tests.conftest import REPO


def test_readme_lists_every_config_key_with_its_default():
    readme = (REPO / "README.md").read_text()
    for row in config_reference().strip().splitlines()[2:]:
        assert row in readme, row
