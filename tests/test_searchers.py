"""Neighbour search plumbing: top-k merge across shards, store readers, co-located actors, and
the defended classifier against a slow reference written from the paper's formulas."""

import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_job
from pipeline.data.fashion_mnist import write_split_shards
from pipeline.defense.classifier import DefendedClassifier
from pipeline.defense.searchers import Neighbours, merge_topk
from pipeline.features.backbones import images_to_tensor
from pipeline.features.extract import forward_features, stack_poolers
from pipeline.ids import make_ids
from pipeline.layout import JobLayout
from pipeline.runtime.job import run_job
from pipeline.store.softmax_store import SoftmaxStore, StoreLocked, write_partition
from tests.conftest import synthetic_images


def _part(dist, ids, c=3):
    dist, ids = np.asarray(dist, np.float32), np.asarray(ids, np.int64)
    softmax = np.zeros(ids.shape + (c,), np.float32)
    softmax[..., 0] = ids  # recognisable rows
    return Neighbours(dist, ids, softmax, ids != -1)


def test_merge_topk_keeps_the_nearest_and_puts_missing_last():
    a = _part([[0.1, 0.5, 0.9]], [[1, 2, 3]])
    b = _part([[0.2, 0.3, np.inf]], [[7, 8, -1]])
    merged = merge_topk([a, b], 4)
    assert merged.ids.tolist() == [[1, 7, 8, 2]]
    assert np.allclose(merged.distances, [[0.1, 0.2, 0.3, 0.5]])
    assert merged.softmax[0, :, 0].tolist() == [1, 7, 8, 2] and merged.found.all()
    few = merge_topk([_part([[0.4, 1e30]], [[5, -1]]), _part([[1e30, 1e30]], [[-1, -1]])], 2)
    assert few.ids.tolist() == [[5, -1]] and few.found.tolist() == [[True, False]]


def test_store_partition_serves_many_threads_and_refuses_a_second_process(tmp_path):
    rng = np.random.default_rng(0)
    ids = make_ids(0, np.arange(500))
    softmax = rng.dirichlet(np.ones(10), 500)
    write_partition(tmp_path, 0, iter([(ids, softmax)]))
    with SoftmaxStore(tmp_path, 1) as store:
        queries = [rng.choice(ids, (20, 50)) for _ in range(32)]
        single = [store.get_many(q)[0] for q in queries]
        with ThreadPoolExecutor(8) as pool:  # readers are threads of the owning process
            threaded = list(pool.map(lambda q: store.get_many(q)[0], queries))
        assert all(np.array_equal(a, b) for a, b in zip(single, threaded, strict=True))
        code = ("import sys; from pipeline.store.softmax_store import SoftmaxStore, StoreLocked\n"
                f"try:\n    SoftmaxStore({str(tmp_path)!r}, 1)\nexcept StoreLocked as e:\n"
                "    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert "already open" in proc.stdout and "part-000" in proc.stdout
    assert StoreLocked.__mro__[1] is RuntimeError


def _reference_predict(defense, job_dir, images, layer, k, rule, m=20, p=3.0):
    """Brute-force kNN over the Parquet features + the weighting formulas in plain Python
    (only the model and the fitted transform are taken from ``defense``)."""
    layout = JobLayout(job_dir)
    tables = [pq.read_table(f) for f in sorted(layout.features_dir.glob("*.parquet"))]
    db = np.concatenate([np.stack(t.column(layer).to_numpy(zero_copy_only=False)) for t in tables])
    db = db.astype(np.float32)
    soft = np.concatenate([np.stack(t.column("softmax").to_numpy(zero_copy_only=False))
                           for t in tables]).astype(np.float32)
    stack = defense.transforms[layer]
    pooled, _ = forward_features(defense.model, images_to_tensor(images), [layer],
                                 stack_poolers(defense.transforms))
    queries = stack.query_vectors(pooled[layer])
    labels, scores = [], []
    for q in queries:
        d = ((db - q) ** 2).sum(1)
        nearest = np.argsort(d, kind="stable")[:k]
        total = [0.0] * soft.shape[1]
        for j in nearest:
            s = [float(v) for v in soft[j]]
            c = len(s)
            if rule == "uw":
                w = 1.0
            elif rule == "cbw_e":
                w = abs(math.log(c) + sum(v * math.log(v) for v in s if v > 0))
            else:
                top = sorted(s, reverse=True)
                w = sum((top[0] - top[i]) ** p for i in range(1, min(m, c - 1) + 1))
            for cls in range(c):
                total[cls] += w * s[cls]
        norm = sum(total)
        scores.append([t / norm for t in total])
        labels.append(max(range(len(total)), key=lambda i: (total[i], -i)))
    return np.array(labels), np.array(scores)


@pytest.fixture(scope="module")
def sharded_job(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("sharded")
    images, labels = synthetic_images(200, seed=31)
    write_split_shards(images, labels, root / "db", "train", samples_per_shard=50)
    spec = parse_job({
        "name": "sharded", "output_dir": str(root / "job"),
        "data": {"database": str(root / "db"), "queries": str(root / "db" / "00000.tar")},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "features": {"layers": ["conv_3_2", "conv_4_2"], "pca_dim": 8, "pca_sample": 150,
                     "storage": "float32"},
        "index": {"factory": "Flat", "layout": "sharded"},
        "store": {"partitions": 2}, "runtime": {"progress": False},
    })
    run_job(spec, "verify")
    return spec, images


@pytest.mark.slow
def test_defended_classifier_equals_slow_reference(sharded_job):
    spec, images = sharded_job
    queries = synthetic_images(12, seed=99)[0][..., None]
    defense = DefendedClassifier.from_job(spec.output_dir, layer="conv_4_2", k=7)
    try:
        _, by_layer = defense.neighbours_all_layers(queries)
        for rule in ("uw", "cbw_e", "cbw_d"):
            labels, scores = defense.vote(by_layer["conv_4_2"], rule)
            ref_labels, ref_scores = _reference_predict(defense, spec.output_dir, queries,
                                                        "conv_4_2", 7, rule)
            assert np.array_equal(labels, ref_labels), rule
            assert np.allclose(scores, ref_scores, atol=2e-3), rule  # float16 stored softmax
    finally:
        defense.close()


@pytest.mark.slow
def test_colocated_actors_answer_like_the_local_search(sharded_job):
    spec, images = sharded_job
    layout = JobLayout(spec.output_dir)
    assert sorted(p.name for p in layout.index_dir("conv_4_2").glob("shard-*.faiss")) == [
        "shard-000.faiss", "shard-001.faiss"]
    local = DefendedClassifier.from_job(spec.output_dir, k=10)
    _, want = local.neighbours_all_layers(images[:30, ..., None])
    local.close()  # the actors open the store partitions next
    from pipeline.runtime.colocated import open_colocated

    remote = open_colocated(spec.output_dir, k=10)  # one Ray actor per partition
    try:
        assert remote.searcher.ntotal() == {"conv_3_2": 200, "conv_4_2": 200}
        _, got = remote.neighbours_all_layers(images[:30, ..., None])
        for layer in ("conv_3_2", "conv_4_2"):
            assert np.allclose(got[layer].distances, want[layer].distances)
            assert np.array_equal(got[layer].softmax.sum(-1) > 0, want[layer].found)
            for a, b in zip(got[layer].ids, want[layer].ids, strict=True):
                assert set(a.tolist()) == set(b.tolist())
            assert np.array_equal(remote.vote(got[layer])[0], local.vote(want[layer])[0])
    finally:
        remote.close()


@pytest.mark.slow
def test_every_key_is_in_exactly_the_partition_partition_id_names(sharded_job):
    from pipeline.ids import partition

    spec, _ = sharded_job
    layout = JobLayout(spec.output_dir)
    seen = []
    for p in range(2):
        with SoftmaxStore(layout.store_dir, 2, only=[p]) as store:
            ids = np.fromiter(store.iter_ids(), np.int64)
        assert len(ids) and (partition(ids, 2) == p).all()
        seen.append(ids)
    everything = np.concatenate(seen)
    assert len(everything) == len(set(everything.tolist())) == 200
