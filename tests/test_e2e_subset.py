"""A job that indexes only a subset: extracting only it, or extracting once and indexing nested
subsets of it without re-extracting."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_job
from pipeline.data.fashion_mnist import write_split_shards
from pipeline.features.extract import read_metadata
from pipeline.index.faiss_index import all_ids, load_index
from pipeline.layout import JobLayout
from pipeline.runtime.job import run_job
from pipeline.runtime.manifest import Manifest
from pipeline.store.softmax_store import SoftmaxStore
from tests.conftest import append_corrupt_sample, synthetic_images

LAYERS = ["conv_3_2", "conv_4_2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("subset_job")
    images, labels = synthetic_images(300, seed=11)
    write_split_shards(images, labels, root / "db", "train", samples_per_shard=80)
    append_corrupt_sample(root / "db" / "00001.tar", "corrupt-key")
    return root


def _spec(root, out: str, subset: dict):
    return parse_job({
        "name": out, "output_dir": str(root / out),
        "data": {"database": str(root / "db"), "queries": str(root / "db" / "00003.tar")},
        "subset": subset,
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "features": {"layers": LAYERS, "pca_dim": 8, "pca_sample": 100, "batch_size": 64},
        "index": {"factory": "Flat"},
        "runtime": {"progress": False},
    })


def _written_and_skipped(layout: JobLayout):
    keys, ids, skipped = [], [], {}
    for path in sorted(layout.features_dir.glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "id"])
        keys += table.column("key").to_pylist()
        ids.append(table.column("id").to_numpy())
        skipped.update(dict(read_metadata(path)["stats"]["skipped_keys"]))
    return keys, np.concatenate(ids), skipped


def _indexed_ids(layout: JobLayout) -> list[np.ndarray]:
    out = [np.sort(all_ids(load_index(layout.merged_index(layer)))) for layer in LAYERS]
    with SoftmaxStore(layout.store_dir, 2) as store:
        out.append(np.sort(np.fromiter(store.iter_ids(), np.int64)))
    return out


@pytest.mark.slow
def test_subset_applied_at_features(shards, ray_local):
    # with seed 1 the corrupt sample ranks 111th of 301: selected, then skipped at decoding
    spec = _spec(shards, "feat", {"kind": "all", "size": 250, "seed": 1, "apply": "features"})
    summary = run_job(spec, "verify")
    layout = JobLayout(spec.output_dir)
    selected = set(pq.read_table(layout.subset_manifest).column("key").to_pylist())
    keys, ids, skipped = _written_and_skipped(layout)
    assert len(selected) == 250 and skipped == {"corrupt-key": "corrupt_image"}
    assert set(keys) | set(skipped) == selected and not set(keys) & set(skipped)
    assert len(keys) == len(set(keys)) == 250 - len(skipped)
    for got in _indexed_ids(layout):
        assert np.array_equal(got, np.sort(ids))
    assert summary["subset"]["selected"] == 250 and summary["verify"]["keys"] == 249
    assert summary["verify"]["skipped"] == {"corrupt_image": 1}


@pytest.mark.slow
def test_nested_subsets_applied_at_index_reuse_features(shards, ray_local):
    spec = _spec(shards, "idx", {"kind": "all", "size": 200, "seed": 2, "apply": "index"})
    run_job(spec, "verify")
    layout = JobLayout(spec.output_dir)
    keys, ids, _ = _written_and_skipped(layout)
    assert len(keys) == 300  # every good image extracted once
    id_of = dict(zip(keys, ids.tolist(), strict=True))
    big = set(pq.read_table(layout.subset_manifest).column("key").to_pylist())
    big_ids = _indexed_ids(layout)
    assert all(np.array_equal(g, np.sort([id_of[k] for k in big if k in id_of])) for g in big_ids)

    manifest = Manifest(layout.manifest)
    attempts = lambda: dict(manifest._db.execute(  # noqa: E731
        "SELECT unit, attempts FROM units WHERE stage='features'").fetchall())
    before = attempts()
    spec.subset.size = 80
    summary = run_job(spec, "verify")
    assert attempts() == before  # the smaller database re-used the extracted features
    manifest.close()
    small = set(pq.read_table(layout.subset_manifest).column("key").to_pylist())
    assert len(small) == 80 and small < big
    small_ids = _indexed_ids(layout)
    want = np.sort([id_of[k] for k in small if k in id_of])
    assert all(np.array_equal(g, want) for g in small_ids)
    assert summary["verify"]["keys"] == len(want)


@pytest.mark.slow
def test_targeted_subset_without_enough_matches_fails_the_stage_cleanly(shards, ray_local):
    from pipeline.runtime.ray_runner import StageFailed

    spec = _spec(shards, "nomatch", {"kind": "targeted", "size": 10})
    with pytest.raises(StageFailed, match="only 0 samples carry a vocabulary hashtag"):
        run_job(spec, "verify")
    manifest = Manifest(JobLayout(spec.output_dir).manifest)
    assert manifest.counts("subset") == {"failed": 1}
    assert not JobLayout(spec.output_dir).features_dir.exists()  # nothing after the subset ran
    manifest.close()


@pytest.mark.slow
def test_resume_finishes_a_job_folder_without_redoing_done_units(shards, ray_local):
    from click.testing import CliRunner

    from pipeline.cli import main

    spec = _spec(shards, "resumed", {"kind": "all", "size": 100, "seed": 3, "apply": "features"})
    run_job(spec, "features")  # as if the driver died after the features stage
    layout = JobLayout(spec.output_dir)
    manifest = Manifest(layout.manifest)
    done = dict(manifest._db.execute(
        "SELECT stage || '/' || unit, attempts FROM units WHERE state='done'").fetchall())
    manifest.close()
    result = CliRunner().invoke(main, ["resume", str(layout.root), "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = Manifest(layout.manifest)
    after = dict(manifest._db.execute("SELECT stage || '/' || unit, attempts FROM units").fetchall())
    manifest.close()
    assert all(after[unit] == attempts for unit, attempts in done.items())  # nothing redone
    assert any(u.startswith("verify") for u in after) and any(u.startswith("evaluate") for u in after)
    assert (layout.eval_dir / "results.csv").is_file()
