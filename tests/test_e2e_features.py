"""Feature variants end to end through Ray: R-MAC + PCA-whitening + 8-bit codes, and ITQ binary
codes searched with a binary (Hamming) FAISS index."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_job
from pipeline.data.fashion_mnist import write_split_shards
from pipeline.defense.classifier import DefendedClassifier
from pipeline.features.stack import load_stack
from pipeline.layout import JobLayout
from pipeline.runtime.job import run_job
from tests.conftest import synthetic_images


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("features_variants")
    images, labels = synthetic_images(240, seed=21)
    write_split_shards(images, labels, root / "db", "train", samples_per_shard=80)
    return root, images


@pytest.mark.slow
@pytest.mark.parametrize("features, index, column_type", [
    ({"pooling": "rmac", "whiten": True, "storage": "sq8", "pca_dim": 16, "rmac_sample": 100},
     {"factory": "IVF8,Flat", "train_sample": 200, "nprobe": 8},
     "fixed_size_list<element: uint8>[16]"),
    ({"pooling": "avg", "storage": "itq", "pca_dim": 32},
     {"factory": "BFlat"}, "fixed_size_list<element: uint8>[4]"),
])
def test_feature_variants_index_and_query(shards, ray_local, features, index, column_type):
    root, images = shards
    name = f"{features['pooling']}-{features['storage']}"
    spec = parse_job({
        "name": name, "output_dir": str(root / name),
        "data": {"database": str(root / "db"), "queries": str(root / "db" / "00002.tar")},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "features": {"layers": ["conv_3_2", "conv_4_2"], "pca_sample": 200, **features},
        "index": index, "runtime": {"progress": False},
    })
    summary = run_job(spec, "verify")
    layout = JobLayout(spec.output_dir)
    assert summary["verify"]["keys"] == 240
    table = pq.read_table(layout.features_file(0))
    assert str(table.schema.field("conv_4_2").type) == column_type
    stack = load_stack(layout.transform_dir("conv_4_2"))
    assert (stack.pooling, stack.storage) == (features["pooling"], features["storage"])
    defense = DefendedClassifier.from_job(layout.root, layer="conv_4_2", k=5)
    try:
        _, by_layer = defense.neighbours_all_layers(images[:40, ..., None], ["conv_4_2"], 5)
        neigh = by_layer["conv_4_2"]
        ids = table.column("id").to_numpy()
        # a database image finds itself (distance 0: same decode, same codes) in its top 5
        assert np.mean([ids[j] in neigh.ids[j] for j in range(40)]) >= 0.9
        assert (neigh.distances[:, 0] == 0).mean() >= 0.9
    finally:
        defense.store.close()
