"""Render the result tables in docs/*.md from the committed JSON under benchmarks/results/, so the
numbers in the docs cannot drift from the measurements.

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in a Markdown file; NAME is a
renderer below. ``python scripts/render_docs.py`` rewrites the tables; ``--check`` exits 1 when a
file is out of date (the test suite runs that).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "docs" / "gpu.md"]
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _rate(r: dict) -> str:
    lo, hi = r["ci95"]
    if r["rate"] == 1.0:
        return f"{r['n']}/{r['n']} ({lo:.4f}–1)"
    return f"{r['rate']:.4f} ({lo:.4f}–{hi:.4f})"


def _agreement_rows(block: dict, query: str) -> list[str]:
    rows = []
    for recipe, r in block["recipes"].items():
        if "skipped" in r:
            rows.append(f"| {recipe} | {query} | not measured ({r['skipped']}) | | | |")
            continue
        s, d = r["self_retrieval"], r["decision_agreement"]
        rows.append(f"| {recipe} | {query} | {_rate(s)} | {_rate(d['uw'])} | {_rate(d['cbw_d'])} "
                    f"| {s['cosine_mean']:.6f} / {s['cosine_min']:.6f} |")
    return rows


HEADER = ("| database recipe | query recipe | self-retrieval | decisions UW | decisions CBW-D "
          "| cosine (mean / min) |\n|---|---|---|---|---|---|")


def gpu_recipes() -> str:
    rec = _load("gpu_check.json")["recipes"]
    rows = (_agreement_rows(rec["query_cpu_fp32"], "cpu/fp32")
            + _agreement_rows(rec["query_cpu_bf16"], "cpu/bf16 (emulated)"))
    return HEADER + "\n" + "\n".join(rows) + "\n"


def cpu_recipes() -> str:
    data = _load("recipe_agreement.json")
    out = []
    for key, title in (("fashion_mnist", "Fashion-MNIST (the demo's SmallResNet)"),
                       ("efficientnet_lite0", "EfficientNet-Lite0 (pretrained)")):
        block = data[key]
        out.append(f"{title}: database {block['database_images']:,} images, "
                   f"{block['decision_queries']:,} decision queries, K = {block['k']}\n")
        out.append(HEADER + "\n" + "\n".join(_agreement_rows(block, block["reference"])) + "\n")
    return "\n".join(out)


def gpu_forward() -> str:
    fwd = _load("gpu_check.json")["forward_img_per_s"]
    rows = ["| model | batch | bf16 | fp32 (TF32 off) | tf32 |", "|---|---|---|---|---|"]
    for arch in ("efficientnet-lite0", "resnet50"):
        for batch in (128, 256):
            cells = [fwd.get(f"{arch}/{p}/b{batch}") for p in ("bf16", "fp32", "tf32")]
            if any(c is not None for c in cells):
                rows.append(f"| {arch} | {batch} | "
                            + " | ".join("–" if c is None else f"{c:,.0f}" for c in cells) + " |")
    return "\n".join(rows) + "\n"


def gpu_extract() -> str:
    data = _load("gpu_check.json")
    per_core = data.get("pillow_decode_img_per_s_per_core", {})
    rows = ["| model / precision | bare img/s | photos | decoder | img/s | ratio to bare "
            "| peak GPU MiB |", "|---|---|---|---|---|---|---|"]
    for key, block in data.items():
        if not key.startswith("extract/"):
            continue
        for run_key, run in block.items():
            if not isinstance(run, dict):
                continue
            size, decoder = run_key.split("/", 1)
            n = run.get("decode_workers") or run.get("decode_threads")  # key of the first run
            if decoder == "pil":  # the first run had threads only
                decoder = "pil-threads"
            workers = f" ({n} workers)" if n else ""
            rows.append(f"| {block['arch']} / {block['precision']} | {block['bare_img_per_s']:,.0f} "
                        f"| {size} | {decoder}{workers} | {run['img_per_s']:,.0f} "
                        f"| {run['ratio_to_bare']:.3f} | {run.get('peak_gpu_mib', '–')} |")
    text = "\n".join(rows) + "\n"
    if per_core:
        text += ("\nPillow decode + resize + crop on one core: "
                 + ", ".join(f"{k} {v:,.0f} img/s" for k, v in per_core.items()) + ".\n")
    return text


def shard_overhead() -> str:
    data = _load("shard_overhead.json")
    rows = ["| how shards run | stage wall s | wall s / shard | worker-s per shard beyond extraction |",
            "|---|---|---|---|"]
    for mode, m in data["modes"].items():
        rows.append(f"| {mode} | {m['wall_s']} | {m['seconds_per_shard']} "
                    f"| {m['overhead_s_per_shard']} |")
    return ("\n".join(rows) + f"\n\n{data['shards']} shards of {data['images_per_shard']} "
            f"Fashion-MNIST images, {data['model']}, {data['cpus']} CPUs (two shards at a time); the "
            f"extraction itself takes {data['in_process_s_per_shard']} s per shard in one "
            "process.\n")


RENDERERS = {"shard-overhead": shard_overhead, "gpu-recipes": gpu_recipes, "cpu-recipes": cpu_recipes, "gpu-forward": gpu_forward,
             "gpu-extract": gpu_extract}


def render(text: str) -> str:
    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise KeyError(f"unknown table {name!r}: renderers are {sorted(RENDERERS)}")
        return m.group(1) + RENDERERS[name]() + m.group(4)

    return BLOCK.sub(one, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a doc is out of date")
    args = ap.parse_args()
    stale = []
    for path in DOCS:
        old = path.read_text()
        new = render(old)
        if new != old:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("out of date (run python scripts/render_docs.py): "
              + ", ".join(str(p.relative_to(ROOT)) for p in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
