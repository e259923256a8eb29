"""IVF k-means on a GPU: the clustering index is built in the IVF's own dimension (behind a
PCA/OPQ pre-transform that is not the data's) and metric, only when this work's device is a GPU
and FAISS has GPU support, on that one GPU, and it is released after training. On a CPU
machine a CPU IndexFlat stands in for the GPU one; the last test runs with faiss-gpu on a GPU."""

import contextlib

import faiss
import numpy as np
import pytest

from pipeline import devices
from pipeline.index import faiss_index
from pipeline.index.faiss_index import (
    clustering_index_for,
    clustering_with,
    kmeans_gpu,
    num_gpus,
    search,
    train_index,
)


def _cpu_flat(d, metric):
    return faiss.IndexFlat(d, metric)


def _data(n=1000, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim)).astype(np.float32) * 3
    return (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture
def undecided_device():
    devices.set_current_device(None)
    yield
    devices.set_current_device(None)


FACTORIES = [  # (factory, metric, the IVF's dimension for 32-d data)
    ("IVF8,Flat", faiss.METRIC_L2, 32),
    ("PCA16,IVF8,Flat", faiss.METRIC_L2, 16),
    ("OPQ4_16,IVF8,PQ4x4", faiss.METRIC_L2, 16),
    ("OPQ4_16,IVF8,PQ4x4", faiss.METRIC_INNER_PRODUCT, 16),
    ("PCA16,IVF8,Flat", faiss.METRIC_INNER_PRODUCT, 16),
]


@pytest.mark.parametrize("factory,metric,ivf_dim", FACTORIES)
def test_the_clustering_index_has_the_ivfs_dimension_and_metric_and_trains(factory, metric, ivf_dim):
    x = _data()
    index = faiss.index_factory(x.shape[1], factory, metric)
    if factory.startswith("OPQ"):  # a few OPQ rotations are enough here (default 50)
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = 4
    ivf = faiss.extract_index_ivf(index)
    stand_in = clustering_index_for(ivf, _cpu_flat)
    assert (stand_in.d, stand_in.metric_type) == (ivf.d, ivf.metric_type) == (ivf_dim, metric)

    with clustering_with(ivf, _cpu_flat) as used:
        index.train(x)
        assert used.ntotal == ivf.nlist  # k-means assigned with it: it holds the centroids
    assert ivf.clustering_index is None  # no pointer kept to an index about to be freed
    assert index.is_trained and ivf.quantizer.ntotal == ivf.nlist
    index.add(x)
    _, ids = index.search(x[:5], 1)
    assert (ids >= 0).all()


def test_a_clustering_index_in_the_datas_dimension_fails_behind_a_pca():
    """What the old code did (IndexFlatL2(vectors.shape[1])): FAISS refuses it."""
    x = _data()
    index = faiss.index_factory(32, "PCA16,IVF8,Flat")
    ivf = faiss.extract_index_ivf(index)
    ivf.clustering_index = faiss.IndexFlatL2(32)
    with pytest.raises(RuntimeError, match="dimension"):
        index.train(x)
    ivf.clustering_index = None


@contextlib.contextmanager
def _recording_cpu_flat(calls, released):
    """Stands in for faiss_index._gpu_flat on a CPU machine: CPU flat indexes, calls recorded."""
    def make_flat(d, metric):
        calls.append((d, metric))
        return faiss.IndexFlat(d, metric)
    try:
        yield make_flat
    finally:
        released.append(True)


@pytest.mark.parametrize("factory,ivf_dim", [("PCA16,IVF8,Flat", 16), ("PCA16,IVF8,PQ4x4", 16),
                                             ("IVF8,Flat", 32)])
def test_train_index_on_a_gpu_builds_one_clustering_index_on_that_gpu(monkeypatch, factory, ivf_dim):
    x = _data()
    calls, released, devices_used = [], [], []

    def fake_gpu_flat(device):
        devices_used.append(device)
        return _recording_cpu_flat(calls, released)

    on_cpu = train_index(x, factory, seed=3)
    monkeypatch.setattr(faiss_index, "kmeans_gpu", lambda: 0)
    monkeypatch.setattr(faiss_index, "_gpu_flat", fake_gpu_flat)
    on_gpu = train_index(x, factory, seed=3)

    assert devices_used == [0] and calls == [(ivf_dim, faiss.METRIC_L2)] and released == [True]
    ivf = faiss.extract_index_ivf(on_gpu)
    assert ivf.clustering_index is None and on_gpu.is_trained
    # the same k-means (seed, data, flat assignment) as without a clustering index
    cpu_ivf = faiss.extract_index_ivf(on_cpu)
    np.testing.assert_allclose(ivf.quantizer.reconstruct_n(0, ivf.nlist),
                               cpu_ivf.quantizer.reconstruct_n(0, cpu_ivf.nlist), rtol=1e-5, atol=1e-5)


def test_binary_and_flat_factories_never_ask_for_a_gpu(monkeypatch):
    monkeypatch.setattr(faiss_index, "kmeans_gpu", lambda: pytest.fail("asked for a GPU"))
    train_index(_data(n=100), "Flat")
    train_index(np.zeros((100, 4), np.uint8), "BIVF4")


def test_kmeans_runs_on_the_gpu_only_when_the_work_has_one_and_faiss_can(monkeypatch, undecided_device):
    monkeypatch.setattr(faiss_index, "num_gpus", lambda: 0)
    monkeypatch.setattr(faiss_index, "current_device", lambda: pytest.fail("faiss-cpu: no probe"))
    assert kmeans_gpu() is None

    monkeypatch.setattr(faiss_index, "current_device", devices.current_device)
    monkeypatch.setattr(faiss_index, "num_gpus", lambda: 4)  # a node's GPUs all visible
    devices.set_current_device("cpu")  # Ray assigned this task none: stay off them
    assert kmeans_gpu() is None
    devices.set_current_device("cuda:0")  # the assigned one, ordinal 0 of the visible ones
    assert kmeans_gpu() == 0
    devices.set_current_device("cuda")
    assert kmeans_gpu() == 0

    monkeypatch.setattr(faiss_index, "num_gpus", lambda: 0)  # torch has a GPU, faiss-cpu none
    assert kmeans_gpu() is None


@pytest.mark.skipif(num_gpus() == 0, reason="needs faiss with GPU support and a GPU")
@pytest.mark.parametrize("factory", ["PCA16,IVF8,Flat", "OPQ4_16,IVF8,PQ4"])
def test_gpu_kmeans_for_real(factory, undecided_device):
    x = _data(n=5000)
    devices.set_current_device("cuda:0")
    assert kmeans_gpu() == 0
    for _ in range(3):  # repeated trainings: nothing left pointing at freed GPU indexes
        index = train_index(x, factory, seed=1)
        assert faiss.extract_index_ivf(index).clustering_index is None
    index.add(x)
    _, ids = search(index, x[:10], 1, nprobe=8)
    assert (ids[:, 0] >= 0).all()
