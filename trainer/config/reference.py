"""The config reference, generated from the sections so that it cannot drift from the code."""

from __future__ import annotations

import dataclasses
from typing import Any

from trainer.config.sections import SECTIONS


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def describe_sections() -> str:
    """One line per field, by section: the text of `--help` and the README's reference."""
    lines = []
    for name, section_type in SECTIONS.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(section_type):
            default = _default(f)
            shown = [c or '""' for c in f.metadata["choices"]]
            choices = f" [{'|'.join(shown)}]" if shown else ""
            lines.append(f"  {name}.{f.name} = {default!r}{choices}: {f.metadata['help']}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The README's config reference, generated so it cannot drift from the code."""
    lines = []
    for name, section_type in SECTIONS.items():
        lines += [f"**{name}**", "", "| key | default | description |", "| --- | --- | --- |"]
        for f in dataclasses.fields(section_type):
            default = _default(f)
            choices = f" One of: {', '.join(repr(c) for c in f.metadata['choices'])}." if f.metadata["choices"] else ""
            lines.append(f"| `{name}.{f.name}` | `{default!r}` | {f.metadata['help'].replace('|', '/')}.{choices} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
