"""What the host's Python lacks of the project's requirements, for a device check that installs nothing.

A lent GPU machine or a firewalled MLU server has torch, accelerate and timm but may lack
`datasets` (only HF sources need it) or `simplejpeg` (PIL decodes JPEGs without it), and
reach no package index. `device_check.sh` asks this what to fetch where an index answers, and
`device_check.py` records what stayed missing. Requirements are read from setup.cfg
(install_requires and the `fast` extra), so the list cannot drift from the package's.

    python benchmarks/host_packages.py --missing     # requirement lines not met, one a line
    python benchmarks/host_packages.py --pins        # torch, torch_mlu, torchvision as installed
"""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import json
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Import names where they differ from the distribution's.
MODULES = {"pyyaml": "yaml", "pillow": "PIL", "scikit-learn": "sklearn"}
# What a missing piece costs; any other requirement is needed by the trainer itself.
OPTIONAL = {
    "datasets": "HF sources (data.source: hf) cannot be read; folder and tar-shard sources work",
    "simplejpeg": "JPEGs decode through PIL (a slower input pipeline, same pixels)",
}
# Installed by the host's vendor (Cambricon ships torch and torch_mlu): never replaced by pip.
PINNED = ("torch", "torch_mlu", "torchvision")


def requirements(extras: tuple[str, ...] = ("fast",)) -> list[str]:
    """The package's requirement lines: install_requires plus `extras`, comments dropped."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += cfg["options.extras_require"].get(extra, "").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _split(line: str) -> tuple[str, str]:
    name = re.match(r"[A-Za-z0-9_.-]+", line).group(0)
    return name, line[len(name) :].strip()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a module set to None
        return False


def check(lines: list[str] | None = None) -> dict[str, dict[str, str]]:
    """{"missing": {name: what it costs}, "too_old": {name: "installed, needs spec"}} for this Python."""
    found: dict[str, dict[str, str]] = {"missing": {}, "too_old": {}}
    for line in requirements() if lines is None else lines:
        name, spec = _split(line)
        if not _importable(MODULES.get(name.lower(), name.replace("-", "_"))):
            found["missing"][name] = OPTIONAL.get(name, "required by the trainer")
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:  # importable without metadata (a checkout on the path)
            continue
        if spec and not _satisfies(installed, spec):
            found["too_old"][name] = f"{installed} installed, the trainer needs {spec}"
    return found


def to_fetch() -> list[str]:
    """The requirement lines to ask an index for: what is missing or too old, except the vendor's torch."""
    found = check()
    names = (set(found["missing"]) | set(found["too_old"])) - {"torch", "torch_mlu"}
    return [line for line in requirements() if _split(line)[0] in names]


def _satisfies(version: str, spec: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # no packaging: say nothing rather than guess
        return True
    return SpecifierSet(spec).contains(version, prereleases=True)


def pins() -> list[str]:
    """`name==version` for the vendor-installed packages present, as a pip constraints file takes them."""
    out = []
    for name in PINNED:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--missing", action="store_true", help="print the requirement lines this Python does not meet")
    p.add_argument("--pins", action="store_true", help="print torch/torch_mlu/torchvision pins for pip -c")
    args = p.parse_args()
    if args.pins:
        print("\n".join(pins()))
    elif args.missing:
        print("\n".join(to_fetch()))
    else:
        print(json.dumps(check(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
