import math

import numpy as np
import pytest
import torch

from pipeline.features.rmac import (
    Whitening,
    fit_rmac_whitening,
    load_whitening,
    region_max_pool,
    rmac,
    rmac_region_vectors,
    rmac_regions,
    save_whitening,
)

SIZES = [(7, 7), (7, 10), (14, 9)]


def slow_rmac(fmap: np.ndarray, regions, whitening: Whitening | None, eps=1e-6) -> np.ndarray:
    """R-MAC straight from the definition: python loops over images, regions, channels, cells."""
    n_img, n_ch = fmap.shape[:2]
    out = []
    for n in range(n_img):
        total = None
        for y, x, h, w in regions:
            v = np.empty(n_ch, np.float64)
            for c in range(n_ch):
                m = -np.inf
                for i in range(y, y + h):
                    for j in range(x, x + w):
                        m = max(m, float(fmap[n, c, i, j]))
                v[c] = m
            v = v / (np.linalg.norm(v) + eps)
            if whitening is not None:
                v = whitening.projection.astype(np.float64) @ (v - whitening.mean)
                v = v / (np.linalg.norm(v) + eps)
            total = v if total is None else total + v
        out.append(total / (np.linalg.norm(total) + eps))
    return np.stack(out)


def cirtorch_rmac(x, L=3, eps=1e-6):
    """Transcription of cnnimageretrieval-pytorch's cirtorch.layers.functional.rmac (the reference
    implementation; unnormalised sum of the global and regional L2-normalised MACs)."""
    ovr = 0.4
    steps = torch.Tensor([2, 3, 4, 5, 6, 7])
    W, H = x.size(3), x.size(2)
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w**2 - w * b) / w**2) - ovr), 0)
    Wd = Hd = 0
    if H < W:
        Wd = idx.item() + 1
    elif H > W:
        Hd = idx.item() + 1
    v = torch.nn.functional.max_pool2d(x, (x.size(-2), x.size(-1)))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps).expand_as(v)
    count = 1
    for level in range(1, L + 1):
        wl = math.floor(2 * w / (level + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if level + Wd == 1 else (W - wl) / (level + Wd - 1)
        cenW = torch.floor(wl2 + torch.Tensor(range(level - 1 + Wd + 1)) * b) - wl2
        b = 0 if level + Hd == 1 else (H - wl) / (level + Hd - 1)
        cenH = torch.floor(wl2 + torch.Tensor(range(level - 1 + Hd + 1)) * b) - wl2
        for i_ in cenH.tolist():
            for j_ in cenW.tolist():
                if wl == 0:
                    continue
                R = x[:, :, int(i_):int(i_) + wl, int(j_):int(j_) + wl]
                vt = torch.nn.functional.max_pool2d(R, (R.size(-2), R.size(-1)))
                vt = vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps).expand_as(vt)
                v = v + vt
                count += 1
    return v.flatten(1), count


def random_whitening(c: int, d: int, seed: int) -> Whitening:
    rng = np.random.default_rng(seed)
    return Whitening(rng.normal(0, 0.1, c).astype(np.float32),
                     rng.normal(0, 1, (d, c)).astype(np.float32))


def test_region_counts_match_reference():
    # Standard implementation (cirtorch, L=3, ovr=0.4): full map + levels of 1, 4, 9 regions for
    # a square 7x7 map (15 regions); for 7x10 the long side gets one extra region: 1 + 2 + 6 + 12.
    assert len(rmac_regions(7, 7)) == 15
    assert len(rmac_regions(7, 10)) == 21
    assert len(rmac_regions(7, 7, full_map=False)) == 14
    for h, w in SIZES + [(3, 5), (20, 13), (1, 1), (2, 9)]:
        _, count = cirtorch_rmac(torch.zeros(1, 1, h, w))
        assert len(rmac_regions(h, w)) == count, (h, w)


@pytest.mark.parametrize("h,w", SIZES + [(3, 5), (20, 13), (9, 30)])
def test_region_grid_properties(h, w):
    regions = rmac_regions(h, w)
    assert regions[0] == (0, 0, h, w)
    for y, x, rh, rw in regions[1:]:
        assert rh == rw >= 1 and 0 <= y and 0 <= x and y + rh <= h and x + rw <= w
    sizes = sorted({r[2] for r in regions[1:]}, reverse=True)
    assert sizes == [2 * min(h, w) // (lv + 1) for lv in (1, 2, 3)]  # 3 levels
    # each level spans the map edge to edge, uniformly (the reference grid need not cover every
    # cell at level 3 of tiny maps, e.g. 3x5); level 1 covers the whole map
    for s in sizes:
        level = [r for r in regions[1:] if r[2] == s]
        ys, xs = sorted({r[0] for r in level}), sorted({r[1] for r in level})
        assert ys[0] == xs[0] == 0 and ys[-1] + s == h and xs[-1] + s == w
        assert len(level) == len(ys) * len(xs)
        for starts in (ys, xs):
            steps = np.diff(starts)
            assert len(steps) == 0 or steps.max() - steps.min() <= 1
    cover = np.zeros((h, w), bool)
    for y, x, rh, rw in regions[1:]:
        if rh == sizes[0]:
            cover[y:y + rh, x:x + rw] = True
    assert cover.all()


def test_overlap_near_target_non_square():
    # 7x16: level-1 regions are 7x7 along a 16-long side; 3 regions give overlap 1 - 4.5/7 = 0.357,
    # the closest to 0.4 among 2..7 regions (2: -0.29, 4: 0.57).
    regions = rmac_regions(7, 16)
    level1 = [r for r in regions[1:] if r[2] == 7]
    assert len(level1) == 3
    xs = [r[1] for r in level1]
    overlaps = [1 - (b - a) / 7 for a, b in zip(xs, xs[1:], strict=False)]
    assert all(abs(o - 0.4) < 0.15 for o in overlaps), overlaps
    # 7x10: two level-1 regions overlapping by 4/7 (best achievable; 3 regions would give 0.79)
    level1 = [r for r in rmac_regions(7, 10)[1:] if r[2] == 7]
    assert [r[1] for r in level1] == [0, 3]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("whiten", [False, True])
def test_rmac_matches_slow_reference(h, w, whiten):
    rng = np.random.default_rng(h * 100 + w)
    c = 12
    fmap = rng.normal(0, 1, (2, c, h, w)).astype(np.float32)
    regions = rmac_regions(h, w)
    wh = random_whitening(c, 8, seed=1) if whiten else None
    got = rmac(torch.from_numpy(fmap), regions, wh).numpy()
    want = slow_rmac(fmap, regions, wh)
    assert got.shape == (2, 8 if whiten else c)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("h,w", SIZES + [(9, 14), (5, 5)])
def test_rmac_matches_cirtorch(h, w):
    x = torch.randn(3, 16, h, w, generator=torch.Generator().manual_seed(h + w))
    ref, _ = cirtorch_rmac(x)
    ref = ref / ref.norm(dim=1, keepdim=True)
    torch.testing.assert_close(rmac(x), ref, atol=1e-5, rtol=0)


def test_region_max_pool_shape_and_values():
    x = torch.randn(2, 5, 7, 10)
    regions = rmac_regions(7, 10)
    v = region_max_pool(x, regions)
    assert v.shape == (2, len(regions), 5)
    y, x0, rh, rw = regions[5]
    torch.testing.assert_close(v[:, 5], x[:, :, y:y + rh, x0:x0 + rw].flatten(2).max(-1).values)
    with pytest.raises(ValueError, match="not inside"):
        region_max_pool(x, [(0, 0, 8, 8)])


def test_region_vectors_normalised():
    x = torch.randn(3, 6, 7, 7)
    v = rmac_region_vectors(x)
    assert v.shape == (3 * 15, 6) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)


def test_whitening_identity_covariance():
    rng = np.random.default_rng(0)
    c = 32
    mix = rng.normal(0, 1, (c, c)) * np.linspace(3, 0.1, c)  # strongly anisotropic
    fmap = torch.from_numpy((rng.normal(0, 1, (60, 7, 7, c)) @ mix).transpose(0, 3, 1, 2)
                            .astype(np.float32))
    sample = rmac_region_vectors(fmap)
    wh = fit_rmac_whitening(sample, 16)
    assert wh.projection.shape == (16, c) and wh.mean.shape == (c,)
    z = wh.apply(sample)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(16), atol=1e-3)
    # torch path agrees with numpy path
    np.testing.assert_allclose(wh.apply_torch(torch.from_numpy(sample)).numpy(), z, atol=1e-4)
    out = rmac(fmap[:4], None, wh)
    assert out.shape == (4, 16)


def test_save_load_round_trip_and_hash(tmp_path, monkeypatch):
    wh = random_whitening(10, 4, seed=3)
    h1 = save_whitening(wh, tmp_path / "w.npz")
    monkeypatch.setattr("time.time", lambda: 2e9)  # a different clock must not change the bytes
    h2 = save_whitening(wh, tmp_path / "sub" / "w2.npz")
    assert h1 == h2 and len(h1) == 64
    back = load_whitening(tmp_path / "w.npz")
    np.testing.assert_array_equal(back.mean, wh.mean)
    np.testing.assert_array_equal(back.projection, wh.projection)
    assert save_whitening(back, tmp_path / "w3.npz") == h1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "w.npz", "w3.npz"]  # no temps
    other = random_whitening(10, 4, seed=4)
    assert save_whitening(other, tmp_path / "w4.npz") != h1


def test_gradient_flows():
    x = torch.randn(2, 8, 7, 10, requires_grad=True)
    wh = random_whitening(8, 6, seed=0)
    target = torch.randn(2, 6)
    loss = ((rmac(x, None, wh) - target) ** 2).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
