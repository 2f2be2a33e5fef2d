"""The README stays true: its test command is CI's, and its config reference is the code's."""

from __future__ import annotations

import re
from pathlib import Path

from trainer.config import reference_markdown

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def readme_test_command() -> str:
    block = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```\s*<!-- /test-command -->", README, re.S)
    assert block, "README.md lost its marked test command"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_test_command() in [line.strip() for line in ci]


def test_config_reference_matches_the_code():
    block = re.search(r"<!-- config-reference -->\n(.+?)<!-- /config-reference -->", README, re.S)
    assert block, "README.md lost its config reference"
    assert block.group(1).strip() == reference_markdown().strip(), "regenerate with: python -c 'from trainer.config import reference_markdown as r; print(r())'"


def test_readme_names_every_shipped_config():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        assert str(path.relative_to(REPO)) in README, path
