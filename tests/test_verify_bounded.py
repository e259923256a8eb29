"""Verify's units are bounded by one shard, hash bucket, index file or store partition: their
peak memory (tracemalloc, run in-process) does not grow from 8 to 64 shards of 20,000 keys,
each unit gets exactly one of them, and a key in two shards or an id missing from an index
part or the store is still found and named."""

from __future__ import annotations

import shutil
import time
import tracemalloc

import numpy as np
import pytest

from pipeline.features.extract import ShardWriter, read_column
from pipeline.ids import partition_of_shard
from pipeline.index.faiss_index import merge_parts, populate_part, train_index, write_index
from pipeline.layout import JobLayout, write_json
from pipeline.runtime import verify
from pipeline.runtime.verify import VerifyFailed, check_feature_shard, run_in_process, verify_job
from pipeline.store.softmax_store import write_partition

KEYS = 20_000
DIM = 4
CLASSES = 4
LAYER = "l"
PARTITIONS = 4


class _Codes:
    """The one thing ShardWriter asks of a layer's transform: its stored codes."""

    dim = DIM

    @staticmethod
    def encode(x):
        return np.asarray(x, np.float16)


def _write_shard(layout: JobLayout, shard_index: int, keys: list[str]) -> None:
    rng = np.random.default_rng(shard_index)
    writer = ShardWriter(layout.features_file(shard_index), shard_index, [LAYER], {LAYER: _Codes()},
                         CLASSES, flush_rows=8192)
    n = len(keys)
    writer.add(keys, [0] * n, {LAYER: rng.random((n, DIM), np.float32)},
               rng.dirichlet(np.ones(CLASSES), n).astype(np.float32))
    writer.close({"recipe": None, "stats": {"read": n, "decoded": n, "skipped": {},
                                            "skipped_keys": []}})


def _make_job(root, shards: int, keys: int = KEYS, *, drop_from_part: int | None = None,
              drop_from_store: int | None = None, duplicate: tuple[int, int] | None = None):
    """A job folder written by the stages' own writers: feature shards, index parts merged in
    memory, store partitions. ``drop_from_part``/``drop_from_store``: that shard's row 7 left
    out; ``duplicate``: (a, b): shard b's row 11 carries shard a's row 3 key."""
    layout = JobLayout(root)
    table = []
    for s in range(shards):
        names = [f"s{s:03d}-{i:06d}" for i in range(keys)]
        if duplicate is not None and s == duplicate[1]:
            names[11] = f"s{duplicate[0]:03d}-{3:06d}"
        _write_shard(layout, s, names)
        table.append({"shard_index": s, "url": f"synthetic://{s:05d}.tar", "num_keys": keys,
                      "num_samples": keys})
    files = [layout.features_file(s) for s in range(shards)]
    trained = layout.trained_index(LAYER)
    write_index(train_index(read_column(files[0], LAYER)[:4000], "IVF16,Flat"), trained)
    parts = []
    for s, f in enumerate(files):
        ids, x = read_column(f, "id"), read_column(f, LAYER)
        keep = np.ones(len(ids), bool)
        if s == drop_from_part:
            keep[7] = False
        parts.append(layout.index_part(LAYER, s))
        populate_part(trained, x[keep], ids[keep], parts[-1])
    merge_parts(trained, parts, layout.merged_index(LAYER))
    write_json(layout.index_info(LAYER), {"layout": "merged", "shards": None})
    for p in range(PARTITIONS):
        def rows(p=p):
            for s, f in enumerate(files):
                if partition_of_shard(s, PARTITIONS) == p:
                    ids, soft = read_column(f, "id"), read_column(f, "softmax")
                    keep = np.arange(len(ids)) != (7 if s == drop_from_store else -1)
                    yield ids[keep], soft[keep]
        write_partition(layout.store_dir, p, rows())
    return layout, table


class Recorder:
    """A run_stage running units in-process, every ``every``-th of a stage (and its last) under
    tracemalloc (it slows Python allocations several times; the units of a stage are alike):
    per stage the largest peak over those units, and the arguments every unit got."""

    def __init__(self, every: int = 1):
        self.every = every
        self.peaks: dict[str, int] = {}
        self.args: dict[str, list[tuple]] = {}

    def __call__(self, stage, units):
        for j, unit in enumerate(units):
            self.args.setdefault(stage, []).append(unit.args)
            if j % self.every and j != len(units) - 1:
                yield unit.name, unit.fn(*unit.args, **unit.kwargs)
                continue
            tracemalloc.start()
            try:
                result = unit.fn(*unit.args, **unit.kwargs)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.peaks[stage] = max(self.peaks.get(stage, 0), peak)
            yield unit.name, result


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    out = {}
    for shards in (8, 64):
        root = tmp_path_factory.mktemp(f"job{shards}")
        t = time.time()
        layout, table = _make_job(root, shards)
        made = time.time() - t
        rec = Recorder(every=shards // 8)  # 8 units of each stage traced
        t = time.time()
        patch = pytest.MonkeyPatch()
        patch.setattr(verify, "CHUNK", 4096)  # ids read at a time from a list or a partition
        try:
            result = verify_job(str(root), table, [LAYER], PARTITIONS, run_stage=rec,
                                bucket_keys=KEYS)  # buckets of ~one shard's keys
        finally:
            patch.undo()
        print(f"{shards} shards: written in {made:.1f}s, verified in {time.time() - t:.1f}s; "
              f"peaks (KiB) {({k: v // 1024 for k, v in rec.peaks.items()})}")
        assert result["keys"] == shards * KEYS
        assert not (root / "verify").exists()  # scratch files removed
        out[shards] = (rec, table)
        shutil.rmtree(root)
    return out


def test_each_unit_gets_one_shard_bucket_index_file_or_partition(peaks):
    rec, table = peaks[64]
    shard_args = rec.args["verify.shards"]
    assert sorted(a[1] for a in shard_args) == list(range(64))  # one shard index each
    assert all(isinstance(a[1], int) for a in shard_args)
    buckets = rec.args["verify.keys"]
    assert sorted(a[1] for a in buckets) == list(range(64)) and {a[2] for a in buckets} == {64}
    assert [a[0].endswith("index.faiss") for a in rec.args[f"verify.index.{LAYER}"]] == [True]
    assert sorted(a[1] for a in rec.args["verify.store"]) == list(range(PARTITIONS))
    assert "verify.diagnose" not in rec.args


def test_peak_memory_per_unit_does_not_grow_with_the_number_of_shards(peaks):
    small, large = peaks[8][0].peaks, peaks[64][0].peaks
    assert set(small) == set(large)
    for stage in small:  # 8x the keys, the same work per unit: within 25% + 64 KiB
        assert large[stage] <= 1.25 * small[stage] + 64 * 1024, (stage, small[stage], large[stage])


def test_a_key_in_two_shards_is_named(tmp_path):
    layout, table = _make_job(tmp_path, 6, 2000, duplicate=(1, 4))
    with pytest.raises(VerifyFailed, match=r"sample key 's001-000003' is in .*00001.parquet "
                                           r"\(id \d+ = shard 1 row 3\) and .*00004.parquet "
                                           r"\(id \d+ = shard 4 row 11\)"):
        verify_job(str(tmp_path), table, [LAYER], PARTITIONS, bucket_keys=1000)


def test_an_id_missing_from_an_index_part_is_named(tmp_path):
    layout, table = _make_job(tmp_path, 5, 2000, drop_from_part=3)
    with pytest.raises(VerifyFailed, match=r"index l: part .*parts/00003.faiss: 1 missing, 0 "
                                           r"unexpected, 0 duplicated ids of 2000 .*missing id "
                                           r"\d+ = shard 3 row 7, key 's003-000007'"):
        verify_job(str(tmp_path), table, [LAYER], PARTITIONS)
    # without the parts (not kept), the merged index's digest of shard 3 differs: diagnosed;
    # the index merged on disk (its lists mapped from index.ivfdata)
    parts = [layout.index_part(LAYER, s) for s in range(5)]
    merge_parts(layout.trained_index(LAYER), parts, layout.merged_index(LAYER), ondisk=True)
    shutil.rmtree(layout.index_dir(LAYER) / "parts")
    rec = Recorder()
    with pytest.raises(VerifyFailed, match=r"index l: .*index.faiss: 1 missing.*missing id \d+ = "
                                           r"shard 3 row 7, key 's003-000007'.*re-run the index"):
        verify_job(str(tmp_path), table, [LAYER], PARTITIONS, run_stage=rec)
    assert [a[1]["shard_index"] for a in rec.args["verify.diagnose"]] == [3]


def test_an_id_missing_from_the_store_is_named(tmp_path):
    _, table = _make_job(tmp_path, 5, 2000, drop_from_store=2)
    with pytest.raises(VerifyFailed, match=r"store: .*part-002: 1 missing.*shard 2 row 7, key "
                                           r"'s002-000007'.*re-run the store stage"):
        verify_job(str(tmp_path), table, [LAYER], PARTITIONS)


def test_a_shard_unit_alone_checks_its_file_and_spills_sorted_hashes(tmp_path):
    layout, table = _make_job(tmp_path, 2, 500)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    out = check_feature_shard(str(tmp_path), 1, table[1]["url"], 500, str(keys_dir), [LAYER])
    assert out["written"] == out["indexed"] == 500 and out["skipped"] == {}
    spilled = np.load(keys_dir / "00001.npy")
    assert len(spilled) == 500 and (np.diff(spilled["hash"].astype(np.float64)) >= 0).all()
    with pytest.raises(VerifyFailed, match=r"00001.parquet: read 500 keys \(shard table says 501\)"):
        check_feature_shard(str(tmp_path), 1, table[1]["url"], 501, str(keys_dir), [LAYER])
    assert list(run_in_process("x", [])) == []
