import numpy as np
import pytest

from pipeline.ids import make_ids, partition, split_ids
from pipeline.index.faiss_index import (
    all_ids,
    load_index,
    merge_parts,
    populate_part,
    search,
    train_index,
    write_index,
)
from pipeline.runtime.manifest import Manifest
from pipeline.store.softmax_store import (
    SoftmaxStore,
    decode,
    encode_float16,
    partition_dir,
    write_partition,
)


def test_ids_round_trip_and_partition_by_shard():
    ids = make_ids(5, [0, 1, (1 << 24) - 1])
    assert ids.tolist() == [5 << 24, (5 << 24) + 1, (6 << 24) - 1]
    shard, row = split_ids(ids)
    assert shard.tolist() == [5, 5, 5] and row.tolist() == [0, 1, (1 << 24) - 1]
    assert partition(ids, 4).tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        make_ids(0, [1 << 24])
    assert (make_ids((1 << 39) - 1, [7]) > 0).all()  # the largest shard index stays positive


def test_softmax_encoding_round_trip():
    s = np.random.default_rng(0).dirichlet(np.ones(1000)).astype(np.float32)
    value = encode_float16(s)
    assert len(value) == 3 + 2000
    assert np.allclose(decode(value), s, atol=1e-3)
    with pytest.raises(ValueError, match="encoding version"):
        decode(b"\x09\x00\x01\x00\x00")


def test_store_partitions_multiget_and_atomic_write(tmp_path):
    rng = np.random.default_rng(0)
    shards = {i: (make_ids(i, np.arange(50)), rng.dirichlet(np.ones(10), 50)) for i in range(4)}
    for p in range(2):
        chunks = [shards[i] for i in shards if i % 2 == p]
        assert write_partition(tmp_path, p, iter(chunks)) == 100
        assert not partition_dir(tmp_path, p).with_name(f"part-{p:03d}.tmp").exists()
    with SoftmaxStore(tmp_path, 2) as store:
        query = np.stack([shards[3][0][:5], shards[0][0][:5]])
        query[1, 4] = -1
        values, found = store.get_many(query)
        assert values.shape == (2, 5, 10)
        assert np.allclose(values[0], shards[3][1][:5], atol=1e-3)
        assert found.tolist() == [[True] * 5, [True] * 4 + [False]]
        assert np.all(values[1, 4] == 0)
        with pytest.raises(KeyError, match="not in softmax store"):
            store.get_many(np.array([make_ids(9, [0])[0]]))
        assert sorted(store.iter_ids()) == sorted(np.concatenate([v[0] for v in shards.values()]).tolist())


def test_store_write_failure_leaves_no_partition(tmp_path):
    def broken():
        yield make_ids(0, [0, 1]), np.ones((2, 3)) / 3
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        write_partition(tmp_path, 0, broken())
    assert not partition_dir(tmp_path, 0).exists()


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,SQ8"])
def test_index_train_populate_merge_keeps_every_id_once(tmp_path, factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 16)).astype(np.float32)
    write_index(train_index(x, factory), tmp_path / "trained.faiss")
    parts = []
    for shard in range(3):
        rows = slice(shard * 400, (shard + 1) * 400)
        parts.append(tmp_path / f"{shard}.faiss")
        assert populate_part(tmp_path / "trained.faiss", x[rows], make_ids(shard, np.arange(400)), parts[-1]) == 400
    assert merge_parts(tmp_path / "trained.faiss", parts, tmp_path / "index.faiss") == 1200
    index = load_index(tmp_path / "index.faiss", nprobe=16)
    expected = np.concatenate([make_ids(s, np.arange(400)) for s in range(3)])
    got = all_ids(index)
    assert len(got) == 1200 and set(got.tolist()) == set(expected.tolist())
    _, ids = search(index, x[[0, 500, 1100]], 1)
    assert ids[:, 0].tolist() == [make_ids(0, [0])[0], make_ids(1, [100])[0], make_ids(2, [300])[0]]


def test_index_needs_enough_training_vectors():
    with pytest.raises(ValueError, match="at least 64 training vectors"):
        train_index(np.zeros((10, 4), np.float32), "IVF64,Flat")


def test_manifest_done_only_with_same_fingerprint(tmp_path):
    m = Manifest(tmp_path / "m.sqlite")
    m.mark_running("features", ["00000", "00001"], "fp1")
    m.mark_done("features", "00000", {"written": 3})
    m.mark_failed("features", "00001", "Traceback...\nOSError: disk full")
    assert m.done_units("features", "fp1") == {"00000"}
    assert m.done_units("features", "fp2") == set()
    assert m.counts("features") == {"done": 1, "failed": 1}
    assert m.failures() == [("features", "00001", "Traceback...\nOSError: disk full")]
    m.mark_running("features", ["00001"], "fp1")
    m.mark_done("features", "00001")
    assert m.done_units("features", "fp1") == {"00000", "00001"}
    attempts = dict(m._db.execute("SELECT unit, attempts FROM units").fetchall())
    assert attempts == {"00000": 1, "00001": 2}
    m.close()
