"""README.md and docs/*.md: their result tables and quoted numbers are what scripts/render_docs.py
renders from the committed results, every make target and CLI command is documented, and every
`make ...` / `knn-defense ...` the docs name exists."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from pipeline.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")
KNN = re.compile(r"knn-defense\s+([a-z][a-z0-9-]*)(?:\s+([a-z][a-z0-9-]*))?")
MAKE = re.compile(r"(?:^|&&|;)\s*(?:\$\s+)?make\s+([a-z][a-z0-9-]*)")


def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text(path: Path) -> str:
    return path.read_text()


def _code(text: str) -> list[str]:
    """Code of a Markdown text: fenced blocks, indented blocks (4 spaces after a blank line or
    another indented line) and inline code spans."""
    pieces = FENCE.findall(text)
    prose = []
    after_blank_or_code = True
    for line in FENCE.sub("", text).splitlines():
        if line.startswith("    ") and after_blank_or_code and not line.lstrip().startswith(("-", "*", "|")):
            pieces.append(line.strip())
            continue
        prose.append(line)
        after_blank_or_code = not line.strip()
    return pieces + SPAN.findall("\n".join(prose))


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        if cmd.hidden:
            continue
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


def _make_targets(help_only: bool) -> set[str]:
    text = (ROOT / "Makefile").read_text()
    if help_only:
        return set(re.findall(r"^([a-z][a-z0-9-]*):[^=\n]*## ", text, re.M))
    return set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", text, re.M))


# (a) rendered = committed


def test_docs_equal_what_render_docs_renders():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/render_docs.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_render_docs_covers_the_readme_and_every_page():
    rd = _render_docs()
    assert set(DOCS) <= set(rd.DOCS)


def test_inline_numbers_are_rendered_from_the_results():
    rd = _render_docs()
    # the topk16 store's bytes per image, as benchmarks/results/defended_query.json has it
    text = "store <!-- n:dq.store-topk16-bytes -->~72<!-- /n --> B/image"
    assert rd.render(text) == "store <!-- n:dq.store-topk16-bytes -->74.0<!-- /n --> B/image"
    assert rd.render(rd.render(text)) == rd.render(text)
    # a number shown inside a code span (as the docs explain the syntax) is left alone
    assert rd.render("`<!-- n:NAME -->74.0<!-- /n -->`") == "`<!-- n:NAME -->74.0<!-- /n -->`"
    with pytest.raises(KeyError, match="unknown number"):
        rd.render("<!-- n:no-such-number -->1<!-- /n -->")


def test_every_number_and_table_renders():
    rd = _render_docs()
    for name, fn in rd.NUMBERS.items():
        value = fn()
        assert isinstance(value, str) and value and "\n" not in value, name
    for name, fn in rd.RENDERERS.items():
        assert fn().endswith("\n"), name


def test_every_inline_number_in_the_docs_is_known():
    rd = _render_docs()
    used = {m.group("name") for path in DOCS for m in rd.INLINE.finditer(_text(path))}
    assert used <= set(rd.NUMBERS), used - set(rd.NUMBERS)
    assert used, "no inline numbers found"


def test_store_margins_sentence_matches_the_json():
    """The review found 'every disagreement had a margin below 0.0015', false for k = 4, 8, 12."""
    rd = _render_docs()
    text = rd.NUMBERS["sa.margins"]()
    assert "k = 4 0.0087" in text and "k = 8 0.0037" in text and "k = 12 0.0025" in text


# (b) every make target and CLI command is documented


def _all_docs() -> str:
    return "\n".join(_text(p) for p in DOCS)


@pytest.mark.parametrize("target", sorted(_make_targets(help_only=True)))
def test_every_make_target_is_documented(target):
    assert re.search(rf"\bmake\s+{re.escape(target)}(?![\w-])", _all_docs()), \
        f"`make {target}` is not named in README.md or docs/"


@pytest.mark.parametrize("path", [" ".join(p) for p in _commands(cli_main)])
def test_every_cli_command_is_documented(path):
    words = r"\s+".join(map(re.escape, path.split()))
    assert re.search(rf"knn-defense\s+{words}(?![\w-])", _all_docs()), \
        f"`knn-defense {path}` is not named in README.md or docs/"


# (c) what the docs name exists


def test_every_named_cli_command_exists():
    missing = []
    for path in DOCS:
        for code in _code(_text(path)):
            for cmd, sub in KNN.findall(code):
                found = cli_main.commands.get(cmd)
                if found is None:
                    missing.append(f"{path.name}: knn-defense {cmd}")
                elif isinstance(found, click.Group) and sub and sub not in found.commands:
                    missing.append(f"{path.name}: knn-defense {cmd} {sub}")
    assert not missing, missing


def test_every_named_make_target_exists():
    targets = _make_targets(help_only=False)
    named, missing = set(), []
    for path in DOCS:
        for code in _code(_text(path)):
            for line in code.splitlines():
                for target in MAKE.findall(line):
                    named.add(target)
                    if target not in targets:
                        missing.append(f"{path.name}: make {target}")
    assert not missing, missing
    assert {"demo", "test"} <= named


def test_code_parser_finds_spans_and_blocks():
    text = ("Run `make demo` or `knn-defense index\nbuild x.yaml`.\n\n    make test   # all\n\n"
            "```sh\nknn-defense serve --job runs/demo\n```\n")
    code = _code(text)
    assert "make demo" in code and "make test   # all" in code
    assert any(KNN.search(c) and KNN.search(c).groups() == ("index", "build") for c in code)
    assert any(c.startswith("knn-defense serve") for c in code)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    text = FENCE.sub("", _text(path))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_between_pages_and_to_images_resolve():
    bad = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", _text(path))):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{path.name}: {target} (no such heading)")
    assert not bad, bad


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent is a module, not a package
        return False


def test_repository_paths_and_modules_the_docs_name_exist():
    """Paths (`pipeline/...`, `benchmarks/...`) and modules (`pipeline.x.y`) in the docs' code."""
    bad = []
    for path in DOCS:
        for code in _code(_text(path)):
            for name in re.findall(r"(?<![\w./-])((?:pipeline|benchmarks|scripts|tests|jobs|"
                                   r"experiments|cluster)/[\w./*-]*\w)", code):
                if not re.search(r"[A-Z]{3,}", name) and not list(ROOT.glob(name)):  # NAME: a placeholder
                    bad.append(f"{path.name}: {name}")
            for name in re.findall(r"(?<![\w.])(pipeline(?:\.\w+)+)", code):
                parts = name.split(".")
                while len(parts) > 1 and not _is_module(".".join(parts)):
                    parts.pop()
                if len(parts) < 2:
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad
