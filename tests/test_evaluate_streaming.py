"""Evaluate reads only what it uses: the query sample is drawn from a decode-free listing and
decoded from the shards holding it (the same sample as decoding the whole split); the attack
database's defense images are (shard, row) pairs drawn from per-shard counts, read from only
the shards holding them (the same keys as listing every database key)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import shards as shards_mod
from pipeline.data.fashion_mnist import write_split_shards
from pipeline.data.shards import expand_shards, load_images
from pipeline.data.subsets import CANDIDATE_SCHEMA
from pipeline.evaluate.experiment import database_sample_keys, load_queries
from pipeline.features.extract import ShardWriter
from pipeline.layout import JobLayout
from tests.conftest import synthetic_images

PER_SHARD = 20


@pytest.fixture()
def decoded_urls(monkeypatch):
    """The shards whose images are decoded (iter_samples with decode=True, or iter_encoded)."""
    opened: list[str] = []
    real_samples, real_encoded = shards_mod.iter_samples, shards_mod.iter_encoded

    def samples(url, stats, *args, decode=True, **kwargs):
        if decode:
            opened.append(url)
        return real_samples(url, stats, *args, decode=decode, **kwargs)

    def encoded(url, stats, *args, **kwargs):
        opened.append(url)
        return real_encoded(url, stats, *args, **kwargs)

    monkeypatch.setattr(shards_mod, "iter_samples", samples)
    monkeypatch.setattr(shards_mod, "iter_encoded", encoded)
    return opened


def _model():
    return SimpleNamespace(in_channels=1, preprocess={"crop": None, "resize": None,
                                                      "interpolation": "bicubic"})


def test_query_sample_is_decoded_from_its_shards_only_and_equals_the_whole_split_draw(
        tmp_path, decoded_urls):
    images, labels = synthetic_images(10 * PER_SHARD, seed=5)
    write_split_shards(images, labels, tmp_path / "q", "test", samples_per_shard=PER_SHARD)
    urls = expand_shards(str(tmp_path / "q"))
    assert len(urls) == 10
    ev = SimpleNamespace(num_queries=3, seed=11)
    queries, rest = load_queries(urls, _model(), ev, 10**8)
    # the sample as it was drawn before: every image of the split decoded, then chosen
    keys, all_images, all_labels, _ = load_images(urls, 1)
    chosen = np.sort(np.random.default_rng(11).choice(len(all_images), 3, replace=False))
    assert queries["keys"] == [keys[i] for i in chosen]
    assert np.array_equal(queries["images"], all_images[chosen])
    assert np.array_equal(queries["labels"], all_labels[chosen])
    holding = sorted({urls[i // PER_SHARD] for i in chosen})
    assert sorted(decoded_urls[:len(holding)]) == holding  # no other shard decoded
    assert len(decoded_urls) == len(holding) + len(urls)  # + load_images' whole-split decode above
    # the rest of the split: decoded on demand, the same draw as from the decoded rest
    decoded_urls.clear()
    rest_idx = np.setdiff1d(np.arange(len(all_images)), chosen)
    rng_old, rng_new = np.random.default_rng(4), np.random.default_rng(4)
    want = all_images[rest_idx][rng_old.choice(len(rest_idx), 5, replace=False)]
    got = rest["split"].draw(rng_new, 5, rest["positions"], sort=False)[1]
    assert np.array_equal(got, want)
    assert len(decoded_urls) <= 5


def _write_features(layout: JobLayout, shard_index: int, keys: list[str]) -> None:
    class Codes:
        dim = 2

        @staticmethod
        def encode(x):
            return np.asarray(x, np.float16)

    w = ShardWriter(layout.features_file(shard_index), shard_index, ["l"], {"l": Codes()}, 2)
    n = len(keys)
    w.add(keys, [0] * n, {"l": np.zeros((n, 2), np.float32)}, np.full((n, 2), 0.5, np.float32))
    w.close({"stats": {"read": n, "skipped": {}}})


def test_attack_database_draws_shard_rows_and_reads_only_their_shards(tmp_path, monkeypatch):
    layout = JobLayout(tmp_path)
    sizes = [30, 0, 45, 12, 50, 7, 33, 21]
    for s, n in enumerate(sizes):
        _write_features(layout, s, [f"k{s}-{i}" for i in range(n)])
    pq.write_table(pa.table({"shard_index": list(range(len(sizes))),
                             "url": [f"u{s}.tar" for s in range(len(sizes))],
                             "num_keys": sizes, "num_samples": sizes}), layout.shards_table)
    read: list[str] = []
    real = pq.read_table

    def counting(path, *args, **kwargs):
        read.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", counting)
    job = SimpleNamespace(subset=None)
    by_shard = database_sample_keys(layout, job, np.random.default_rng(7), 6)
    # the draw as it was: every database key listed, shard by shard
    every = [f"k{s}-{i}" for s, n in enumerate(sizes) for i in range(n)]
    want = {every[i] for i in np.random.default_rng(7).choice(len(every), 6, replace=False)}
    assert set().union(*by_shard.values()) == want
    assert all(k.startswith(f"k{s}-") for s, keys in by_shard.items() for k in keys)
    feature_reads = [p for p in read if p.endswith(".parquet") and "features" in p]
    assert sorted(feature_reads) == sorted(str(layout.features_file(s)) for s in by_shard)
    assert len(by_shard) < len(sizes) - 1  # not every shard read
    with pytest.raises(ValueError, match="199 defense-database images wanted, the database has 198"):
        database_sample_keys(layout, job, np.random.default_rng(0), 199)

    # a subset database: rows of the manifest's row groups, only the groups holding them read
    rows = [(s, f"k{s}-{i}") for s, n in enumerate(sizes) for i in range(0, n, 3)]
    manifest = pa.table({"hash": pa.array(range(len(rows)), pa.uint64()),
                         "shard_index": pa.array([s for s, _ in rows], pa.int64()),
                         "key": [k for _, k in rows], "hashtags": pa.array([[]] * len(rows), pa.list_(pa.string())),
                         "classes": pa.array([[]] * len(rows), pa.list_(pa.int32()))}, schema=CANDIDATE_SCHEMA)
    layout.subset_dir.mkdir()
    pq.write_table(manifest, layout.subset_manifest, row_group_size=10)
    by_shard = database_sample_keys(layout, SimpleNamespace(subset=object()), np.random.default_rng(3), 4)
    want = {rows[i][1] for i in np.random.default_rng(3).choice(len(rows), 4, replace=False)}
    assert set().union(*by_shard.values()) == want
    assert all(k.startswith(f"k{s}-") for s, keys in by_shard.items() for k in keys)
