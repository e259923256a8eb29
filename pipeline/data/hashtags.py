"""The ImageNet-1k hashtag vocabulary behind the paper's IG-N-Targeted databases.

Dubey et al. (CVPR 2019) keep only Instagram images whose hashtags match one of the ~1,500
hashtags obtained by canonicalising the WordNet synonyms of the 1,000 ImageNet-1k synsets.
The vocabulary is committed as ``imagenet_hashtags.json`` (regenerate it with
``scripts/build_hashtag_vocab.py``); this module loads it and pulls canonical tags out of
sample metadata and captions so that both sides are compared in the same form.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

DEFAULT_FILE = "imagenet_hashtags.json"

_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
# '#' followed by word characters; in Python 3 \w already covers unicode letters and digits.
_CAPTION_HASHTAG = re.compile(r"#(\w+)")


def canonicalize(tag: str) -> str:
    """Canonical hashtag form: ASCII-folded, lower case, only ``[a-z0-9]``.

    Folding before filtering keeps accented letters ("Café" -> "cafe") instead of dropping
    them; removing separators makes "Golden_Retriever", "golden-retriever" and
    "golden retriever" the same tag. Anything that is not a string gives "".
    """
    if not isinstance(tag, str):
        return ""
    return _canonicalize_str(tag)


@functools.lru_cache(maxsize=1 << 17)  # web tags are Zipf-distributed: most lookups repeat
def _canonicalize_str(tag: str) -> str:
    folded = unicodedata.normalize("NFKD", tag).casefold()
    # NFKD splits "é" into "e" + a combining accent; the ASCII filter then drops the accent.
    folded = folded.encode("ascii", "ignore").decode("ascii")
    return _NOT_ALNUM.sub("", folded)


@dataclass(frozen=True)
class Vocabulary:
    """Hashtag -> ImageNet-1k class indices (timm order), plus the synsets and class names."""

    hashtags: Mapping[str, tuple[int, ...]]
    synsets: tuple[str, ...]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.synsets)

    def classes_of(self, tag: str) -> tuple[int, ...]:
        """Sorted class indices of ``tag`` (any spelling); empty when it is not in the vocabulary."""
        return self.hashtags.get(canonicalize(tag), ())

    def match(self, tags: Iterable[str]) -> tuple[list[str], list[int]]:
        """The canonical tags among ``tags`` that are in the vocabulary and their classes, both
        sorted and deduplicated; two empty lists when none match."""
        matched = {t for t in map(canonicalize, tags) if t in self.hashtags}
        classes = {c for t in matched for c in self.hashtags[t]}
        return sorted(matched), sorted(classes)

    def __len__(self) -> int:
        return len(self.hashtags)

    def __contains__(self, tag: object) -> bool:
        return isinstance(tag, str) and canonicalize(tag) in self.hashtags


def default_path() -> str:
    """Path of the committed vocabulary file, found through the package so installs work too."""
    return str(resources.files(__package__).joinpath(DEFAULT_FILE))


def load_vocabulary(path: str | None = None) -> Vocabulary:
    """Load and validate a vocabulary JSON file (the committed one by default)."""
    path = path or default_path()
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"hashtag vocabulary not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"hashtag vocabulary {path} is not valid JSON: {e}") from None
    try:
        return _parse(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"hashtag vocabulary {path} is malformed: {e}") from None


def _parse(raw: Any) -> Vocabulary:
    """Check the structure strictly: a silently wrong vocabulary would mislabel a whole database."""
    if not isinstance(raw, dict):
        raise TypeError("top level must be an object")
    synsets, names, tags = raw["synsets"], raw["class_names"], raw["hashtags"]
    if not (isinstance(synsets, list) and all(isinstance(s, str) for s in synsets)):
        raise TypeError("'synsets' must be a list of strings")
    n = len(synsets)
    if raw.get("num_classes", n) != n or not isinstance(names, list) or len(names) != n:
        raise ValueError(f"'num_classes' and 'class_names' must match the {n} synsets")
    if not isinstance(tags, dict):
        raise TypeError("'hashtags' must be an object")
    hashtags: dict[str, tuple[int, ...]] = {}
    for tag, classes in tags.items():
        if not tag or canonicalize(tag) != tag:
            raise ValueError(f"hashtag {tag!r} is not canonical")
        ok = isinstance(classes, list) and classes
        if not ok or not all(type(c) is int and 0 <= c < n for c in classes):
            raise ValueError(f"hashtag {tag!r} needs a non-empty list of class indices < {n}")
        hashtags[tag] = tuple(sorted(set(classes)))
    return Vocabulary(hashtags, tuple(synsets), tuple(str(x) for x in names))


def _lookup(meta: Mapping[str, Any], field: str) -> Any:
    """``meta[field]``, or a nested value for a dotted name like "meta.tags"; None if absent."""
    if field in meta:
        return meta[field]
    value: Any = meta
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _field_tags(value: Any) -> list[str]:
    """Raw tags from a field value: a list holds one tag per item (non-strings skipped); a string
    is split on commas when it has any (so "golden retriever, tabby" keeps multi-word tags),
    otherwise on whitespace."""
    if isinstance(value, str):
        sep = "," if "," in value else None
        return value.split(sep)
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def extract_tags(meta: Mapping[str, Any] | None, caption: str | None, field: str = "tags") -> list[str]:
    """Canonical tags of one sample: the metadata ``field`` first, then ``#hashtags`` in the
    caption; empties dropped, duplicates removed keeping first-seen order. Never raises on
    missing or oddly typed inputs, since web metadata is messy."""
    raw: list[str] = []
    if isinstance(meta, Mapping):
        raw += _field_tags(_lookup(meta, field))
    if isinstance(caption, str):
        raw += _CAPTION_HASHTAG.findall(caption)
    tags = (canonicalize(t) for t in raw)
    return list(dict.fromkeys(t for t in tags if t))
