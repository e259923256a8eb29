"""The package's imports run one way (ARCHITECTURE.md, "Layers"): a module imports its own layer
and the layers below, never one above, and only ``pipeline/runtime/`` imports Ray. Every import
counts, those inside functions and ``if TYPE_CHECKING:`` blocks too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "pipeline"

# Longest dotted prefix wins; "pipeline" alone is the package's __init__.
LAYERS = {
    "pipeline": (1, "leaf"),
    "pipeline.ids": (1, "leaf"),
    "pipeline.layout": (1, "leaf"),
    "pipeline.config": (1, "leaf"),
    "pipeline.devices": (1, "leaf"),
    "pipeline.weighting": (1, "leaf"),
    "pipeline.fingerprints": (1, "leaf"),
    "pipeline.data": (2, "stage"),
    "pipeline.features": (2, "stage"),
    "pipeline.train": (2, "stage"),
    "pipeline.index": (2, "stage"),
    "pipeline.store": (2, "stage"),
    "pipeline.jobfolder": (3, "job folder"),
    "pipeline.validate": (3, "job folder"),
    "pipeline.defense": (4, "query"),
    "pipeline.attacks": (5, "attacks"),
    "pipeline.evaluate": (6, "evaluate"),
    "pipeline.runtime": (7, "runtime"),
    "pipeline.cli": (8, "entry point"),
    "pipeline.serve": (8, "entry point"),
}
RAY_HOME = "pipeline.runtime"


def layer_of(module: str) -> tuple[int, str] | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if n == 1 and len(parts) > 1:
            return None  # "pipeline.<unmapped>" is not the package's __init__
        hit = LAYERS.get(".".join(parts[:n]))
        if hit:
            return hit
    return None


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved; for
    ``from X import y`` the module is X.y when that is a module of the package, else X."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                where = root.parent / Path(*sub.split("."))
                is_module = where.with_suffix(".py").is_file() or where.is_dir()
                found.append((node.lineno, sub if is_module else base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            found.append((node.lineno, node.args[0].value))
    return sorted(set(found))


def violations(root: Path = PACKAGE_DIR) -> list[str]:
    """Every import that runs up the layers, imports an unmapped module of the package, or
    imports Ray outside runtime, one line each."""
    root = root.resolve()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        name = module_name(path, root)
        own = layer_of(name)
        if own is None:
            out.append(f"{rel} is in no layer: add {name} to LAYERS (and ARCHITECTURE.md)")
            continue
        for line, target in imports_of(path, root):
            top = target.split(".")[0]
            if top == "ray" and not (name == RAY_HOME or name.startswith(RAY_HOME + ".")):
                out.append(f"{rel}:{line} imports {target} outside pipeline/runtime/ "
                           f"(only runtime imports Ray)")
            if top != "pipeline":
                continue
            theirs = layer_of(target)
            if theirs is None:
                out.append(f"{rel}:{line} imports {target}, which is in no layer")
            elif theirs[0] > own[0]:
                out.append(f"{rel}:{line} imports {target} ({theirs[1]}, layer {theirs[0]}) "
                           f"from {own[1]} layer {own[0]}")
    return out


def test_imports_run_one_way():
    found = violations()
    assert not found, "imports that break the layer map:\n" + "\n".join(found)


def test_walker_sees_every_kind_of_import(tmp_path):
    """The walker catches imports in functions, relative ones and Ray, and maps unknown modules."""
    pkg = tmp_path / "pipeline"
    for d in ("store", "defense", "runtime", "data"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from pipeline.data.shards import x\n")
    (pkg / "data" / "shards.py").write_text("x = 1\n")
    (pkg / "defense" / "weighting.py").write_text("w = 1\n")
    (pkg / "store" / "softmax_store.py").write_text(
        "from ..defense import weighting\nfrom ..data.shards import x\n")
    (pkg / "defense" / "searchers.py").write_text("def g():\n    import ray\n")
    (pkg / "runtime" / "ok.py").write_text("import ray\nfrom pipeline.store import softmax_store\n")
    (pkg / "extra.py").write_text("")
    found = violations(pkg)
    assert found == [
        "pipeline/config.py:2 imports pipeline.data.shards (stage, layer 2) from leaf layer 1",
        "pipeline/defense/searchers.py:2 imports ray outside pipeline/runtime/ (only runtime imports Ray)",
        "pipeline/extra.py is in no layer: add pipeline.extra to LAYERS (and ARCHITECTURE.md)",
        "pipeline/store/softmax_store.py:1 imports pipeline.defense.weighting (query, layer 4) "
        "from stage layer 2",
    ], found
