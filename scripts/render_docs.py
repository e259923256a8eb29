"""Render the result tables in docs/*.md from the committed JSON under benchmarks/results/, so the
numbers in the docs cannot drift from the measurements.

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in a Markdown file; NAME is a
renderer below. A number quoted in prose is ``<!-- n:NAME -->VALUE<!-- /n -->`` (README.md and
the reference pages), NAME a key of NUMBERS. ``python scripts/render_docs.py`` (``make docs``)
rewrites both; ``--check`` exits 1 when a file is out of date (the test suite runs that).
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


# --- README.md and the reference pages in docs/: tables, and numbers quoted in prose ----------
# A number in prose is ``<!-- n:NAME -->VALUE<!-- /n -->`` (on one line); NUMBERS[NAME]() gives
# VALUE. Sources: benchmarks/results/*.json, docs/demo_results.csv (the demo's results.csv) and
# the committed reproduction reports docs/fm_results.md, docs/imagenet_results.md.

DOCS += [ROOT / "README.md"] + [p for p in sorted((ROOT / "docs").glob("*.md")) if p not in DOCS]
INLINE = re.compile(r"(?<!`)<!-- n:(?P<name>[\w.-]+) -->(?P<body>[^\n]*?)<!-- /n -->")
DEMO_CSV = ROOT / "docs" / "demo_results.csv"
# pipeline/evaluate/suite.py's column titles and pipeline's weighting names (kept here so that
# rendering the docs imports nothing of the package)
ATTACK_TITLES = {"pgd": "PGD", "fgsm": "FGSM", "ifgsm": "I-FGSM", "cw": "CW-L2", "pgd_pr": "PGD-PR",
                 "pgd_fs": "PGD-FS", "adaptive": "adaptive", "min_norm": "min-norm kNN",
                 "noise": "random noise", "hsj": "HSJ"}
THREAT_TITLES = {"gray_box": "gray", "black_box": "black", "white_box": "white", "random": "",
                 "hard_label": "hard-label"}
WEIGHTING_TITLES = {"uw": "UW", "cbw_e": "CBW-E", "cbw_d": "CBW-D"}


def _get(data, path: str):
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _n(file: str, path: str, fmt: str = "{}", scale: float = 1):
    """A number from benchmarks/results/<file>: ``fmt.format(value * scale)``."""
    return lambda: fmt.format(_get(_load(file), path) * scale)


def _range(values, fmt: str = "{:.3f}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


# -- the demo (docs/demo_results.csv: `make demo` writes it to runs/demo/eval/results.csv) --

def _demo_rows() -> list[dict]:
    import csv

    with open(DEMO_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["budget"] = float(r["budget"] or 0)
        r["k"] = int(r["k"])
        for key in ("accuracy", "ci95_low", "ci95_high"):
            r[key] = float(r[key])
    return rows


def _title(r: dict) -> str:
    if r["attack"] in ("clean", "worst-case"):
        return r["attack"]
    name, _, tag = r["attack"].partition(".")
    return " ".join(filter(None, (ATTACK_TITLES[name], tag, THREAT_TITLES[r["threat"]])))


def _acc(r: dict) -> str:
    return f"{r['accuracy']:.3f} ±{(r['ci95_high'] - r['ci95_low']) / 2:.3f}"


def demo() -> str:
    """The table `make demo` prints (pipeline/evaluate/report.py main_table), from the CSV."""
    rows = _demo_rows()
    budget = 0.06 if any(r["budget"] == 0.06 for r in rows) else min(r["budget"] for r in rows if r["budget"])
    k = max(r["k"] for r in rows)
    cols = ["clean"] + list(dict.fromkeys(_title(r) for r in rows if r["budget"] == budget
                                          and r["attack"] not in ("clean", "worst-case")))
    if any(r["attack"] == "worst-case" and r["budget"] == budget for r in rows):
        cols.append("worst-case")
    by = {(_title(r), r["budget"] if r["attack"] != "clean" else budget, r["layer"], r["weighting"]): r
          for r in rows if r["k"] in (k, 0) and not r["target_layer"]}
    head = [c if c in ("clean", "worst-case") else f"{c} {budget:g}" for c in cols]
    lines = [f"| defense | layer | {' | '.join(head)} |", "|---|---|" + "---:|" * len(cols)]
    for layer, rule in dict.fromkeys((r["layer"], r["weighting"]) for r in rows if r["k"] in (k, 0)):
        name = "no defense" if layer == "none" else f"kNN {WEIGHTING_TITLES.get(rule, rule)}"
        cells = [_acc(by[(c, budget, layer, rule)]) if (c, budget, layer, rule) in by else "–"
                 for c in cols]
        lines.append(f"| {name} | {'' if layer == 'none' else layer} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _demo_pgd() -> tuple[dict, dict, dict]:
    """(no defense under PGD, the best kNN row under PGD, that defense's clean row)."""
    rows = _demo_rows()
    pgd = [r for r in rows if r["attack"] == "pgd"]
    none = next(r for r in pgd if r["layer"] == "none")
    best = max((r for r in pgd if r["layer"] != "none"), key=lambda r: r["accuracy"])
    clean = next(r for r in rows if r["attack"] == "clean" and r["layer"] == best["layer"]
                 and r["weighting"] == best["weighting"] and r["k"] == best["k"])
    return none, best, clean


def _demo_n() -> str:
    return f"{int(_demo_rows()[0]['n']):,}"


# -- the Fashion-MNIST reproduction (docs/fm_results.md, written by `make reproduce`) --

def _md_table(path: Path, section: str | None = None) -> tuple[list[str], list[list[str]]]:
    """The first Markdown table after the heading ``section`` (or in the file): header, rows."""
    lines = path.read_text().splitlines()
    start = 0 if section is None else lines.index(section)
    i = next(j for j in range(start, len(lines)) if lines[j].startswith("|"))
    table = []
    while i < len(lines) and lines[i].startswith("|"):
        table.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    return table[0], table[2:]


def _cell(text: str) -> tuple[float, float] | None:
    if "±" not in text:
        return None
    acc, hw = text.split("±")
    return float(acc), float(hw)


FM = ROOT / "docs" / "fm_results.md"


# columns of the 60k table that have their own tables (the hard-label attack on a subsample, the
# sanity checks' extra sets) rather than the headline one
NOT_HEADLINE = re.compile(r"hard-label|random noise|converged|unbounded")


def _fm_table(keep=lambda col: True) -> tuple[list[str], list[tuple[str, list]]]:
    """The 60k database table, rows no defense and CBW-D: (column titles, [(name, cells)])."""
    header, rows = _md_table(FM, "## Database demo (60,000 images)")
    cols = [re.sub(r" 0\.06$", "", h) for h in header[2:]]
    picked = [j for j, c in enumerate(cols) if keep(c)]
    out = []
    for row in rows:
        if row[0] in ("no defense", "kNN CBW-D"):
            name = row[0] if row[0] == "no defense" else f"{row[0]} {row[1]}"
            out.append((name, [_cell(row[2 + j]) for j in picked]))
    return [cols[j] for j in picked], out


def _fm_headline() -> tuple[list[str], list[tuple[str, list]]]:
    return _fm_table(lambda c: not NOT_HEADLINE.search(c))


def _fm_hard_label_stats() -> dict[str, dict]:
    """The report's hard-label section: classifier -> its row (queries, achieved Δ, ...)."""
    header, rows = _md_table(FM, "### Hard-label attack (HopSkipJump, labels only, on the deployed classifiers)")
    return {row[1]: dict(zip(header, row, strict=True)) for row in rows}


def fm_hard_label() -> str:
    """Hard-label accuracy at each query budget beside gray-box PGD (full sample) and the
    subsample's worst case, with the attack's queries and Δ, for each deployed classifier."""
    cols, rows = _fm_table(lambda c: c in ("clean", "PGD gray", "worst-case") or "hard-label" in c)
    stats = _fm_hard_label_stats()
    hsj = [c for c in cols if c.startswith("HSJ")]
    head = ["clean", "PGD gray", *[c.replace(" hard-label", "") for c in hsj], "worst case",
            "worst case, subsample", "median queries to success (broken)", "achieved Δ", "median minimal Δ"]
    lines = [f"| classifier | {' | '.join(head)} |", "|---|" + "---:|" * len(head)]
    for name, cells in rows:
        by = dict(zip(cols, cells, strict=True))
        who = "no defense" if name == "no defense" else name.replace("kNN CBW-D ", "") + " CBW-D K=50"
        st = stats.get(who, {})
        text = ["–" if by.get(c) is None else f"{by[c][0]:.3f}" for c in
                ("clean", "PGD gray", *hsj, "worst-case", "worst-case, hard-label subsample")]
        text += [st.get("median queries to success (broken)", "–"), st.get("achieved Δ (broken)", "–"),
                 st.get("median minimal Δ found", "–")]
        lines.append(f"| {name} | {' | '.join(text)} |")
    return "\n".join(lines) + "\n"


def fm_sanity() -> str:
    """The sanity checks of the 60k database (docs/fm_claims.json), one line each."""
    checks = _claims()["sanity"]["demo"]["checks"]
    lines = ["| check | result | comparisons outside noise |", "|---|---|---:|"]
    for c in checks.values():
        if c["status"] == "not run":
            lines.append(f"| {c['check']} | not run | |")
            continue
        if "by_attack" in c:
            v = next(iter(c["by_attack"].values()))
            lines.append(f"| {c['check']} | {c['status']}: {v['hard_label']:.3f} vs PGD {v['pgd_gray']:.3f} "
                         f"[{v['pgd_ci95'][0]:.3f}, {v['pgd_ci95'][1]:.3f}] on {v['images']} images | |")
            continue
        lines.append(f"| {c['check']} | **{c['status']}** | {c['violations']} of {c['compared']} |")
    return "\n".join(lines) + "\n"


def fm_headline() -> str:
    cols, rows = _fm_headline()
    head = [f"**{c.replace('-', ' ')}**" if c == "worst-case" else c for c in cols]
    lines = [f"| defense (database 60k) | {' | '.join(head)} |", "|---|" + "---:|" * len(cols)]
    for name, cells in rows:
        text = ["–" if c is None else f"{c[0]:.3f}" for c in cells]
        text[-1] = f"**{text[-1]}**"
        lines.append(f"| {name} | {' | '.join(text)} |")
    return "\n".join(lines) + "\n"


def _fm_column(title: str, defended: bool = True) -> list[float]:
    cols, rows = _fm_headline()
    j = cols.index(title)
    return [cells[j][0] for name, cells in rows
            if cells[j] is not None and (name != "no defense") == defended]


def _fm_halfwidths(worst_only: bool = False) -> list[float]:
    cols, rows = _fm_headline()
    return [c[1] for _, cells in rows for j, c in enumerate(cells)
            if c is not None and (not worst_only or cols[j] == "worst-case")]


def _fm_halfwidths_of(keep) -> list[float]:
    cols, rows = _fm_table(keep)
    return [c[1] for _, cells in rows for c in cells if c is not None]


def _imagenet_halfwidths() -> list[float]:
    return [float(m) for m in re.findall(r"±(\d\.\d+)", (ROOT / "docs" / "imagenet_results.md").read_text())]


IMAGENET = ROOT / "docs" / "imagenet_results.md"
IMAGENET_ROWS = {"FGSM gray": "FGSM gray-box", "PGD gray": "PGD gray-box (10 steps)",
                 "CW-L2 gray": "CW-L2 gray-box", "FGSM black": "FGSM black-box (from Lite2)",
                 "PGD black": "PGD black-box (from Lite2)"}


def imagenet_budgets() -> str:
    """The ImageNet-samples reproduction by budget, from docs/imagenet_results.md."""
    header, rows = _md_table(IMAGENET)
    clean = _cell(rows[0][header.index("clean")])[0]
    budgets = None
    out = []
    for title, label in IMAGENET_ROWS.items():
        head, sweep = _md_table(IMAGENET, f"### {title}: accuracy vs budget (undefended)")
        budgets = budgets or [h.removeprefix("budget ") for h in head[2:]]
        out.append(f"| {label} | " + " | ".join(f"{_cell(c)[0]:.2f}" for c in sweep[0][2:]) + " |")
    transfer = dict(re.findall(r"^- pgd-black_box@([\d.]+): .*transfer rate ([\d.]+)",
                               IMAGENET.read_text(), re.M))
    achieved = dict(re.findall(r"^- pgd-gray_box@([\d.]+): .*achieved normalised L2 mean ([\d.]+)",
                               IMAGENET.read_text(), re.M))
    lines = ["| attack on Lite0 | " + " | ".join(("Δ " if i == 0 else "") + f"{float(b):.2f}"
                                              for i, b in enumerate(budgets)) + " |",
             "|---|" + "---:|" * len(budgets),
             f"| clean | {clean:.2f} |" + " |" * (len(budgets) - 1), *out,
             "| PGD gray-box: achieved Δ ÷ budget | "
             + " | ".join(f"{float(achieved[b]) / float(b):.3f}" for b in budgets) + " |",
             "| transfer rate of PGD (Lite2 → Lite0) | "
             + " | ".join(f"{float(transfer[b]):.2f}" for b in budgets) + " |"]
    return "\n".join(lines) + "\n"


def _claims() -> dict:
    return json.loads((ROOT / "docs" / "fm_claims.json").read_text())


def _hsj_summary() -> str:
    cols, rows = _fm_table(lambda c: "hard-label" in c and c.startswith("HSJ"))
    last = cols[-1]
    n = _hsj_images()
    none = [cells[-1][0] for name, cells in rows if name == "no defense"][0]
    knn = [cells[-1][0] for name, cells in rows if name != "no defense"]
    return (f"at {last.split()[1]} queries per image it leaves {none:.2f} of {n} images to the "
            f"undefended classifier and {_range(knn, '{:.2f}')} to the defended layers")


def _hsj_images() -> int:
    st = _fm_hard_label_stats()["no defense"]
    return int(st["images attacked"].split(" of ")[1])


def _sanity_summary() -> str:
    checks = _claims()["sanity"]["demo"]["checks"]
    flagging = {k: c for k, c in checks.items() if c.get("flags_table", True) and c["status"] != "not run"}
    failed = [k for k, c in flagging.items() if c["status"] == "fail"]
    return (f"{len(flagging) - len(failed)} of {len(flagging)} pass on the 60k database"
            + (f" (failed: {', '.join(failed)})" if failed else ""))


def _imagenet_main(column: str) -> float:
    header, rows = _md_table(IMAGENET)
    return _cell(rows[0][header.index(column)])[0]


def _imagenet_pgd_fill() -> str:
    achieved = re.findall(r"^- pgd-gray_box@([\d.]+): .*achieved normalised L2 mean ([\d.]+)",
                          IMAGENET.read_text(), re.M)
    lo, hi = (f(float(a) / float(b) for b, a in achieved) for f in (min, max))
    return f"{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}–{hi:.3f}"


def _slope(fit: str) -> str:
    f = _claims()["C3"]["fits"][fit]
    return f"{f['slope_per_decade']:+.3f} per decade (R² {f['r2']:.2f})"


def _pct(values, digits: int = 0) -> str:
    return _range([100 * v for v in values], f"{{:.{digits}f}}")


# -- benchmarks --

def _extraction(arch: str, images: int) -> dict:
    return next(r for r in _load("extraction.json")["results"]
                if r["arch"] == arch and r["images"] == images)


def _ex(arch: str, images: int, path: str, fmt: str, scale: float = 1):
    return lambda: fmt.format(_get(_extraction(arch, images), path) * scale)


def store_agreement() -> str:
    data = _load("store_agreement.json")
    target = data["target_agreement"]

    def cell(v: float) -> str:
        s = f"{v:.4f}"
        if s == "1.0000" and v < 1:
            s = f"{v:.5f}"
        return f"**{s}**" if v >= target else s

    rows = ["| encoding | bytes/value | UW | CBW-E | CBW-D |", "|---|---:|---:|---:|---:|"]
    for name, e in data["encodings"].items():
        label = re.sub(r"^topk(\d+)$", r"topk k=\1", name)
        rows.append(f"| {label} | {e['bytes_per_value']:,.0f} | {cell(e['uw'])} | "
                    f"{cell(e['cbw_e'])} | {cell(e['cbw_d'])} |")
    return "\n".join(rows) + "\n"


def _store_margins() -> str:
    enc = _load("store_agreement.json")["encodings"]
    parts = [f"k = {name[4:]} {max(e['max_disagreement_margin'].values()):.4f}"
             for name, e in enc.items() if name.startswith("topk")]
    return ", ".join(parts)


def _sa_topk_meeting(rule: str) -> str:
    data = _load("store_agreement.json")
    ks = [int(name[4:]) for name, e in data["encodings"].items()
          if name.startswith("topk") and e[rule] >= data["target_agreement"]]
    return f"k ≥ {min(ks)}" if ks else "no k tried"


def index_build() -> str:
    d = _load("index_build.json")
    ours, af = d["comparison"]["ours"], d["comparison"]["autofaiss"]
    runs = ours["runs"]

    def per_run(stage: str) -> str:
        return "/".join(f"{r['stages'][stage]:.0f}" for r in runs)

    best = max(af["curve"], key=lambda c: c["recall_at_50"])
    reaches = any(c["recall_at_50"] >= d["target_recall"] for c in af["curve"])
    threads = d["machine"]["cpus"]
    builds = ", ".join(f"{r['build_s']:.0f}" for r in runs)
    rows = [
        "| | ours | autofaiss 2.18 |", "|---|---|---|",
        f"| index chosen for {d['data']['n'] / 1e6:g}M × {d['data']['dim']} in {d['budget_mb']} MB "
        f"| `{ours['factory']}` | `{af['factory']}` |",
        f"| build wall time | **{ours['median_build_s']:.0f} s** (median of "
        f"{builds}: train {per_run('train_s')}, populate "
        f"{per_run('populate_s')}, merge {per_run('merge_s')}, tune {per_run('tune_s')}) "
        f"| {af['median_build_s']:,.0f} s (training on all {d['data']['n'] / 1e6:g}M vectors) |",
        f"| build time ratio ours / autofaiss | **{d['comparison']['build_time_ratio_ours_over_autofaiss']:.2f}** | |",
        f"| recall@{d['k']} vs exact, test queries | **{ours['median_recall_at_50']:.3f}** (nprobe "
        f"{ours['search_params']['nprobe']}, tuned on other queries) | {af['median_recall_at_50']:.3f} "
        f"at its chosen `{','.join(af['search_params'].split(',')[:2])}`; its best is "
        f"{best['recall_at_50']:.3f} (at nprobe {best['nprobe']}: PQ codes cap it)"
        + ("" if reaches else f", so it never reaches {d['target_recall']}") + " |",
        f"| queries/s at each index's own setting ({d['data']['queries']:,} queries, {threads} threads) "
        f"| {ours['median_qps']:.0f} at recall {ours['median_recall_at_50']:.3f} "
        f"| {af['median_qps']:.0f} at recall {af['median_recall_at_50']:.3f} |",
        f"| peak RSS of the build process | {ours['median_peak_rss_mb_build'] / 1000:.1f} GB "
        f"| {af['median_peak_rss_mb_build'] / 1000:.1f} GB |",
    ]
    return "\n".join(rows) + "\n"


def index_build_recall() -> str:
    levels = _load("index_build.json")["comparison"]["qps_at_equal_recall"]
    rows = ["| recall@50 ≥ | " + " | ".join(f"{x['recall_at_least']:g}" for x in levels) + " |",
            "|---|" + "---|" * len(levels),
            "| ours, queries/s | " + " | ".join("—" if x["ours_qps"] is None else f"{x['ours_qps']:.0f}"
                                              for x in levels) + " |",
            "| autofaiss, queries/s | " + " | ".join("—" if x["autofaiss_qps"] is None
                                                    else f"{x['autofaiss_qps']:.0f}" for x in levels) + " |",
            "| ours / autofaiss | " + " | ".join(
                f"**{x['ratio']:.2f}**" if x["ratio"] is not None
                else ("only ours" if x["ours_qps"] is not None else "neither") for x in levels) + " |"]
    return "\n".join(rows) + "\n"


def _ib_scaling(n: int, fmt: str) -> str:
    run = next(r for r in _load("index_build.json")["scaling"]["runs"] if r["n"] == n)
    return fmt.format(**run)


def _hours(path: str, *more: str, fmt: str = "{:.1f}"):
    return lambda: fmt.format(sum(_get(_load("index_build.json"), p) for p in (path, *more)) / 3600)


def _sched_mem(units: int, key: str, fmt: str = "{}"):
    return lambda: fmt.format(next(m for m in _load("scheduling.json")["memory"] if m["units"] == units)[key])


def _merge_mem(n: int):
    return lambda: f"{next(m for m in _load('subset_scan.json')['merge_memory'] if m['n_selected'] == n)['peak_rss_growth_mb']:.0f}"


NUMBERS = {
    # demo
    "demo.queries": _demo_n,
    "demo.pgd-none-pct": lambda: f"{100 * _demo_pgd()[0]['accuracy']:.1f}",
    "demo.pgd-best-pct": lambda: f"{100 * _demo_pgd()[1]['accuracy']:.0f}",
    "demo.pgd-best-layer": lambda: _demo_pgd()[1]["layer"],
    "demo.pgd-best-clean": lambda: f"{_demo_pgd()[2]['accuracy']:.2f}",
    # Fashion-MNIST reproduction (docs/fm_results.md)
    "fm.ci-all": lambda: _range(_fm_halfwidths()),
    "fm.ci-worst": lambda: _range(_fm_halfwidths(worst_only=True)),
    "fm.adaptive-pct": lambda: _pct(_fm_column("adaptive white")),
    "fm.worst-knn-pct": lambda: _pct(_fm_column("worst-case"), 1),
    "fm.worst-none-pct": lambda: _pct(_fm_column("worst-case", defended=False), 1),
    "fm.worst-knn": lambda: _range(_fm_column("worst-case")),
    "fm.worst-none": lambda: _range(_fm_column("worst-case", defended=False)),
    "imagenet.ci": lambda: _range(_imagenet_halfwidths(), "{:.2f}"),
    # the hard-label attack and the sanity checks (docs/fm_results.md, docs/fm_claims.json)
    "fm.hsj-summary": lambda: _hsj_summary(),
    "fm.hsj-images": lambda: str(_hsj_images()),
    "fm.hsj-ci": lambda: _range(_fm_halfwidths_of(lambda c: c.startswith("HSJ")), "{:.2f}"),
    "fm.sanity-summary": lambda: _sanity_summary(),
    "in.pgd-fill": lambda: _imagenet_pgd_fill(),
    "in.noise": lambda: f"{_imagenet_main('random noise 0.06'):.3f}",
    "in.clean": lambda: f"{_imagenet_main('clean'):.3f}",
    # the claims as data (docs/fm_claims.json)
    "fm.c1-knn": lambda: f"{_claims()['C1']['knn']:.3f}",
    "fm.c1-none": lambda: f"{_claims()['C1']['no_defense']:.3f}",
    "fm.c1-gain": lambda: f"{_claims()['C1']['gain']:+.2f}",
    "fm.c2-ordered": lambda: f"{_claims()['C2']['ordered_cells']} of {_claims()['C2']['cells']}",
    "fm.c2-mean": lambda: f"{_claims()['C2']['mean_cbwd_minus_uw']:+.3f}",
    "fm.c3-clean-conv_2_2": lambda: _slope("clean conv_2_2"),
    "fm.c3-pgd-conv_2_2": lambda: _slope("PGD gray conv_2_2"),
    "fm.c3-clean-conv_3_2": lambda: _slope("clean conv_3_2"),
    "fm.c5-pairs": lambda: (f"{sum(p['black'] > p['gray'] for p in _claims()['C5']['pairs'].values())}"
                            f" of {len(_claims()['C5']['pairs'])}"),
    # extraction (P1)
    "ex.lite0-1k-pipe": _ex("efficientnet-lite0", 1000, "pipeline_img_per_s.decode_workers_2", "{:.1f}"),
    "ex.lite0-1k-bare": _ex("efficientnet-lite0", 1000, "bare_forward_img_per_s", "{:.1f}"),
    "ex.lite0-1k-ratio": _ex("efficientnet-lite0", 1000, "ratio_pipeline_over_bare.decode_workers_2", "{:.2f}"),
    "ex.lite0-1k-ratio-main": _ex("efficientnet-lite0", 1000, "ratio_pipeline_over_bare.decode_workers_0", "{:.2f}"),
    "ex.lite0-10k-pipe": _ex("efficientnet-lite0", 10000, "pipeline_img_per_s.decode_workers_2", "{:.1f}"),
    "ex.lite0-10k-bare": _ex("efficientnet-lite0", 10000, "bare_forward_img_per_s", "{:.1f}"),
    "ex.lite0-10k-ratio": _ex("efficientnet-lite0", 10000, "ratio_pipeline_over_bare.decode_workers_2", "{:.2f}"),
    "ex.lite0-10k-ratio-main": _ex("efficientnet-lite0", 10000, "ratio_pipeline_over_bare.decode_workers_0", "{:.2f}"),
    "ex.r50-pipe": _ex("resnet50", 1000, "pipeline_img_per_s.decode_workers_2", "{:.1f}"),
    "ex.r50-bare": _ex("resnet50", 1000, "bare_forward_img_per_s", "{:.1f}"),
    "ex.r50-ratio": _ex("resnet50", 1000, "ratio_pipeline_over_bare.decode_workers_2", "{:.2f}"),
    "ex.r50-ratio-main": _ex("resnet50", 1000, "ratio_pipeline_over_bare.decode_workers_0", "{:.2f}"),
    "ex.lite0-1k-rss": _ex("efficientnet-lite0", 1000, "pipeline_worker_peak_rss_mb", "{:.2f}", 1e-3),
    "ex.lite0-10k-rss": _ex("efficientnet-lite0", 10000, "pipeline_worker_peak_rss_mb", "{:.2f}", 1e-3),
    "ex.r50-rss": _ex("resnet50", 1000, "pipeline_worker_peak_rss_mb", "{:.2f}", 1e-3),
    # subset scan
    "ss.samples": lambda: f"{_load('subset_scan.json')['shards'] * _load('subset_scan.json')['samples_per_shard'] / 1000:.0f}k",
    "ss.all-rate": _n("subset_scan.json", "scan.all_samples_per_s", "{:,}"),
    "ss.all-ratio": _n("subset_scan.json", "scan.ratio_all_over_best_plain_headers", "{:.2f}"),
    "ss.targeted-rate": _n("subset_scan.json", "scan.targeted_samples_per_s", "{:,}"),
    "ss.targeted-ratio": _n("subset_scan.json", "scan.ratio_targeted_over_best_plain_json_txt", "{:.2f}"),
    "ss.merge-1m-mb": _merge_mem(1_000_000),
    "ss.merge-10m-mb": _merge_mem(10_000_000),
    # defended query (P3)
    "dq.vectors": _n("defended_query.json", "config.vectors", "{:.0f}M", 1e-6),
    "dq.ivf": _n("defended_query.json", "config.factory", "`{}`"),
    "dq.nprobe": _n("defended_query.json", "config.nprobe"),
    "dq.batch": _n("defended_query.json", "config.batch_size"),
    "dq.k": _n("defended_query.json", "config.k"),
    "dq.defended-f16": _n("defended_query.json", "throughput.img_per_s.defended_float16", "{:.1f}"),
    "dq.bare": _n("defended_query.json", "throughput.img_per_s.bare", "{:.1f}"),
    "dq.ratio-f16": _n("defended_query.json", "throughput.ratio.float16", "{:.2f}"),
    "dq.ratio-topk16": _n("defended_query.json", "throughput.ratio.topk16", "{:.2f}"),
    "dq.forward-ms": _n("defended_query.json", "breakdown_ms_per_batch_median.forward", "{:,.0f}"),
    "dq.search-ms": _n("defended_query.json", "breakdown_ms_per_batch_median.search", "{:.0f}"),
    "dq.store-f16-ms": _n("defended_query.json", "breakdown_ms_per_batch_median.store_get_float16", "{:.0f}"),
    "dq.store-topk16-ms": _n("defended_query.json", "breakdown_ms_per_batch_median.store_get_topk16", "{:.0f}"),
    "dq.vote-f16-ms": _n("defended_query.json", "breakdown_ms_per_batch_median.vote_float16", "{:.0f}"),
    "dq.vote-topk16-ms": _n("defended_query.json", "breakdown_ms_per_batch_median.vote_topk16", "{:.0f}"),
    "dq.index-bytes": _n("defended_query.json", "build.index.bytes_per_image", "{:,.0f}"),
    "dq.store-f16-bytes": _n("defended_query.json", "build.stores.float16.bytes_per_image", "{:,.0f}"),
    "dq.store-topk16-bytes": _n("defended_query.json", "build.stores.topk16.bytes_per_image", "{:.1f}"),
    # softmax store encodings (P4)
    "sa.images": _n("store_agreement.json", "images.total", "{:,}"),
    "sa.fm-images": _n("store_agreement.json", "images.fashion_mnist", "{:,}"),
    "sa.photos": _n("store_agreement.json", "images.imagenet_photos"),
    "sa.k": _n("store_agreement.json", "neighbours.k"),
    "sa.topk16-bytes": _n("store_agreement.json", "encodings.topk16.bytes_per_value", "{:.0f}"),
    "sa.top1-median": _n("store_agreement.json", "context.top1_prob_quantiles_5_25_50_75_95.2", "{:.2f}"),
    "sa.uw-margin-below-1e-3-pct": _n("store_agreement.json", "context.full_vote_margin.uw.fraction_below_1e-3", "{:.1f}", 100),
    "sa.margins": _store_margins,
    "sa.cbw-d-topk": lambda: _sa_topk_meeting("cbw_d"),
    # scheduling
    "sc.units": _n("scheduling.json", "overhead.units", "{:,}"),
    "sc.run-units-s": _n("scheduling.json", "overhead.run_units_s", "{:.2f}"),
    "sc.in-process-s": _n("scheduling.json", "overhead.in_process_s", "{:.2f}"),
    "sc.ratio": _n("scheduling.json", "overhead.ratio", "{:.1f}"),
    "sc.ms-per-unit": _n("scheduling.json", "overhead.overhead_ms_per_unit", "{:.0f}"),
    "sc.units-per-s": _n("scheduling.json", "overhead.units_per_s"),
    "sc.ray-startup-s": _n("scheduling.json", "overhead.ray_startup_s", "{:.0f}"),
    "sc.rss-10k": _sched_mem(10_000, "peak_rss_mb", "{:.1f}"),
    "sc.rss-100k": _sched_mem(100_000, "peak_rss_mb", "{:.1f}"),
    "sc.rss-growth": _n("scheduling.json", "peak_rss_growth_mb_10k_to_100k", "{:.1f}"),
    "sc.manifest-10k": _sched_mem(10_000, "manifest_mb", "{:.1f}"),
    "sc.manifest-100k": _sched_mem(100_000, "manifest_mb", "{:.1f}"),
    # serve load
    "sl.requests": _n("serve_load.json", "result.requests", "{:,}"),
    "sl.concurrency": _n("serve_load.json", "config.concurrency"),
    "sl.errors": _n("serve_load.json", "result.errors"),
    "sl.rps": _n("serve_load.json", "result.requests_per_s", "{:.0f}"),
    "sl.p50": _n("serve_load.json", "result.latency_ms.p50", "{:.0f}"),
    "sl.p90": _n("serve_load.json", "result.latency_ms.p90", "{:.0f}"),
    "sl.p99": _n("serve_load.json", "result.latency_ms.p99", "{:.0f}"),
    "sl.batches": _n("serve_load.json", "result.batcher.batches_run", "{:,}"),
    "sl.db": _n("serve_load.json", "target.database_images", "{:,.0f}k", 1e-3),
    # index build
    "ib.ours-s": _n("index_build.json", "comparison.ours.median_build_s", "{:.0f}"),
    "ib.autofaiss-s": _n("index_build.json", "comparison.autofaiss.median_build_s", "{:,.0f}"),
    "ib.ratio": _n("index_build.json", "comparison.build_time_ratio_ours_over_autofaiss", "{:.2f}"),
    "ib.recall": _n("index_build.json", "comparison.ours.median_recall_at_50", "{:.3f}"),
    "ib.autofaiss-recall": _n("index_build.json", "comparison.autofaiss.median_recall_at_50", "{:.3f}"),
    "ib.ours-factory": _n("index_build.json", "comparison.ours.factory", "`{}`"),
    "ib.autofaiss-factory": _n("index_build.json", "comparison.autofaiss.factory", "`{}`"),
    "ib.1e4": lambda: _ib_scaling(10_000, "{build_s:.1f} s (`{factory}`)"),
    "ib.1e5": lambda: _ib_scaling(100_000, "{build_s:.1f} s (`{factory}`)"),
    "ib.1e6": lambda: _ib_scaling(1_000_000, "{build_s:.0f} s (`{factory}`)"),
    "ib.loglog-a": _n("index_build.json", "scaling.loglog_fit.a", "{:.1e}"),
    "ib.loglog-b": _n("index_build.json", "scaling.loglog_fit.b", "{:.2f}"),
    "ib.shard-factory": _n("index_build.json", "extrapolation.per_shard_choice.factory", "`{}`"),
    "ib.shard-gb": _n("index_build.json", "extrapolation.per_shard_choice.memory_gb", "{:.1f}"),
    "ib.shard-budget-gb": _n("index_build.json", "extrapolation.per_shard_choice.budget_per_shard_gb", "{:.0f}"),
    "ib.shard-hours": _n("index_build.json", "extrapolation.per_shard_2_cores_hours", "{:.0f}"),
    "ib.shard-train-h": _hours("extrapolation.per_shard_2_cores_s.train_s", fmt="{:.0f}"),
    "ib.shard-populate-h": _hours("extrapolation.per_shard_2_cores_s.populate_s"),
    "ib.shard-tune-h": _hours("extrapolation.per_shard_2_cores_s.tune_s", fmt="{:.0f}"),
    "ib.cluster-hours": _n("index_build.json", "extrapolation.cluster_wall_hours", "{:.1f}"),
    "ib.cluster-train-h": _hours("extrapolation.cluster_wall_s.train_s"),
    "ib.cluster-populate-h": _hours("extrapolation.cluster_wall_s.populate_s"),
    "ib.cluster-merge-tune-h": _hours("extrapolation.cluster_wall_s.merge_s", "extrapolation.cluster_wall_s.tune_s"),
}

# -- web-size extraction (benchmarks/extraction.py web) and the scale curve (benchmarks/scale.py) --

def _web() -> list[dict]:
    return _load("extraction_web.json")["results"]


WEB_AUTO = "torch 2 + 2 decode processes"  # the split `auto` picks on 2 CPUs (runtime/tasks.py)


def _web_set(r: dict) -> str:
    return f"{r['short_side']} px, " + ("real" if r["photos"] == "mate-backgrounds" else "upscaled")


def extraction_web() -> str:
    rows = ["| set | photos | mean KB | model | bare img/s | forward core-ms | decode core-ms "
            "| cap | ratio (auto) | share of cap (auto) | best split | its ratio | its share |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in _web():
        auto = r["splits"][WEB_AUTO]
        best = r["splits"][r["best_split"]]
        rows.append(f"| {_web_set(r)} | {r['photos']} | {r['mean_kb']:.0f} | {r['arch']} "
                    f"| {r['bare_forward_img_per_s']:.1f} | {r['forward_core_ms']:.1f} "
                    f"| {r['decode_core_ms']:.1f} | {r['cap']:.3f} | {auto['ratio']:.3f} "
                    f"| **{auto['share_of_cap']:.3f}** | {r['best_split']} | {best['ratio']:.3f} "
                    f"| {best['share_of_cap']:.3f} |")
    return "\n".join(rows) + "\n"


def extraction_web_short() -> str:
    rows = ["| photos (shorter side) | model | decode ÷ forward core-ms | cap | ratio (`auto`) | share of cap |",
            "|---|---|---:|---:|---:|---:|"]
    for r in _web():
        auto = r["splits"][WEB_AUTO]
        rows.append(f"| {_web_set(r)} | {r['arch']} "
                    f"| {r['decode_core_ms']:.1f} ÷ {r['forward_core_ms']:.1f} | {r['cap']:.2f} "
                    f"| {auto['ratio']:.2f} | **{auto['share_of_cap']:.2f}** |")
    return "\n".join(rows) + "\n"


def extraction_web_splits() -> str:
    results = _web()
    names = list(results[0]["splits"])
    rows = ["| set | model | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for r in results:
        rows.append(f"| {_web_set(r)} | {r['arch']} | "
                    + " | ".join(f"{r['splits'][n]['ratio']:.3f}" for n in names) + " |")
    return "\n".join(rows) + "\n"


def _web_point(name: str, arch: str) -> dict:
    return next(r for r in _web() if r["set"] == name and r["arch"] == arch)


def _wp(name: str, arch: str, fmt: str, key=None):
    def get():
        r = _web_point(name, arch)
        return fmt.format(key(r) if key else r)
    return get


def _scale() -> dict:
    return _load("scale.json")


SCALE_STAGES = ["shards", "train", "transforms", "features", "index", "store", "verify", "evaluate"]


def _si(n: float) -> str:
    return f"1e{round(__import__('math').log10(n))}"


def scale_table() -> str:
    d = _scale()
    points = sorted(d["points"], key=lambda p: p["n"])
    head = " | ".join(f"N = {_si(p['n'])} s" for p in points)
    rows = [f"| stage | {head} | per s at {_si(points[-1]['n'])} | driver peak MB "
            f"| largest task peak MB | fit a (µs/image) | fit b (s) | log-log slope |",
            "|---|" + "---:|" * len(points) + "---:|---:|---|---:|---:|---:|"]
    for stage in SCALE_STAGES:
        last = points[-1]["stages"][stage]
        f = d["fits"][stage]
        task = (f"{last['task_peak_rss_mb']:,.0f} ({last['largest_task'].removeprefix('ray::')})"
                if last["largest_task"] else "–")
        slope = "–" if f["loglog_slope"] is None else f"{f['loglog_slope']:.2f}"
        if stage == "train":  # it records the given weights: nothing to rate or sample
            rows.append(f"| {stage} (records `model.weights`) | " + " | ".join(
                f"{p['stages'][stage]['seconds']:.2f}" for p in points) + " | – | – | – | – | – | – |")
            continue
        unit = "queries" if stage == "evaluate" else "images"
        rows.append(f"| {stage} | " + " | ".join(f"{p['stages'][stage]['seconds']:.2f}" for p in points)
                    + f" | {last['per_s']:,.0f} {unit} | {last['driver_peak_rss_mb']:,.0f} | {task} "
                    f"| {1e6 * f['a_s_per_image']:.1f} | {f['b_s']:.2f} | {slope} |")
    rows.append("| whole job (wall) | " + " | ".join(f"{p['job_wall_s']:.0f}" for p in points)
                + " | | " + f"{points[-1]['driver_peak_rss_mb']:,.0f} | | | | |")
    return "\n".join(rows) + "\n"


def _gb(b: float) -> str:
    if b >= 1e15:
        return f"{b / 1e15:,.1f} PB"
    return f"{b / 1e12:,.1f} TB" if b >= 1e12 else f"{b / 1e9:,.1f} GB"


def scale_projection() -> str:
    d = _scale()
    pr = d["projection"]
    rows = ["| stage | hours | how |", "|---|---:|---|"]

    def cpu(s: dict) -> str:
        return (f"{s['core_hours']:,} core-hours: {s['compute_hours']:.2f} h over all cores; "
                f"{s['units']:,} units × 2 ms of driver scheduling: {s['driver_dispatch_hours']:.2f} h "
                f"(bound by {s['limited_by']})")

    how = {"features": lambda s: (f"{s['per_gpu_img_per_s']:,.0f} img/s per GPU (ResNet-50 bf16, "
                                  f"1080-px photos, {s['decoder'].split('/')[1]} decode, measured on "
                                  f"an H200; bare forward {s['bare_forward_img_per_s']:,.0f} img/s)"),
           "index_train": lambda s: (f"k-means, {s['per_layer_hours_on_one_32_core_node']:.2f} h per "
                                     "layer on one 32-core node (index benchmark), 2 layers"),
           "evaluate": lambda s: "its fixed cost (1,000 queries, PGD)"}
    for stage, s in pr["stages"].items():
        text = how.get(stage, cpu)(s)
        name = f"**{stage}**" if stage == pr["bottleneck"] else stage
        rows.append(f"| {name} | {s['hours']:,.2f} | {text} |")
    rows.append(f"| whole job (stages one after another) | **{pr['total_hours']:,.1f}** "
                f"| {pr['cluster']['gpus']:,} GPUs, {pr['gpu_hours']:,} GPU-hours in features |")
    b = pr["bytes"]
    kb = d["assumptions"]["image_bytes_1080"] / 1024
    rows += ["", "| bytes | |", "|---|---:|",
             f"| images, JPEG at 1080 px ({kb:.0f} KB each; object store) | {_gb(b['images_object_store'])} |",
             f"| feature Parquet (object store) | {_gb(b['features_object_store'])} |",
             f"| indexes (2 layers) | {_gb(b['index'])} |", f"| softmax store | {_gb(b['store'])} |",
             f"| object store in all | **{_gb(b['object_store_total'])}** |"]
    return "\n".join(rows) + "\n"


def _sp(n: int, path: str, fmt: str, scale: float = 1):
    def get():
        p = next(p for p in _scale()["points"] if p["n"] == n)
        return fmt.format(_get(p, path) * scale)
    return get


NUMBERS.update({
    "ew.images": lambda: f"{_web()[0]['images']:,}",
    "ew.share-1080": lambda: _range([r["splits"][WEB_AUTO]["share_of_cap"] for r in _web()
                                     if r["short_side"] == 1080], "{:.2f}"),
    "ew.cap-1080-lite0": lambda: _range([r["cap"] for r in _web() if r["short_side"] == 1080
                                         and r["arch"] == "efficientnet-lite0"], "{:.2f}"),
    "ew.cap-1080-r50": lambda: _range([r["cap"] for r in _web() if r["short_side"] == 1080
                                       and r["arch"] == "resnet50"], "{:.2f}"),
    "ew.decode-1080": lambda: _range([r["decode_core_ms"] for r in _web() if r["short_side"] == 1080], "{:.1f}"),
    "ew.decode-1080-real": lambda: _range([r["decode_core_ms"] for r in _web() if r["set"] == "1080-real"], "{:.1f}"),
    "ew.decode-1080-up": lambda: _range([r["decode_core_ms"] for r in _web() if r["set"] == "1080"], "{:.1f}"),
    "ew.kb-1080-real": lambda: f"{_web_point('1080-real', 'efficientnet-lite0')['mean_kb']:.0f}",
    "ew.kb-1080-up": lambda: f"{_web_point('1080', 'efficientnet-lite0')['mean_kb']:.0f}",
    "ew.threads-share-lite0-640": _wp("640", "efficientnet-lite0", "{:.3f}",
                                      lambda r: r["splits"]["torch 2 + 2 decode threads"]["share_of_cap"]),
    "ew.procs-share-lite0-640": _wp("640", "efficientnet-lite0", "{:.3f}",
                                    lambda r: r["splits"][WEB_AUTO]["share_of_cap"]),
    "ew.lite0-256-threads-ratio": _wp("256", "efficientnet-lite0", "{:.3f}",
                                      lambda r: r["splits"]["torch 2 + 2 decode threads"]["ratio"]),
    "ew.lite0-256-procs-ratio": _wp("256", "efficientnet-lite0", "{:.3f}",
                                    lambda r: r["splits"][WEB_AUTO]["ratio"]),
    "ew.one-thread-ratio": lambda: _range([r["splits"]["torch 1 + 1 decode threads"]["ratio"]
                                           for r in _web()], "{:.2f}"),
    "ew.lite0-1080-cap": _wp("1080", "efficientnet-lite0", "{:.2f}", lambda r: r["cap"]),
    "ew.r50-1080-cap": _wp("1080", "resnet50", "{:.2f}", lambda r: r["cap"]),
    "ew.lite0-1080-share": _wp("1080", "efficientnet-lite0", "{:.2f}",
                               lambda r: r["splits"][WEB_AUTO]["share_of_cap"]),
    "ew.r50-1080-share": _wp("1080", "resnet50", "{:.2f}",
                             lambda r: r["splits"][WEB_AUTO]["share_of_cap"]),
    "ew.lite0-256-ratio": _wp("256", "efficientnet-lite0", "{:.2f}",
                              lambda r: r["splits"][WEB_AUTO]["ratio"]),
    "ew.r50-256-ratio": _wp("256", "resnet50", "{:.2f}", lambda r: r["splits"][WEB_AUTO]["ratio"]),
    "sc.replicate-rate": _sp(1_000_000, "replicate.img_per_s", "{:,.0f}"),
    "sc.1e6-wall-min": _sp(1_000_000, "job_wall_s", "{:.1f}", 1 / 60),
    "sc.1e6-features-rate": _sp(1_000_000, "stages.features.per_s", "{:,.0f}"),
    "sc.1e6-features-s": _sp(1_000_000, "stages.features.seconds", "{:.0f}"),
    "sc.1e6-wall-s": _sp(1_000_000, "job_wall_s", "{:.0f}"),
    "sc.1e6-eval-task-gb": _sp(1_000_000, "stages.evaluate.task_peak_rss_mb", "{:.1f}", 1e-3),
    "sc.1e4-eval-task-gb": _sp(10_000, "stages.evaluate.task_peak_rss_mb", "{:.1f}", 1e-3),
    "sc.features-us": lambda: f"{1e6 * _scale()['fits']['features']['a_s_per_image']:.0f}",
    "sc.driver-rss": lambda: _range([p["driver_peak_rss_mb"] for p in _scale()["points"]], "{:.0f}"),
    "sc.load": lambda: _range([v["load_average_max"] for p in _scale()["points"]
                               for v in p["stages"].values() if v.get("load_average_max")], "{:.1f}"),
    "sc.loaded-1e6-s": lambda: f"{_scale()['earlier_loaded_run_1e6']['job_wall_s']:.0f}",
    "sc.5e10-features-h": lambda: f"{_scale()['projection']['stages']['features']['hours']:.1f}",
    "sc.5e10-shards": lambda: f"{_scale()['projection']['shards'] / 1e6:.0f} million",
    "sc.5e10-pb": lambda: f"{_scale()['projection']['bytes']['object_store_total'] / 1e15:.0f}",
    "sc.5e10-hours": lambda: f"{_scale()['projection']['total_hours']:,.1f}",
    "sc.5e10-bottleneck": lambda: _scale()["projection"]["bottleneck"],
    "sc.5e10-gpus": lambda: f"{_scale()['projection']['cluster']['gpus']:,}",
})
RENDERERS.update({"extraction-web": extraction_web, "extraction-web-short": extraction_web_short, "extraction-web-splits": extraction_web_splits,
                  "scale": scale_table, "scale-projection": scale_projection})

RENDERERS.update({"demo": demo, "fm-headline": fm_headline, "store-agreement": store_agreement,
                  "index-build": index_build, "index-build-recall": index_build_recall,
                  "imagenet-budgets": imagenet_budgets, "fm-hard-label": fm_hard_label,
                  "fm-sanity": fm_sanity})

# -- decontamination (knn-defense decontaminate on the demo job: benchmarks/results/
#    decontaminate_fashion_mnist.json) --

DECON = "decontaminate_fashion_mnist.json"


def _dc_rate(r: dict) -> str:
    return f"{r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def decontaminate_fm() -> str:
    cal = _load(DECON)["calibration"]
    rows = ["| augmented copy | recall | precision (vs each image's nearest distinct one) |",
            "|---|---:|---:|"]
    for kind, r in cal["per_augmentation"].items():
        rows.append(f"| {kind} | {_dc_rate(r['recall'])} | {_dc_rate(r['precision'])} |")
    rows.append(f"| **all** | {_dc_rate(cal['recall'])} | {_dc_rate(cal['precision'])} |")
    return "\n".join(rows) + "\n"


def _dc_expected() -> str:
    mid, lo, hi = _load(DECON)["expected_false_queries"]
    return f"{mid} ({lo}–{hi})"


RENDERERS["decontaminate-fm"] = decontaminate_fm
NUMBERS.update({
    "dc.queries": _n(DECON, "queries_scanned", "{:,}"),
    "dc.flagged": _n(DECON, "queries_with_duplicate", "{:,}"),
    "dc.db-found": _n(DECON, "database_images_found", "{:,}"),
    "dc.pairs": _n(DECON, "pairs", "{:,}"),
    "dc.layer": _n(DECON, "layer"),
    "dc.threshold": _n(DECON, "threshold", "{:.3f}"),
    "dc.seconds": _n(DECON, "seconds", "{:.0f}"),
    "dc.cal-images": _n(DECON, "calibration.images", "{:,}"),
    "dc.precision": lambda: _dc_rate(_load(DECON)["calibration"]["precision"]),
    "dc.recall": lambda: _dc_rate(_load(DECON)["calibration"]["recall"]),
    "dc.nearest-fpr-pct": _n(DECON, "calibration.nearest_false_positive_rate.value", "{:.1f}", 100),
    "dc.expected-false": _dc_expected,
    "dc.pixel-5": _n(DECON, "pixel_check.queries_below_5"),
    "dc.pixel-2": _n(DECON, "pixel_check.queries_below_2"),
})


# -- a living database (benchmarks/living.py: add one shard and remove 10k keys on the scale
#    benchmark's jobs: benchmarks/results/living.json) --

LIVING = "living.json"


def living_add() -> str:
    rows = ["| database N | add 1 shard (4,000 images), s | scan | features | index | store |",
            "|---:|---:|---:|---:|---:|---:|"]
    for a in _load(LIVING)["add"]:
        st = a["steps"]
        rows.append(f"| {_si(a['n'])} | {a['seconds']:.1f} | {st['scan']:.1f} | "
                    f"{st['features']:.1f} | {st['index']:.1f} | {st['store']:.2f} |")
    return "\n".join(rows) + "\n"


RENDERERS["living-add"] = living_add
NUMBERS.update({
    "lv.add-ratio": _n(LIVING, "add_ratio_largest_vs_smallest", "{:.2f}"),
    "lv.add-1e6-s": _n(LIVING, "add.2.seconds", "{:.1f}"),
    "lv.rm-keys": _n(LIVING, "remove.keys", "{:,}"),
    "lv.rm-n": lambda: _si(_load(LIVING)["remove"]["n"]),
    "lv.rm-s": _n(LIVING, "remove.seconds", "{:.1f}"),
    "lv.rm-index-s": _n(LIVING, "remove.index_s", "{:.1f}"),
    "lv.rm-files": _n(LIVING, "remove.index_files", "{:,}"),
    "lv.rm-resolve-s": _n(LIVING, "remove.resolve_s", "{:.2f}"),
    "lv.rm-store-s": _n(LIVING, "remove.store_s", "{:.2f}"),
    "lv.rm-batched-ms": _n(LIVING, "remove.layer_index.batched_s", "{:.0f}", 1000),
    "lv.rm-single-ms": _n(LIVING, "remove.layer_index.single_id_call_s", "{:.1f}", 1000),
    "lv.rm-single-s": _n(LIVING, "remove.layer_index.single_extrapolated_s", "{:.0f}"),
    "lv.rm-ratio": _n(LIVING, "remove.layer_index.batched_vs_single", "{:,.0f}"),
})


def _number(m: re.Match) -> str:
    name = m.group("name")
    if name not in NUMBERS:
        raise KeyError(f"unknown number {name!r}: see NUMBERS in scripts/render_docs.py")
    return f"<!-- n:{name} -->{NUMBERS[name]()}<!-- /n -->"


def render(text: str) -> str:
    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise KeyError(f"unknown table {name!r}: renderers are {sorted(RENDERERS)}")
        return m.group(1) + RENDERERS[name]() + m.group(4)

    return INLINE.sub(_number, BLOCK.sub(one, text))


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
