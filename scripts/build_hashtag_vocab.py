#!/usr/bin/env python
"""Regenerate pipeline/data/imagenet_hashtags.json, the ImageNet-1k hashtag vocabulary.

Following Dubey et al. (CVPR 2019), every WordNet 3.0 synonym (lemma) of the 1,000 ImageNet-1k
synsets is canonicalised into a hashtag; a hashtag keeps every class it names ("crane" is
both a bird and a machine).

Inputs (both found automatically, both overridable):
  * the ordered synset list shipped by timm: timm/data/_info/imagenet_synsets.txt
    (``pip install timm``; ``--synsets PATH``);
  * WordNet 3.0 data.noun from the Debian package wordnet-base
    (``apt-get install -y wordnet-base``; ``--wordnet PATH``).

Usage: python scripts/build_hashtag_vocab.py [--synsets P] [--wordnet P] [--out P]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from pipeline.data.hashtags import canonicalize, default_path

TIMM_SYNSETS = Path("data") / "_info" / "imagenet_synsets.txt"
DEBIAN_DATA_NOUN = "/usr/share/wordnet/data.noun"
# Syntactic markers such as "(a)", "(p)", "(ip)" follow adjective lemmas in WordNet data files.
_MARKER = re.compile(r"\([a-z]+\)$")


def fail(message: str) -> None:
    sys.exit(f"build_hashtag_vocab: {message}")


def timm_synsets_path() -> Path:
    """Locate timm's synset list without importing timm (which would pull in torch)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        fail("timm is not installed (pip install timm) and no --synsets was given")
    return Path(spec.origin).parent / TIMM_SYNSETS


def wordnet_path() -> Path:
    """data.noun as installed by the wordnet-base package (dpkg knows where), else the usual path."""
    try:
        files = subprocess.run(["dpkg", "-L", "wordnet-base"], capture_output=True, text=True,
                               check=True).stdout.split()
        found = [f for f in files if f.endswith("/data.noun")]
        if found:
            return Path(found[0])
    except (OSError, subprocess.CalledProcessError):
        pass
    return Path(DEBIAN_DATA_NOUN)


def package_version(deb: str | None = None, dist: str | None = None) -> str | None:
    """Version of a Debian package or Python distribution, recorded in the output for provenance."""
    try:
        if dist:
            return importlib.metadata.version(dist)
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", deb], capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError, importlib.metadata.PackageNotFoundError):
        return None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_synsets(path: Path) -> list[str]:
    """The ordered wnids, one per line; the order defines the class indices."""
    if not path.is_file():
        fail(f"synset list not found: {path} (install timm or pass --synsets)")
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [w for w in wnids if not re.fullmatch(r"n\d{8}", w)]
    if bad:
        fail(f"{path}: not wnids: {bad[:5]}")
    if len(set(wnids)) != len(wnids):
        fail(f"{path}: duplicate wnids")
    return wnids


def parse_lemmas(line: str) -> list[str]:
    """Lemmas of one data.noun line: ``offset lex_filenum ss_type w_cnt word lex_id ...``
    where w_cnt is hexadecimal. '_' stands for a space in lemmas."""
    fields = line.split()
    count = int(fields[3], 16)
    words = fields[4:4 + 2 * count:2]
    return [_MARKER.sub("", w).replace("_", " ") for w in words]


def read_wordnet(path: Path, wanted: set[str]) -> dict[str, list[str]]:
    """wnid -> lemmas for the wanted synsets (a wnid is 'n' + the noun's byte offset)."""
    if not path.is_file():
        fail(f"WordNet data.noun not found: {path} (apt-get install wordnet-base or pass --wordnet)")
    lemmas: dict[str, list[str]] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" "):  # the licence header lines start with two spaces
                continue
            wnid = "n" + line[:8]
            if wnid in wanted:
                lemmas[wnid] = parse_lemmas(line)
    missing = sorted(wanted - lemmas.keys())
    if missing:
        fail(f"{len(missing)} wnids missing from {path} (is it WordNet 3.0?): {missing[:5]}")
    return lemmas


def build(wnids: list[str], lemmas: dict[str, list[str]]) -> tuple[dict[str, list[int]], list[str]]:
    """hashtag -> sorted class indices, and each class's readable name (its first lemma)."""
    classes: dict[str, set[int]] = defaultdict(set)
    for index, wnid in enumerate(wnids):
        for lemma in lemmas[wnid]:
            if tag := canonicalize(lemma):
                classes[tag].add(index)
    hashtags = {tag: sorted(classes[tag]) for tag in sorted(classes)}
    return hashtags, [lemmas[w][0] for w in wnids]


def dumps(doc: dict) -> str:
    """JSON with sorted keys and one list item / hashtag per line, so regenerations diff cleanly."""
    def line(value: object) -> str:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)

    parts = []
    for key in sorted(doc):
        value = doc[key]
        if isinstance(value, list):
            body = ",\n".join(f"    {line(v)}" for v in value)
            parts.append(f'  {line(key)}: [\n{body}\n  ]')
        elif isinstance(value, dict) and key == "hashtags":
            body = ",\n".join(f"    {line(k)}: {line(v)}" for k, v in value.items())
            parts.append(f'  {line(key)}: {{\n{body}\n  }}')
        else:  # small nested objects (the provenance block): ordinary indentation
            nested = json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)
            parts.append(f"  {line(key)}: " + nested.replace("\n", "\n  "))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def report(hashtags: dict[str, list[int]], num_classes: int) -> None:
    per_class = [0] * num_classes
    for classes in hashtags.values():
        for c in classes:
            per_class[c] += 1
    print(f"hashtags: {len(hashtags)} (the paper reports ~1,500)")
    print(f"classes with >1 hashtag: {sum(n > 1 for n in per_class)} of {num_classes}")
    print(f"classes without a hashtag: {sum(n == 0 for n in per_class)}")
    shared = {t: c for t, c in hashtags.items() if len(c) > 1}
    print(f"hashtags shared by >1 class: {len(shared)}: {', '.join(sorted(shared))}")


def display_path(path: Path, root: Path | None) -> str:
    """Path relative to its package root when possible, so the output does not depend on where
    the venv lives."""
    try:
        return str(path.resolve().relative_to(root.resolve())) if root else str(path)
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synsets", type=Path, help="ordered ImageNet-1k wnids (default: timm's)")
    parser.add_argument("--wordnet", type=Path, help="WordNet 3.0 data.noun (default: wordnet-base)")
    parser.add_argument("--out", type=Path, default=Path(default_path()), help="output JSON path")
    args = parser.parse_args(argv)

    synsets_path = args.synsets or timm_synsets_path()
    wordnet = args.wordnet or wordnet_path()
    wnids = read_synsets(synsets_path)
    lemmas = read_wordnet(wordnet, set(wnids))
    hashtags, names = build(wnids, lemmas)

    timm_root = None if args.synsets else synsets_path.parents[3]  # site-packages
    doc = {
        "source": {
            "synsets": {"path": display_path(synsets_path, timm_root),
                        "timm": None if args.synsets else package_version(dist="timm"),
                        "sha256": sha256(synsets_path)},
            "wordnet": {"path": str(wordnet), "wordnet-base": package_version(deb="wordnet-base"),
                        "sha256": sha256(wordnet)},
            "script": "scripts/build_hashtag_vocab.py",
        },
        "num_classes": len(wnids),
        "synsets": wnids,
        "class_names": names,
        "hashtags": hashtags,
    }
    text = dumps(doc)
    assert json.loads(text) == doc, "writer produced JSON that does not round-trip"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    report(hashtags, len(wnids))


if __name__ == "__main__":
    main()
