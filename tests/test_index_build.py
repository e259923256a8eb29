"""Index build: bad inputs, empty shards, duplicate ids, on-disk merge, sharded vs unsharded
search; and through Ray: the CLI's index steps one by one, parallel populate against a
single-process build, a killed populate task resumed, a feature file copied over another."""

import io
import os
import shutil
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ConfigError, parse_job
from pipeline.features.extract import read_column
from pipeline.ids import make_ids
from pipeline.index.faiss_index import (
    IndexInputError,
    all_ids,
    ivfdata_path,
    load_index,
    merge_parts,
    populate_part,
    read_index,
    search,
    shard_set,
    train_index,
    write_index,
)
from pipeline.layout import JobLayout, read_json
from pipeline.runtime.manifest import Manifest
from tests.conftest import synthetic_images


def _clustered(n, dim=16, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32) * 2
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _parts(tmp_path, x, factory, shards=4):
    """Train on ``x``, populate one part per equal slice (shard s holds rows s*n/shards...)."""
    trained = tmp_path / "trained.faiss"
    write_index(train_index(x, factory), trained)
    paths, ids = [], []
    for s, rows in enumerate(np.array_split(np.arange(len(x)), shards)):
        ids.append(make_ids(s, np.arange(len(rows))))
        paths.append(tmp_path / "parts" / f"{s:05d}.faiss")
        populate_part(trained, x[rows], ids[-1], paths[-1])
    return trained, paths, np.concatenate(ids)


def _same_results(a, b, queries, k, nprobe=None):
    """Same distances, and the same ids wherever no two candidates tie at the k-th distance."""
    da, ia = search(a, queries, k, nprobe)
    db, ib = search(b, queries, k, nprobe)
    np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-5)
    for row_a, row_b in zip(ia, ib, strict=True):
        assert set(row_a.tolist()) == set(row_b.tolist())


# --- bad inputs -------------------------------------------------------------------------------

def test_dimension_mismatch_names_the_file_and_what_to_do(tmp_path):
    write_index(train_index(_clustered(200), "IVF4,Flat"), tmp_path / "trained.faiss")
    with pytest.raises(IndexInputError) as err:
        populate_part(tmp_path / "trained.faiss", _clustered(10, dim=8), make_ids(0, range(10)),
                      tmp_path / "part.faiss", source="features/00000.parquet")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("features/00000.parquet: 8-d vectors")
    assert "trained on 16" in msg and "re-run the index train step" in msg
    assert not (tmp_path / "part.faiss").exists()


def test_repeated_ids_in_one_shard_are_refused(tmp_path):
    write_index(train_index(_clustered(200), "Flat"), tmp_path / "trained.faiss")
    ids = make_ids(3, [0, 1, 1])
    with pytest.raises(IndexInputError, match=r"x.parquet: 1 ids repeat \(e.g. id 50331649 = "
                                              r"shard 3 row 1\)"):
        populate_part(tmp_path / "trained.faiss", _clustered(3), ids, tmp_path / "p.faiss",
                      source="x.parquet")


@pytest.mark.parametrize("factory, ondisk", [("Flat", False), ("IVF8,Flat", False),
                                             ("IVF8_HNSW32,SQ8", True)])
def test_an_empty_shard_gives_an_empty_part_that_merges(tmp_path, factory, ondisk):
    x = _clustered(600)
    trained, parts, ids = _parts(tmp_path, x, factory, shards=3)
    empty = tmp_path / "parts" / "00003.faiss"
    assert populate_part(trained, np.zeros((0, 16), np.float32), np.zeros(0, np.int64), empty) == 0
    assert read_index(empty).ntotal == 0
    out = tmp_path / "index.faiss"
    assert merge_parts(trained, [parts[0], empty, *parts[1:]], out, ondisk) == 600
    got = all_ids(load_index(out))
    assert len(got) == 600 and np.array_equal(np.sort(got), np.sort(ids))


@pytest.mark.parametrize("ondisk", [False, True])
def test_ids_shared_by_two_parts_are_refused_naming_both(tmp_path, ondisk):
    x = _clustered(600)
    trained, parts, _ = _parts(tmp_path, x, "IVF8,Flat", shards=3)
    copy = tmp_path / "parts" / "00009.faiss"  # shard 1's vectors and ids again
    populate_part(trained, x[200:400], make_ids(1, np.arange(200)), copy)
    with pytest.raises(IndexInputError) as err:
        merge_parts(trained, [*parts, copy], tmp_path / "index.faiss", ondisk)
    msg = str(err.value)
    assert "\n" not in msg and f"{parts[1]} and {copy} share 200 ids" in msg
    assert "= shard 1 row" in msg and "re-run the index populate step" in msg
    assert not (tmp_path / "index.faiss").exists() and not (tmp_path / "index.ivfdata").exists()
    # ids that interleave without colliding are fine (only overlapping ranges are compared)
    odd, even = tmp_path / "odd.faiss", tmp_path / "even.faiss"
    populate_part(trained, x[:100], np.arange(1, 200, 2), odd)
    populate_part(trained, x[100:200], np.arange(0, 200, 2), even)
    assert merge_parts(trained, [odd, even], tmp_path / "ok.faiss", ondisk) == 200


def test_ondisk_merge_is_refused_for_a_flat_factory():
    with pytest.raises(ConfigError, match="index.merge ondisk needs a float IVF factory"):
        parse_job({"name": "x", "data": {"database": "a", "queries": "b"},
                   "index": {"factory": "BFlat", "merge": "ondisk"},
                   "features": {"storage": "itq"}})


# --- merge layouts --------------------------------------------------------------------------

# PCA: a pre-transform in front of the IVF (as OPQ is in the auto choice at scale)
@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16_HNSW32,SQ8", "PCA8,IVF16,SQ8"])
def test_ondisk_merge_searches_like_the_in_memory_merge(tmp_path, factory, capfd):
    x = _clustered(3000, clusters=40, seed=1)
    trained, parts, ids = _parts(tmp_path / "build", x, factory)
    merge_parts(trained, parts, tmp_path / "mem.faiss")
    merge_parts(trained, parts, tmp_path / "job" / "disk.faiss", ondisk=True)
    assert ivfdata_path(tmp_path / "job" / "disk.faiss").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["disk.faiss", "disk.ivfdata"]
    shutil.move(tmp_path / "job", tmp_path / "moved")  # lists are found beside the index file
    capfd.readouterr()
    memory, disk = load_index(tmp_path / "mem.faiss"), load_index(tmp_path / "moved" / "disk.faiss")
    assert capfd.readouterr().out == ""  # FAISS's note on the moved lists stays off stdout
    assert disk.ntotal == memory.ntotal == 3000
    assert np.array_equal(np.sort(all_ids(disk)), np.sort(ids))
    queries = _clustered(50, clusters=40, seed=2)
    for nprobe in (1, 4, 16):
        d_mem, i_mem = search(memory, queries, 10, nprobe)
        d_disk, i_disk = search(disk, queries, 10, nprobe)
        assert np.array_equal(d_mem, d_disk) and np.array_equal(i_mem, i_disk), nprobe
    merge_parts(trained, parts, tmp_path / "moved" / "disk.faiss")  # back to memory
    assert not ivfdata_path(tmp_path / "moved" / "disk.faiss").exists()  # no stale lists


@pytest.mark.parametrize("factory, nprobe", [("Flat", None), ("IVF16,Flat", 16)])
def test_sharded_search_equals_unsharded(tmp_path, factory, nprobe):
    x = _clustered(2000, clusters=30, seed=3)
    trained, parts, _ = _parts(tmp_path, x, factory, shards=5)
    merge_parts(trained, parts, tmp_path / "all.faiss")
    for p in range(2):  # partition(id) = shard mod 2, as the job's sharded layout does
        merge_parts(trained, parts[p::2], tmp_path / f"shard-{p:03d}.faiss")
    whole = load_index(tmp_path / "all.faiss")
    sharded = shard_set([load_index(tmp_path / f"shard-{p:03d}.faiss") for p in range(2)])
    assert sharded.ntotal == whole.ntotal == 2000
    queries = _clustered(40, clusters=30, seed=4)
    _same_results(whole, sharded, queries, 20, nprobe)
    if nprobe:  # all lists probed: both are exact
        _, truth = faiss.knn(queries, x, 20)
        _, ids = search(sharded, queries, 20, nprobe)
        everything = np.concatenate([all_ids(load_index(p)) for p in parts])
        order = np.argsort(everything)  # parts hold x's rows in order
        assert np.array_equal(np.sort(ids, 1), np.sort(everything[order][truth], 1))


# --- through Ray: the job's index steps ------------------------------------------------------

def _append_corrupt_shard(path: Path, n: int) -> None:
    """A shard whose every image is corrupt: features writes an empty Parquet file for it."""
    with tarfile.open(path, "w") as tar:
        for j in range(n):
            for name, data in ((f"bad{j:03d}.png", b"\x89PNG\r\n\x1a\n broken"),
                               (f"bad{j:03d}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def featured(tmp_path_factory, ray_local):
    """A job folder finished up to its features stage: shards 0-2 hold 60 images each, shard 3
    only corrupt ones."""
    from pipeline.data.fashion_mnist import write_split_shards
    from pipeline.runtime.job import run_job

    root = tmp_path_factory.mktemp("index_build")
    images, labels = synthetic_images(180, seed=51)
    write_split_shards(images, labels, root / "db", "train", samples_per_shard=60)
    _append_corrupt_shard(root / "db" / "00003.tar", 5)
    raw = {
        "name": "idx", "output_dir": str(root / "base"),
        "data": {"database": str(root / "db"), "queries": str(root / "db" / "00000.tar")},
        "train": {"epochs": 1, "batch_size": 32},
        "features": {"layers": ["conv_4_2"], "pca_dim": 8, "pca_sample": 150,
                     "storage": "float32"},
        "index": {"factory": "IVF8,Flat", "train_sample": 180, "nprobe": 8},
        "store": {"partitions": 2}, "runtime": {"progress": False},
    }
    run_job(parse_job(raw), "features")
    return root, raw


def _job_copy(featured, tmp_path, **index):
    """A copy of the featured job folder (its manifest says features are done) and its YAML."""
    root, raw = featured
    shutil.copytree(root / "base", tmp_path / "job")
    raw = {**raw, "output_dir": str(tmp_path / "job"), "index": {**raw["index"], **index}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, JobLayout(tmp_path / "job"), raw


def _attempts(layout: JobLayout, stage_prefix: str) -> dict:
    m = Manifest(layout.manifest)
    rows = m._db.execute("SELECT stage || ':' || unit, attempts FROM units WHERE stage LIKE ?",
                         (stage_prefix + "%",)).fetchall()
    m.close()
    return dict(rows)


def _parquet_vectors(layout: JobLayout, layer: str):
    files = sorted(layout.features_dir.glob("*.parquet"))
    vectors = np.concatenate([read_column(f, layer) for f in files]).astype(np.float32)
    ids = np.concatenate([read_column(f, "id") for f in files]).astype(np.int64)
    return vectors, ids


@pytest.mark.slow
def test_index_steps_one_by_one_from_the_cli(featured, tmp_path):
    import json

    job_yaml, layout, raw = _job_copy(featured, tmp_path, merge="ondisk")
    runner = CliRunner()
    layer_dir = layout.index_dir("conv_4_2")

    def cli(*args):
        result = runner.invoke(main, [*args, str(job_yaml)])
        assert result.exit_code == 0, result.output
        return result

    cli("index", "train")
    assert (layer_dir / "trained.faiss").is_file() and not (layer_dir / "parts").exists()
    assert not _attempts(layout, "index.populate")

    cli("index", "populate")
    parts = sorted((layer_dir / "parts").glob("*.faiss"))
    assert [p.name for p in parts] == [f"{s:05d}.faiss" for s in range(4)]
    assert [read_index(p).ntotal for p in parts] == [60, 60, 60, 0]  # shard 3: only corrupt images
    assert not (layer_dir / "index.faiss").exists()
    before = _attempts(layout, "index")
    cli("index", "populate")  # done units are not run again
    assert _attempts(layout, "index") == before and set(before.values()) == {1}

    cli("index", "merge")
    info = read_json(layout.index_info("conv_4_2"))
    assert info["merge"] == "ondisk" and info["ntotal"] == 180
    assert (layer_dir / "index.ivfdata").stat().st_size > 0

    # parallel populate (one Ray task per shard) + merge == one process adding everything
    vectors, ids = _parquet_vectors(layout, "conv_4_2")
    single = read_index(layer_dir / "trained.faiss")
    single.add_with_ids(vectors, ids)
    built = load_index(layer_dir / "index.faiss")
    assert np.array_equal(np.sort(all_ids(built)), np.sort(ids)) and len(ids) == 180
    queries = np.concatenate([vectors[::9], _clustered(10, dim=8, seed=7)])
    _same_results(built, single, queries, 15, nprobe=8)
    _, truth = faiss.knn(queries, vectors, 15)  # nprobe = nlist: exact
    _, got = search(built, queries, 15, 8)
    assert np.array_equal(np.sort(got, 1), np.sort(ids[truth], 1))

    def json_lines(result):  # (Ray's log monitor may print worker lines into stdout too)
        assert result.exit_code == 0, result.output
        return [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]

    (out,) = json_lines(runner.invoke(main, ["index", "info", "--job", str(layout.root)]))
    assert out["merge"] == "ondisk" and out["ntotal"] == 180
    assert out["files_bytes"] >= (layer_dir / "index.ivfdata").stat().st_size
    np.save(tmp_path / "q.npy", vectors[[0, 100]])
    hits = json_lines(runner.invoke(main, ["index", "search", "--job", str(layout.root),
                                           "--layer", "conv_4_2", "-k", "2", str(tmp_path / "q.npy")]))
    assert [h["ids"][0] for h in hits] == ids[[0, 100]].tolist()
    assert [h["keys"][0] for h in hits] == ["00000000000", "00001000040"]

    from pipeline.runtime.job import run_job  # the empty shard passes the job's invariant
    summary = run_job(parse_job(raw), "verify")
    assert summary["verify"]["keys"] == 180 and summary["skipped"] == {"corrupt_image": 5}


@pytest.mark.slow
def test_resume_after_a_killed_populate_task(featured, tmp_path, monkeypatch):
    from pipeline.runtime import tasks
    from pipeline.runtime.job import run_job
    from pipeline.runtime.ray_runner import StageFailed

    _, layout, raw = _job_copy(featured, tmp_path)
    kills = tmp_path / "kills"
    real_populate = tasks.populate_task

    def killed_twice(layer, trained_path, feature_file, out_path, *args):
        """Shard 1's worker dies mid-write (a half-written temp file, then os._exit) twice."""
        if feature_file.endswith("00001.parquet") and len(kills.read_text() if kills.exists() else "") < 2:
            with open(kills, "a") as f:
                f.write("x")
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path + ".tmp").write_bytes(b"half an index")
            os._exit(1)
        return real_populate(layer, trained_path, feature_file, out_path, *args)

    monkeypatch.setattr(tasks, "populate_task", killed_twice)
    no_retry = parse_job({**raw, "runtime": {**raw["runtime"], "max_retries": 0}})
    with pytest.raises(StageFailed, match="index.populate: 1 of 4 unit"):
        run_job(no_retry, "index")
    parts = layout.index_dir("conv_4_2") / "parts"
    assert sorted(p.name for p in parts.glob("*.faiss")) == ["00000.faiss", "00002.faiss",
                                                             "00003.faiss"]
    assert not layout.merged_index("conv_4_2").exists()

    # resume: Ray retries the unit once more when its worker dies again; the done units stay done
    run_job(parse_job({**raw, "runtime": {**raw["runtime"], "max_retries": 1}}), "index")
    assert kills.read_text() == "xx"
    attempts = _attempts(layout, "index.populate")
    assert attempts == {"index.populate:conv_4_2/00000": 1, "index.populate:conv_4_2/00001": 2,
                        "index.populate:conv_4_2/00002": 1, "index.populate:conv_4_2/00003": 1}
    got = all_ids(load_index(layout.merged_index("conv_4_2")))
    _, ids = _parquet_vectors(layout, "conv_4_2")
    assert len(got) == len(np.unique(got)) == 180 and np.array_equal(np.sort(got), np.sort(ids))


@pytest.mark.slow
def test_a_feature_file_copied_over_another_is_refused(featured, tmp_path):
    job_yaml, layout, _ = _job_copy(featured, tmp_path)
    shutil.copyfile(layout.features_file(0), layout.features_file(2))
    result = CliRunner().invoke(main, ["index", "populate", str(job_yaml)])
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if "(knn-defense:" not in ln]  # Ray's log
    assert len(lines) == 1 and lines[0].startswith("error: stage index.populate: 1 of 4")
    assert f"{layout.features_file(2)}: holds 60 ids of shard 0 (e.g. id 0)" in lines[0]
    assert "delete the file and re-run the features stage" in lines[0]
