"""Class names people can read: ImageNet synsets described from timm's offline ImageNet metadata.

Label names stay what the data calls its classes (folder names, an HF dataset's
`ClassLabel` names, `_info.json`'s classes); descriptions are added only where they are
known, so `n01440764` is shown as "tench, Tinca tinca" and `digit_3` stays `digit_3`.
"""

from __future__ import annotations

import re
from functools import lru_cache

_SYNSET = re.compile(r"^n\d{8}$")  # a WordNet noun synset id, as ImageNet names its classes


@lru_cache(maxsize=1)
def _imagenet_lemmas():
    """timm's ImageNetInfo, or None when this timm has none (descriptions are then left out).

    NOTE: ImageNetInfo reads its synset and lemma tables from files shipped inside timm
    (timm/data/_info/, read with pkgutil in timm/data/imagenet_info.py), so it works
    offline; the lemma table covers all ImageNet-22k synsets, not only the 1k.
    """
    try:
        from timm.data import ImageNetInfo

        return ImageNetInfo()
    except (ImportError, OSError, AssertionError):
        return None


def label_descriptions(names: list[str]) -> dict[str, str]:
    """Descriptions of the names that are ImageNet synsets, keyed by name; {} when none are."""
    synsets = [name for name in names if _SYNSET.match(name)]
    info = _imagenet_lemmas() if synsets else None
    if info is None:
        return {}
    described = {}
    for name in synsets:
        try:
            described[name] = info.label_name_to_description(name)
        except KeyError:  # shaped like a synset, but not one ImageNet knows
            continue
    return described


def display_name(name: str, descriptions: dict[str, str]) -> str:
    """What a person reads for a class: its description when known, else its name."""
    return descriptions.get(name) or name
