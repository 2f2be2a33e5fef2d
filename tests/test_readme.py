"""The README and docs/ stay true: the README's test command is CI's, the config reference is
the code's, every docs page is reachable from the README, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainer.config import reference_markdown

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
PAGES = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").glob("*.md")])
README_MAX_LINES = 250


def readme_test_command() -> str:
    block = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```\s*<!-- /test-command -->", README, re.S)
    assert block, "README.md lost its marked test command"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_test_command() in [line.strip() for line in ci]


def test_config_reference_matches_the_code():
    page = (REPO / "docs" / "config.md").read_text()
    block = re.search(r"<!-- config-reference -->\n(.+?)<!-- /config-reference -->", page, re.S)
    assert block, "docs/config.md lost its config reference"
    regenerate = "regenerate with: python -c 'from trainer.config import reference_markdown as r; print(r())'"
    assert block.group(1).strip() == reference_markdown().strip(), regenerate


def test_the_readme_stays_a_five_minute_read():
    assert len(README.splitlines()) <= README_MAX_LINES


def test_readme_names_every_shipped_config():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        assert str(path.relative_to(REPO)) in README, path


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target).resolve() for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", README)}
    assert {p for p in PAGES if p.name != "README.md"} - linked == set()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith(("http://", "https://", "#")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve()
        assert resolved.exists(), f"{page.name}: {target}"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)
            slugs = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{page.name}: {target} (no such heading)"
