import struct

import numpy as np
import pytest

from pipeline.ids import make_ids
from pipeline.store.encodings_eval import decisions_agree
from pipeline.store.softmax_store import (
    ENCODING_FLOAT16,
    ENCODING_TOPK,
    SoftmaxStore,
    decode,
    decode_with_weights,
    encode,
    encode_float16,
    encode_many,
    value_version,
    write_partition,
)
from pipeline.weighting import diversity_weights, entropy_weights

C = 1000


def peaked_neighbours(n: int, k: int, num_classes: int = C, seed: int = 0, share: float = 0.5
                      ) -> np.ndarray:
    """[n, k, C] neighbour softmax sets: each neighbour peaks on the query's class with
    probability ``share``, else on a random class; temperature-scaled Gaussian logits, plus
    Dirichlet(alpha small) vectors for a quarter of the sets."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, num_classes, n)
    peak = np.where(rng.random((n, k)) < share, truth[:, None], rng.integers(0, num_classes, (n, k)))
    logits = rng.normal(size=(n, k, num_classes))
    logits[np.arange(n)[:, None], np.arange(k)[None], peak] += rng.uniform(2, 10, (n, k))
    z = logits / rng.choice([0.5, 1.0, 2.0], (n, 1, 1))
    e = np.exp(z - z.max(-1, keepdims=True))
    s = e / e.sum(-1, keepdims=True)
    for i in range(n // 4):
        alpha = np.full((k, num_classes), 0.01)
        alpha[np.arange(k), peak[i]] = 5.0
        s[i] = np.stack([rng.dirichlet(a) for a in alpha])
    return s.astype(np.float32)


def test_float16_layout_is_unchanged():
    s = np.random.default_rng(0).dirichlet(np.ones(C)).astype(np.float32)
    value = encode(s)
    assert value == encode_float16(s) == encode(s, "float16")
    assert len(value) == 3 + 2 * C
    assert value[:3] == struct.pack(">BH", 1, C) and value_version(value) == ENCODING_FLOAT16
    assert value[3:] == s.astype("<f2").tobytes()
    assert np.allclose(decode(value), s, atol=1e-3)


def test_topk_round_trip_size_and_header():
    s = peaked_neighbours(1, 1)[0, 0]
    value = encode(s, "topk")
    assert len(value) <= 64
    assert len(value) == 13 + 3 * 16
    assert value[:3] == struct.pack(">BH", 2, C) and value_version(value) == ENCODING_TOPK
    dense = decode(value)
    assert dense.shape == (C,) and dense.dtype == np.float32
    top = np.argsort(-s)[:16]
    assert np.allclose(dense[top], s[top], atol=1 / (2 ** 14 - 1))
    rest = np.setdiff1d(np.arange(C), top)
    assert np.allclose(dense[rest], (1 - s[top].sum()) / len(rest), rtol=2e-3, atol=1e-9)
    assert dense.sum() == pytest.approx(1.0, abs=2e-3)
    assert dense.argmax() == s.argmax()


@pytest.mark.parametrize("num_classes,k", [(10, 16), (10, 4), (2, 1), (65535, 17)])
def test_topk_small_and_large_class_counts(num_classes, k):
    s = np.random.default_rng(1).dirichlet(np.full(num_classes, 0.1)).astype(np.float32)
    value = encode(s, "topk", k=k)
    assert len(value) == 13 + 3 * min(k, num_classes)
    dense = decode(value)
    order = np.argsort(-s)[:k]
    qbits = 24 - max(1, (num_classes - 1).bit_length())
    assert np.allclose(dense[order], s[order], atol=1 / (2 ** qbits - 1))
    if k >= num_classes:
        assert np.allclose(dense, s, atol=1 / (2 ** qbits - 1))


def test_stored_weights_match_full_vector():
    s = peaked_neighbours(20, 10).reshape(-1, C)
    for m, p in ((20, 3.0), (5, 2.0)):
        values = encode_many(s, "topk", k=16, m=m, p=p)
        assert values == [encode(v, "topk", k=16, m=m, p=p) for v in s[:3]] + values[3:]
        got = np.array([decode_with_weights(v, m, p)[1:] for v in values])
        want_e, want_d = entropy_weights(s), diversity_weights(s, m, p)
        assert np.allclose(got[:, 0], want_e, rtol=1e-3, atol=1e-7)
        assert np.allclose(got[:, 1], want_d, rtol=1e-3, atol=1e-7)
    # float16 values compute their weights from the (rounded) vector, for any (m, p)
    v = encode(s[0])
    dense, w_e, w_d = decode_with_weights(v, 7, 2.0)
    assert w_e == pytest.approx(float(entropy_weights(dense)))
    assert w_d == pytest.approx(float(diversity_weights(dense, 7, 2.0)))


def test_cbw_d_parameter_mismatch_is_a_clear_error():
    s = peaked_neighbours(1, 1)[0, 0]
    value = encode(s, "topk", m=20, p=3.0)
    decode_with_weights(value, 20, 3.0)
    with pytest.raises(ValueError, match=r"m=20, p=3.0.*asked for m=10"):
        decode_with_weights(value, 10, 3.0)
    with pytest.raises(ValueError, match="asked for m=20, p=2.0"):
        decode_with_weights(value, 20, 2.0)
    # with C <= M the effective M is C - 1, so m=20 and m=9 mean the same weight for 10 classes
    small = encode(np.full(10, 0.1, np.float32), "topk", m=20)
    decode_with_weights(small, 9, 3.0)
    with pytest.raises(ValueError, match="float16"):
        encode(s, "topk", p=0.1)
    with pytest.raises(ValueError, match="unknown softmax encoding 'bf8'"):
        encode(s, "bf8")


def test_unknown_version_and_corrupt_values():
    with pytest.raises(ValueError, match="version 9; upgrade knn-defense"):
        decode(b"\x09\x00\x01\x00\x00")
    with pytest.raises(ValueError, match="upgrade knn-defense"):
        decode_with_weights(b"\x07\x03\xe8" + bytes(61))
    value = encode(np.full(C, 1 / C, np.float32), "topk")
    with pytest.raises(ValueError, match="corrupt topk"):
        decode(value[:-1])
    with pytest.raises(ValueError, match="truncated topk"):
        decode(value[:6])


def test_store_with_both_encodings_and_weights(tmp_path):
    rng = np.random.default_rng(0)
    ids = {i: make_ids(i, np.arange(30)) for i in range(2)}
    soft = {i: rng.dirichlet(np.full(C, 0.02), 30).astype(np.float32) for i in range(2)}
    # partition 0 (shard 0) in the old float16 format, partition 1 in topk: both readable
    write_partition(tmp_path, 0, iter([(ids[0], soft[0])]))
    assert write_partition(tmp_path, 1, iter([(ids[1], soft[1])]), encoding="topk", k=16) == 30
    with pytest.raises(ValueError, match="unknown softmax encoding"):
        write_partition(tmp_path / "x", 0, iter([]), encoding="nope")
    with SoftmaxStore(tmp_path, 2) as store:
        query = np.stack([ids[0][:4], ids[1][:4]])
        query[1, 3] = -1
        values, found = store.get_many(query)
        assert values.shape == (2, 4, C) and found.tolist() == [[True] * 4, [True] * 3 + [False]]
        assert np.allclose(values[0], soft[0][:4], atol=1e-3)
        assert (values[1].argmax(-1)[:3] == soft[1][:3].argmax(-1)).all()
        values2, found2, weights = store.get_many(query, with_weights=True)
        assert np.array_equal(values, values2) and np.array_equal(found, found2)
        assert weights.shape == (2, 4, 2)
        want = np.stack([entropy_weights(soft[i][:4]) for i in range(2)])
        assert np.allclose(weights[..., 0][found], want[found], rtol=2e-3)
        want_d = np.stack([diversity_weights(soft[i][:4]) for i in range(2)])
        assert np.allclose(weights[..., 1][found], want_d[found], rtol=2e-3, atol=1e-6)
        assert (weights[1, 3] == 0).all()
        with pytest.raises(ValueError, match="asked for m=5"):
            store.get_many(ids[1][:2], with_weights=True, m=5)
        store.get_many(ids[0][:2], with_weights=True, m=5)  # float16: any (m, p)


def test_decisions_agree_on_peaked_1000_class_neighbour_sets():
    s = peaked_neighbours(200, 50, seed=3)
    result = decisions_agree(s, "topk", k=16)
    assert result["bytes_per_value"] <= 64
    for rule in ("uw", "cbw_e", "cbw_d"):
        assert result[rule] >= 0.99, result
    full = decisions_agree(s[:20], "float16")
    assert full["bytes_per_value"] == 3 + 2 * C
    assert all(full[r] == 1.0 for r in ("uw", "cbw_e", "cbw_d"))
