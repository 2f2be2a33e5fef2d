"""Which torch_mlu release line the emulated MLU behaves as.

Cambricon's torch_mlu 1.22 comes in one build per torch line (branches ``r1.22_pt2.1.0``,
``r1.22_pt2.3.0``, ``r1.22_pt2.4.0``), and the lines differ in what a trainer meets: the loss
scaler's class, the names of the collective error-handling variables, the error type of a
refused AVG. The emulator takes the line of the installed torch (before 2.3: 2.1; 2.3; 2.4
and later: 2.4) or the one named by ``EMULATED_TORCH_MLU_LINE`` (``2.1``, ``2.3`` or ``2.4``),
which may disagree with the installed torch: that is the mismatched install
``trainer doctor`` has to catch.
"""

from __future__ import annotations

import os

import torch

LINES = ("2.1", "2.3", "2.4")
LINE_VARIABLE = "EMULATED_TORCH_MLU_LINE"
# NOTE: scripts/release/build.property on each branch: "1.22.2-torch2.1.0", ... ; torch_mlu's
# __version__ comes from it (codegen/gen_mlu_stubs.py reads its "version").
RELEASE = "1.22.2"


def torch_line(version: str) -> str:
    """The torch_mlu line that serves a torch version: 2.2 has none, so it maps to 2.1."""
    major_minor = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if major_minor < (2, 3):
        return "2.1"
    return "2.3" if major_minor < (2, 4) else "2.4"


def current_line() -> str:
    """The line named by ``EMULATED_TORCH_MLU_LINE``, else the installed torch's."""
    named = os.environ.get(LINE_VARIABLE, "").strip()
    if not named:
        return torch_line(torch.__version__)
    if named not in LINES:
        raise ImportError(f"{LINE_VARIABLE}={named!r}: the emulated torch_mlu has lines {', '.join(LINES)}")
    return named


def _version() -> str:
    """torch_mlu's version string: the line's torch when named, else the installed torch's."""
    if os.environ.get(LINE_VARIABLE, "").strip():
        return f"{RELEASE}-torch{LINE}.0"
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"{RELEASE}-torch{major}.{minor}.0"


LINE = current_line()
AT_LEAST_2_3 = LINE != "2.1"
VERSION = _version()
