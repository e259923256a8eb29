"""Metadata-scan throughput and subset-merge memory (IG-N subsets).

1. Scan: samples/s of `scan_shard_candidates` (decode-free: keys + json/txt, tag extraction,
   vocabulary match, seeded hash, local top-N) over generated img2dataset-like shards, divided by
   samples/s of a plain `tarfile` loop that reads the same members (json, txt) and skips the
   images, in the same stream mode, measured interleaved in one run.
2. Merge memory: peak RSS growth of `global_threshold` + `write_subset_manifest` for N = 1M and
   10M selected keys, from generated per-shard candidate files (memory must not grow with the
   collection, only with N).

Writes benchmarks/results/subset_scan.json.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.hashtags import load_vocabulary  # noqa: E402
from pipeline.data.subsets import SubsetRule, scan_shard_candidates  # noqa: E402

SHARDS, PER_SHARD, IMAGE_BYTES = 10, 10_000, 4096
WORDS = ["sunset", "love", "photooftheday", "beach", "instagood", "food", "tabby", "pizza",
         "goldenretriever", "travel", "nature", "selfie", "cute", "summer", "crane", "espresso"]


def write_shards(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    vocab_words = np.array(WORDS)
    image = rng.integers(0, 256, IMAGE_BYTES, dtype=np.uint8).tobytes()
    urls = []
    for s in range(SHARDS):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for r in range(PER_SHARD):
                key = f"{s:05d}{r:04d}"
                tags = list(rng.choice(vocab_words, rng.integers(1, 6)))
                caption = f"Great day at the {tags[0]} with friends #{tags[-1]} #blessed"
                meta = {"url": f"https://cdn.example.com/p/{key}.jpg", "key": key, "status": "success",
                        "caption": caption, "tags": tags, "width": 640, "height": 480,
                        "original_width": 1080, "original_height": 810, "exif": "{}",
                        "sha256": f"{rng.integers(0, 2**63):016x}" * 4}
                for ext, data in (("jpg", image), ("json", json.dumps(meta).encode()),
                                  ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def plain_tarfile_loop(urls: list[str], read_exts: tuple[str, ...], mode: str) -> int:
    """The members a scan reads, read with nothing else done (IG-N-All reads no member data,
    only headers; IG-N-Targeted reads json and txt): `r|` streams through every byte, `r:`
    seeks over unread members. The faster of the two is the reference."""
    n = 0
    for url in urls:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode=mode) as tar:
            for info in tar:
                if info.name.endswith(read_exts):
                    tar.extractfile(info).read()
                n += info.name.endswith(".jpg")
                tar.members = []
    return n


def scan(urls: list[str], kind: str, out: Path) -> int:
    rule = SubsetRule(kind, 1000, seed=0)
    vocab = load_vocabulary() if kind == "targeted" else None
    return sum(scan_shard_candidates(u, i, rule, out / f"{kind}-{i}.parquet", vocab)["scanned"]
               for i, u in enumerate(urls))


MERGE_CHILD = r"""
import resource, sys, tempfile, numpy as np, pyarrow as pa, pyarrow.parquet as pq
sys.path.insert(0, sys.argv[3])
from pipeline.data.subsets import CANDIDATE_SCHEMA, global_threshold, write_subset_manifest
n, shards = int(sys.argv[1]), int(sys.argv[2])
tmp = tempfile.mkdtemp()
rng = np.random.default_rng(0)
files = []
per = n // shards * 2  # each shard contributes twice its share: the merge must drop half
for s in range(shards):
    h = rng.integers(0, 2**63, per, dtype=np.uint64)
    t = pa.table({"hash": h, "shard_index": np.full(per, s), "key": [f"{s:05d}{i:07d}" for i in range(per)],
                  "hashtags": pa.array([[]] * per, pa.list_(pa.string())),
                  "classes": pa.array([[]] * per, pa.list_(pa.int32()))}, schema=CANDIDATE_SCHEMA)
    files.append(f"{tmp}/{s}.parquet"); pq.write_table(t, files[-1])
del t, h
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
thr, total = global_threshold(files, n)
res = write_subset_manifest(files, thr, f"{tmp}/subset.parquet", 1)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak - base, res["selected"], total)
"""


def merge_memory(n: int, shards: int) -> dict:
    out = subprocess.run([sys.executable, "-c", MERGE_CHILD, str(n), str(shards),
                          str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, check=True).stdout.split()
    grow_kb, selected, total = map(int, out)
    return {"n_selected": selected, "candidates_seen": total, "shards": shards,
            "peak_rss_growth_mb": round(grow_kb / 1024, 1)}


def main() -> None:
    results: dict = {"benchmark": "subset_scan", "shards": SHARDS, "samples_per_shard": PER_SHARD,
                     "image_bytes": IMAGE_BYTES, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        urls = write_shards(root)
        results["generate_seconds"] = round(time.perf_counter() - t, 1)
        n = SHARDS * PER_SHARD
        runs = {"plain_headers_stream": lambda: plain_tarfile_loop(urls, (), "r|"),
                "plain_headers_seek": lambda: plain_tarfile_loop(urls, (), "r:"),
                "plain_json_txt_stream": lambda: plain_tarfile_loop(urls, (".json", ".txt"), "r|"),
                "plain_json_txt_seek": lambda: plain_tarfile_loop(urls, (".json", ".txt"), "r:"),
                "all": lambda: scan(urls, "all", root), "targeted": lambda: scan(urls, "targeted", root)}
        timings: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(3):  # interleaved: all see the same machine state
            for name, fn in runs.items():
                t = time.perf_counter()
                assert fn() == n
                timings[name].append(n / (time.perf_counter() - t))
        rates = {k: float(np.median(v)) for k, v in timings.items()}
        headers = max(rates["plain_headers_stream"], rates["plain_headers_seek"])
        json_txt = max(rates["plain_json_txt_stream"], rates["plain_json_txt_seek"])
        results["scan"] = {
            **{f"{k}_samples_per_s": round(v) for k, v in rates.items()},
            "ratio_all_over_best_plain_headers": round(rates["all"] / headers, 3),
            "ratio_targeted_over_best_plain_json_txt": round(rates["targeted"] / json_txt, 3),
        }
    results["merge_memory"] = [merge_memory(1_000_000, 100), merge_memory(10_000_000, 100)]
    results["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = Path(__file__).parent / "results" / "subset_scan.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
