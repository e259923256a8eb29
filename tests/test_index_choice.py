"""Index choice from N, dimension and memory budget; recall tuning; an auto-chosen index job."""

import json

import faiss
import numpy as np
import pytest

from pipeline.index.choice import (
    ONDISK_MIN_VECTORS,
    choose_index,
    choose_merge,
    choose_nlist,
    recall_at_k,
    tune_nprobe,
)
from pipeline.index.faiss_index import (
    load_index,
    populate_part,
    search,
    train_index,
    write_index,
)


@pytest.mark.parametrize("n, dim, budget_mb, family", [
    (50_000, 256, 1024, "Flat"),
    (1_000_000, 256, 8192, "IVF8192_HNSW32,Flat"),
    (1_000_000, 256, 300, "IVF8192_HNSW32,SQ8"),
    (1_000_000, 256, 60, "OPQ32,IVF8192_HNSW32,PQ32"),
    (10**9, 256, 64 << 10, "OPQ32,IVF262144_HNSW32,PQ32"),
])
def test_choice_by_n_dim_and_budget(n, dim, budget_mb, family):
    choice = choose_index(n, dim, budget_mb << 20)
    assert choice.factory == family
    assert choice.memory_bytes <= budget_mb << 20
    faiss.index_factory(dim, choice.factory)  # a valid factory string


@pytest.mark.parametrize("merge, n, factory, layout, partitions, want", [
    ("auto", 1_000_000, "IVF1024,Flat", "merged", 1, "memory"),
    ("auto", ONDISK_MIN_VECTORS, "IVF1024,Flat", "merged", 1, "ondisk"),
    ("auto", 10**9, "OPQ32,IVF262144_HNSW32,PQ32", "merged", 4, "ondisk"),
    # sharded: each merge task holds one partition's lists
    ("auto", 4 * ONDISK_MIN_VECTORS - 4, "IVF1024,Flat", "sharded", 4, "memory"),
    ("auto", 4 * ONDISK_MIN_VECTORS, "IVF1024,Flat", "sharded", 4, "ondisk"),
    ("auto", 10**9, "Flat", "merged", 1, "memory"),  # no inverted lists to put on disk
    ("auto", 10**9, "BIVF65536", "merged", 1, "memory"),  # binary: merge_ondisk is float only
    ("memory", 10**9, "IVF1024,Flat", "merged", 1, "memory"),  # asked for: kept
    ("ondisk", 10, "IVF16,Flat", "merged", 1, "ondisk"),
])
def test_merge_goes_on_disk_above_a_size_per_merge_task(merge, n, factory, layout, partitions, want):
    assert choose_merge(merge, n, factory, layout, partitions) == want


def test_merge_defaults_to_auto():
    from pipeline.config import IndexSpec

    assert IndexSpec().merge == "auto"
    assert IndexSpec(factory="BFlat").merge == "auto"  # auto is valid for any factory


def test_choice_limits_and_binary():
    assert choose_nlist(10_000) == 256 and choose_nlist(10**12) == 1 << 20
    with pytest.raises(ValueError, match="no index for 1000000000 x 256 fits"):
        choose_index(10**9, 256, 1 << 30)
    assert choose_index(10_000, 256, 1 << 30, binary=True).factory == "BFlat"
    assert choose_index(10**8, 256, 1 << 40, binary=True).factory.startswith("BIVF")


def _clustered(n, dim, clusters, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def test_tuned_nprobe_reaches_the_target_recall(tmp_path):
    x = _clustered(20_000, 32, 200, seed=1)
    write_index(train_index(x, "IVF128,Flat"), tmp_path / "t.faiss")
    populate_part(tmp_path / "t.faiss", x, np.arange(len(x)), tmp_path / "i.faiss")
    index = faiss.read_index(str(tmp_path / "i.faiss"))
    queries = x[:300]
    _, truth = faiss.knn(queries, x, 10)
    nprobe, recall, curve = tune_nprobe(index, queries, truth, 10, target=0.95)
    assert nprobe is not None and recall >= 0.95
    assert curve[0]["nprobe"] == 1 and curve[-1]["nprobe"] == nprobe
    if len(curve) > 1:
        assert curve[-2]["recall"] < 0.95  # the smallest such nprobe
    assert recall_at_k(truth, truth) == 1.0


def test_a_reloaded_hnsw_quantised_index_serves_the_tuned_recall(tmp_path):
    """efSearch follows nprobe wherever nprobe is set, so searching the index file later (as
    the classifier does) gives the recall tuning recorded, not the file's default efSearch."""
    x = np.random.default_rng(2).normal(size=(20_000, 32)).astype(np.float32)  # no clusters: slow recall
    write_index(train_index(x, "IVF256_HNSW32,Flat"), tmp_path / "t.faiss")
    populate_part(tmp_path / "t.faiss", x, np.arange(len(x)), tmp_path / "i.faiss")
    queries = x[:300]
    _, truth = faiss.knn(queries, x, 10)
    _, _, curve = tune_nprobe(load_index(tmp_path / "i.faiss"), queries, truth, 10, target=1.0)
    tuned = {point["nprobe"]: point["recall"] for point in curve}
    assert 64 in tuned  # the curve went past efSearch's default of 16
    served = load_index(tmp_path / "i.faiss", 64)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(served).quantizer)
    assert quantizer.hnsw.efSearch == 128
    assert recall_at_k(search(served, queries, 10)[1], truth) == tuned[64]


@pytest.mark.slow
def test_job_with_auto_index_writes_choice_and_measured_recall(tmp_path, ray_local):
    from pipeline.config import parse_job
    from pipeline.data.fashion_mnist import write_split_shards
    from pipeline.layout import JobLayout
    from pipeline.runtime.job import run_job
    from tests.conftest import synthetic_images

    images, labels = synthetic_images(200, seed=41)
    write_split_shards(images, labels, tmp_path / "db", "train", samples_per_shard=100)
    spec = parse_job({
        "name": "auto", "output_dir": str(tmp_path / "job"),
        "data": {"database": str(tmp_path / "db"), "queries": str(tmp_path / "db" / "00001.tar")},
        "train": {"epochs": 1, "batch_size": 32},
        "features": {"layers": ["conv_4_2"], "pca_dim": 8, "pca_sample": 150},
        "index": {"factory": "auto", "memory_budget_gb": 0.5, "target_recall": 0.9},
        "evaluate": {"k": 10}, "runtime": {"progress": False},
    })
    run_job(spec, "verify")
    layout = JobLayout(spec.output_dir)
    choice = json.loads((layout.index_dir("conv_4_2") / "choice.json").read_text())
    info = json.loads(layout.index_info("conv_4_2").read_text())
    assert choice["factory"] == info["factory"] == "Flat" and choice["n"] == 200
    assert info["recall"]["recall"] == 1.0 and info["recall"]["k"] == 10
