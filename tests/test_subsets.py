"""IG-N-All / IG-N-Targeted subsets: exact N, reproducible, nested, uniform, targeted-only."""

import io
import json
import tarfile

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.hashtags import load_vocabulary
from pipeline.data.subsets import (
    NotEnoughSamples,
    SubsetRule,
    finish_subset,
    key_hash,
    scan_shard_candidates,
)

VOCAB_TAGS = ["tabby", "goldenretriever", "pizza", "crane", "Golden_Retriever"]
OTHER_TAGS = ["sunset", "mood", "selfie", "happy", "love"]  # not ImageNet-1k synonyms


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def write_collection(root, shards: int, per_shard: int, seed: int = 0, targeted_every: int = 3,
                     empty_every: int = 0):
    """img2dataset-like shards: key.jpg, key.json (url, caption, tags), key.txt.
    Every ``targeted_every``-th sample carries a vocabulary tag (in tags or as caption #hashtag)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for r in range(per_shard):
                key = f"{s:05d}{r:04d}"
                targeted = r % targeted_every == 0
                tags = [str(rng.choice(OTHER_TAGS))]
                caption = "a photo"
                if targeted and r % 2 == 0:
                    tags.append(str(rng.choice(VOCAB_TAGS)))
                elif targeted:
                    caption += f" of my #{rng.choice(VOCAB_TAGS)}"
                image = b"" if empty_every and r % empty_every == 1 else JPEG
                members = {"jpg": image, "txt": caption.encode(),
                           "json": json.dumps({"url": f"http://x/{key}", "caption": caption,
                                               "tags": tags}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return sorted(str(p) for p in root.glob("*.tar"))


def build(urls, rule, out_dir, allow_smaller=False):
    candidates, counts = [], []
    for i, url in enumerate(urls):
        candidates.append(str(out_dir / "candidates" / f"{i:05d}.parquet"))
        counts.append(scan_shard_candidates(url, i, rule, candidates[-1]))
    summary = finish_subset(rule, candidates, out_dir, counts, allow_smaller)
    table = pq.read_table(out_dir / "subset.parquet")
    return summary, table


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("coll"), shards=6, per_shard=150)


def _keys(table) -> set:
    return set(table.column("key").to_pylist())


def test_key_hash_is_seeded_and_stable():
    assert key_hash("000001234", 0) == key_hash("000001234", 0)
    assert key_hash("000001234", 0) != key_hash("000001234", 1)
    assert 0 <= key_hash("x", 7) < 2**64


def test_all_exact_n_reproducible_and_seeded(collection, tmp_path):
    s1, t1 = build(collection, SubsetRule("all", 137, seed=3), tmp_path / "a")
    _, t2 = build(collection, SubsetRule("all", 137, seed=3), tmp_path / "b")
    _, t3 = build(collection, SubsetRule("all", 137, seed=4), tmp_path / "c")
    assert t1.num_rows == 137 and len(_keys(t1)) == 137
    assert _keys(t1) == _keys(t2)
    assert _keys(t1) != _keys(t3)
    assert s1["scanned"] == 900 and s1["selected"] == 137
    # the N smallest hashes over the whole collection, computed directly
    every = [f"{s:05d}{r:04d}" for s in range(6) for r in range(150)]
    want = set(sorted(every, key=lambda k: key_hash(k, 3))[:137])
    assert _keys(t1) == want


def test_subsets_are_nested(collection, tmp_path):
    for kind in ("all", "targeted"):
        small = _keys(build(collection, SubsetRule(kind, 40, seed=9), tmp_path / f"{kind}s")[1])
        big = _keys(build(collection, SubsetRule(kind, 200, seed=9), tmp_path / f"{kind}b")[1])
        assert len(small) == 40 and len(big) == 200 and small < big


def test_selection_is_uniform_over_shards(tmp_path):
    urls = write_collection(tmp_path / "u", shards=10, per_shard=300)
    _, table = build(urls, SubsetRule("all", 1000, seed=0), tmp_path / "out")
    counts = np.bincount(table.column("shard_index").to_numpy(), minlength=10)
    chi2 = float((((counts - 100.0) ** 2) / 100.0).sum())
    assert chi2 < 27.88, (counts, chi2)  # chi-square critical value, 9 dof, p = 0.001


def test_targeted_selects_only_matching_samples_and_reports_coverage(collection, tmp_path):
    summary, table = build(collection, SubsetRule("targeted", 120, seed=1), tmp_path / "t")
    vocab = load_vocabulary()
    assert table.num_rows == 120
    for tags, classes in zip(table.column("hashtags").to_pylist(),
                             table.column("classes").to_pylist(), strict=True):
        assert tags and all(t in vocab for t in tags)
        assert classes == sorted({c for t in tags for c in vocab.classes_of(t)})
    assert summary["matched"] == 6 * 50  # every third sample carries a vocabulary tag
    cov = summary["coverage"]
    per_class = np.array(cov["per_class"])
    assert per_class.sum() == sum(len(c) for c in table.column("classes").to_pylist())
    tabby = vocab.classes_of("tabby")[0]
    assert per_class[tabby] > 0
    assert cov["classes_covered"] == int((per_class > 0).sum()) <= 5
    assert len(cov["classes_without_images"]) == 1000 - cov["classes_covered"]
    assert {"class", "wnid", "name"} <= set(cov["classes_without_images"][0])


def test_not_enough_matching_samples_fails_unless_allowed(collection, tmp_path):
    with pytest.raises(NotEnoughSamples, match="only 300 samples carry a vocabulary hashtag"):
        build(collection, SubsetRule("targeted", 500), tmp_path / "x")
    summary, table = build(collection, SubsetRule("targeted", 500), tmp_path / "y", allow_smaller=True)
    assert table.num_rows == summary["selected"] == 300


def test_bad_and_truncated_samples_are_counted_not_selected(tmp_path):
    urls = write_collection(tmp_path / "bad", shards=2, per_shard=60, empty_every=10)
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[: len(data) // 2])
    summary, table = build(urls, SubsetRule("all", 10_000), tmp_path / "o", allow_smaller=True)
    counts = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert counts["skipped"]["empty_image"] >= 6
    assert summary["scanned"] < 120
    assert table.num_rows == summary["selected"] == summary["eligible"]
    assert not any(k.endswith("1") and int(k[-4:]) % 10 == 1 for k in _keys(table))


def test_fsspec_memory_input_gives_the_same_subset(collection, tmp_path):
    fs = fsspec.filesystem("memory")
    for url in collection:
        fs.pipe(f"/coll/{url.rsplit('/', 1)[1]}", open(url, "rb").read())
    from pipeline.data.shards import expand_shards

    mem_urls = expand_shards("memory://coll")
    assert len(mem_urls) == 6 and all(u.startswith("memory://") for u in mem_urls)
    _, local = build(collection, SubsetRule("all", 77, seed=2), tmp_path / "l")
    _, mem = build(mem_urls, SubsetRule("all", 77, seed=2), tmp_path / "m")
    assert _keys(local) == _keys(mem)


@pytest.mark.slow
def test_cli_subset_build_through_ray(collection, tmp_path, ray_local):
    out = tmp_path / "cli"
    args = ["subset", "build", "--kind", "targeted", "--size", "25", "--seed", "5",
            "--input", collection[0].rsplit("/", 1)[0], "--output", str(out), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert '"selected": 25' in result.output and "classes_covered" in result.output
    assert pq.read_table(out / "subset.parquet").num_rows == 25
    result = CliRunner().invoke(main, args[:5] + ["5000"] + args[6:])
    assert result.exit_code == 2 and "only 300 samples" in result.output


def _candidate_files(tmp_path, n: int, shards: int, seed: int = 0, dup_hash: bool = False):
    """Shards' candidate files as the scan writes them (ascending hash), n rows in all."""
    import pyarrow as pa

    from pipeline.data.subsets import CANDIDATE_SCHEMA

    rng = np.random.default_rng(seed)
    files = []
    for s in range(shards):
        m = n // shards
        h = np.sort(rng.integers(0, 2**64 - 1, m, dtype=np.uint64, endpoint=True))
        if dup_hash and m > 10:
            h[5] = h[4]  # equal hashes count once each
        path = tmp_path / f"c{n}" / f"{s:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "hash": pa.array(h, pa.uint64()), "shard_index": pa.array(np.full(m, s), pa.int64()),
            "key": pa.array([f"{s}-{i}" for i in range(m)], pa.string()),
            "hashtags": pa.array([[]] * m, pa.list_(pa.string())),
            "classes": pa.array([[0]] * m, pa.list_(pa.int32()))}, schema=CANDIDATE_SCHEMA), path,
            row_group_size=8192)
        files.append(path)
    return files


@pytest.mark.parametrize("size", [1, 777, 20_000, 39_999, 40_000, 50_000])
def test_merge_threshold_by_hash_range_equals_the_sorted_answer(tmp_path, monkeypatch, size):
    from pipeline.data import subsets

    files = _candidate_files(tmp_path, 40_000, 7, seed=size, dup_hash=True)
    every = np.sort(np.concatenate([pq.read_table(f).column("hash").to_numpy() for f in files]))
    want = int(every[min(size, len(every)) - 1])
    for cap, batch in ((1 << 20, 1 << 16), (50, 1000)):  # small cap: several narrowing passes
        monkeypatch.setattr(subsets, "RANGE_CAP", cap)
        monkeypatch.setattr(subsets, "READ_BATCH", batch)
        assert subsets.global_threshold(files, size) == (want, len(every))
    out = subsets.write_subset_manifest(files, want, tmp_path / "m.parquet", 1)
    assert out["selected"] == int((every <= np.uint64(want)).sum())
    assert out["coverage"].tolist() == [out["selected"]]


def test_merge_memory_does_not_grow_with_n(tmp_path):
    """Peak traced memory of the merge (threshold + manifest write) for N = 50k and 400k
    candidates over the same shard count: the same, within the writer's batch."""
    import tracemalloc

    from pipeline.data.subsets import global_threshold, write_subset_manifest

    peaks = {}
    for n in (50_000, 400_000):
        files = _candidate_files(tmp_path, 2 * n, 16)  # the merge drops half
        tracemalloc.start()
        try:
            threshold, total = global_threshold(files, n)
            peak_threshold = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            out = write_subset_manifest(files, threshold, tmp_path / f"m{n}.parquet", 1)
            peaks[n] = (peak_threshold, tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert total == 2 * n and out["selected"] == n
    print("merge peaks (threshold, write) KiB:", {n: (a // 1024, b // 1024) for n, (a, b) in peaks.items()})
    (t_small, w_small), (t_large, w_large) = peaks[50_000], peaks[400_000]
    assert t_large <= 1.25 * t_small + 256 * 1024  # 8x N: not 8x the memory
    assert w_large <= 1.25 * w_small + 256 * 1024
    assert t_large < 400_000 * 8 / 2  # far below holding the N hashes
