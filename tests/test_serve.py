import asyncio
import base64
import io
import threading
import time
import types

import faiss
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pipeline import __version__
from pipeline.defense.classifier import DefendedClassifier
from pipeline.features.backbones import SmallResNet, images_to_tensor
from pipeline.features.extract import forward_features
from pipeline.features.stack import LayerTransform
from pipeline.features.transforms import fit_pca
from pipeline.ids import make_ids
from pipeline.serve.app import create_app
from pipeline.store.softmax_store import SoftmaxStore, write_partition
from tests.conftest import synthetic_images

LAYERS = ["conv_3_1", "conv_4_1"]


@pytest.fixture(scope="module")
def defense(tmp_path_factory):
    """A tiny DefendedClassifier: random-init SmallResNet, PCA-8, flat FAISS, 2-partition store."""
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16, 16), blocks=(1, 1, 1)).eval()
    images, _ = synthetic_images(160, seed=7)
    pooled, softmax = forward_features(model, images_to_tensor(images[..., None]), LAYERS)
    transforms = {name: LayerTransform("avg", fit_pca(pooled[name], 8)) for name in LAYERS}
    feats = {name: transforms[name].query_vectors(v) for name, v in pooled.items()}
    ids = np.concatenate([make_ids(0, np.arange(80)), make_ids(1, np.arange(80))])
    indexes = {}
    for name in LAYERS:
        index = faiss.IndexIDMap2(faiss.IndexFlatL2(8))
        index.add_with_ids(feats[name], ids)
        indexes[name] = index
    store_dir = tmp_path_factory.mktemp("store")
    write_partition(store_dir, 0, iter([(ids[:80], softmax[:80])]))
    write_partition(store_dir, 1, iter([(ids[80:], softmax[80:])]), encoding="topk", k=4)
    store = SoftmaxStore(store_dir, 2)
    yield DefendedClassifier(model, transforms, indexes, store, layer="conv_4_1",
                             weighting="cbw_d", k=10, batch_size=64)
    store.close()


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def queries():
    images, _ = synthetic_images(16, seed=11)
    return images


def expected(defense, images, layer="conv_4_1", weighting="cbw_d", k=10):
    probs, by_layer = defense.neighbours_all_layers(images[..., None], [layer], k=k)
    labels, scores = defense.vote(by_layer[layer], weighting)
    return labels, scores, by_layer[layer], probs


def check_results(body, defense, images, layer="conv_4_1", weighting="cbw_d", k=10,
                  neighbours=False):
    labels, scores, neigh, probs = expected(defense, images, layer, weighting, k)
    assert (body["layer"], body["weighting"], body["k"]) == (layer, weighting, k)
    assert len(body["results"]) == len(images)
    for j, r in enumerate(body["results"]):
        assert r["label"] == labels[j]
        assert r["undefended_label"] == probs[j].argmax()
        assert len(r["scores"]) == 5
        got = [s["score"] for s in r["scores"]]
        assert got == sorted(got, reverse=True) and r["scores"][0]["class"] == labels[j]
        assert np.allclose(got, np.sort(scores[j])[::-1][:5], atol=1e-5)
        if neighbours:
            assert r["neighbours"]["ids"] == neigh.ids[j].tolist()
            assert np.allclose(r["neighbours"]["distances"], neigh.distances[j], rtol=1e-4)
        else:
            assert "neighbours" not in r


def test_classify_multipart_several_images_with_neighbours(defense, queries):
    client = TestClient(create_app(defense))
    files = [("images", (f"q{i}.png", png(im), "image/png")) for i, im in enumerate(queries[:3])]
    r = client.post("/classify", params={"neighbours": "true"}, files=files)
    assert r.status_code == 200, r.text
    check_results(r.json(), defense, queries[:3], neighbours=True)
    # parameters as form fields work too
    r = client.post("/classify", files=files[:1], data={"weighting": "uw", "k": "5"})
    assert r.status_code == 200, r.text
    check_results(r.json(), defense, queries[:1], weighting="uw", k=5)


def test_classify_base64_json_with_parameters(defense, queries):
    client = TestClient(create_app(defense))
    payload = {"images": [b64(png(im)) for im in queries[:4]], "layer": "conv_3_1",
               "weighting": "cbw_e", "k": 7}
    r = client.post("/classify", json=payload)
    assert r.status_code == 200, r.text
    check_results(r.json(), defense, queries[:4], "conv_3_1", "cbw_e", 7)
    # data URL prefix, query parameters, neighbours flag as JSON bool
    payload = {"images": ["data:image/png;base64," + b64(png(queries[0]))], "neighbours": True}
    r = client.post("/classify?weighting=uw", json=payload)
    assert r.status_code == 200, r.text
    check_results(r.json(), defense, queries[:1], weighting="uw", neighbours=True)


def test_colour_and_larger_images_are_converted(defense):
    client = TestClient(create_app(defense))
    rgb = np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    r = client.post("/classify", json={"images": [b64(buf.getvalue())]})
    assert r.status_code == 200, r.text
    assert 0 <= r.json()["results"][0]["label"] < 10


def test_healthz_and_info(defense):
    client = TestClient(create_app(defense, max_images_per_request=9))
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"ok": True, "store_loaded": True,
                        "indexes": {"conv_3_1": 160, "conv_4_1": 160}}
    info = client.get("/info").json()
    assert info["version"] == __version__
    assert info["layers"] == LAYERS and info["layer"] == "conv_4_1"
    assert info["k"] == 10 and info["weighting"] == "cbw_d" and info["num_classes"] == 10
    assert info["index_sizes"] == {"conv_3_1": 160, "conv_4_1": 160}
    assert info["input"] == {"size": 28, "channels": 1, "resize": 28, "interpolation": "bicubic"}
    assert info["limits"]["max_images_per_request"] == 9
    assert info["cbw_d"] == {"m": 20, "p": 3.0}


def assert_4xx(r, status, text):
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and text in detail, detail


def test_body_size_limits(defense, queries):
    client = TestClient(create_app(defense, max_request_bytes=4000))
    big = {"images": [b64(png(queries[0]))] * 20}
    assert_4xx(client.post("/classify", json=big), 413, "4000-byte limit")

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(10):
            yield b"x" * 1000

    r = client.post("/classify", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_4xx(r, 413, "4000-byte limit")
    files = [("images", ("a.png", b"\0" * 5000, "image/png"))]
    assert_4xx(client.post("/classify", files=files), 413, "4000-byte limit")
    # a small request still works on the same app
    assert client.post("/classify", json={"images": [b64(png(queries[0]))]}).status_code == 200


def test_image_count_and_pixel_limits(defense, queries):
    client = TestClient(create_app(defense, max_images_per_request=3, max_image_pixels=28 * 28))
    payload = {"images": [b64(png(im)) for im in queries[:4]]}
    assert_4xx(client.post("/classify", json=payload), 413, "limit is 3")
    files = [("images", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(queries[:4])]
    assert_4xx(client.post("/classify", files=files), 413, "limit is 3")
    files = [("images", (f"{i}.png", png(queries[0]), "image/png")) for i in range(40)]
    assert_4xx(client.post("/classify", files=files), 413, "max_images_per_request")
    large = png(np.zeros((29, 28), np.uint8))
    assert_4xx(client.post("/classify", json={"images": [b64(png(queries[0])), b64(large)]}),
               413, "images[1]: too many pixels")


def test_bad_images(defense, queries):
    client = TestClient(create_app(defense))
    good = png(queries[0])
    files = [("images", ("x.png", b"hello, not an image", "image/png"))]
    assert_4xx(client.post("/classify", files=files), 415, "images[0]: not an image")
    truncated = good[: len(good) // 2]
    assert_4xx(client.post("/classify", json={"images": [b64(good), b64(truncated)]}),
               422, "images[1]: corrupt")
    broken = bytearray(good)
    broken[60:80] = b"\xff" * 20  # inside IDAT: bad CRC / zlib data
    assert_4xx(client.post("/classify", json={"images": [b64(bytes(broken))]}), 422, "corrupt")
    assert_4xx(client.post("/classify", json={"images": [""]}), 422, "empty image")
    assert_4xx(client.post("/classify", json={"images": ["not base64!!"]}), 400,
               "images[0]: malformed base64")
    assert_4xx(client.post("/classify", json={"images": [b64(good)[:-3]]}), 400, "malformed base64")


def test_bad_requests_and_parameters(defense, queries):
    client = TestClient(create_app(defense, max_k=50))
    one = {"images": [b64(png(queries[0]))]}
    assert_4xx(client.post("/classify", json={"images": []}), 422, "no images")
    assert_4xx(client.post("/classify", files=[("other", ("a.png", png(queries[0]), "image/png"))]),
               422, "no images")
    assert_4xx(client.post("/classify", json=one, params={"weighting": "max"}), 422,
               "unknown weighting 'max'")
    assert_4xx(client.post("/classify", json={**one, "layer": "conv_9_9"}), 422, "unknown layer")
    for k in ("abc", "0", "-3", "51", "2.5"):
        assert_4xx(client.post("/classify", json=one, params={"k": k}), 422, "k must be")
    for k in (0, 51, 2.5, True, "x"):
        assert_4xx(client.post("/classify", json={**one, "k": k}), 422, "k must be")
    assert_4xx(client.post("/classify", json=one, params={"neighbours": "maybe"}), 422,
               "neighbours must be a boolean")
    assert_4xx(client.post("/classify", json={**one, "k": 5}, params={"k": 6}), 422, "given twice")
    assert_4xx(client.post("/classify", content=b"{not json",
                           headers={"content-type": "application/json"}), 400, "malformed JSON")
    assert_4xx(client.post("/classify", json=[1, 2]), 422, "JSON body must be an object")
    assert_4xx(client.post("/classify", json={"images": [1]}), 422, "list of base64 strings")
    assert_4xx(client.post("/classify", content=b"abc", headers={"content-type": "text/plain"}),
               415, "unsupported content type")
    assert client.post("/classify", json=one, params={"k": "50"}).status_code == 200


def test_concurrent_requests_are_batched(defense, queries):
    app = create_app(defense, batch_window_ms=200, max_batch=64)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            requests = []
            for i in range(16):
                weighting = "uw" if i % 2 else "cbw_d"
                requests.append(client.post("/classify", params={"weighting": weighting},
                                            json={"images": [b64(png(queries[i]))]}))
            return await asyncio.gather(*requests)

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for i, r in enumerate(responses):
        check_results(r.json(), defense, queries[i:i + 1], weighting="uw" if i % 2 else "cbw_d")
    stats = app.state.batcher.stats()
    assert stats["requests_run"] == 16 and stats["images_run"] == 16
    assert 2 <= stats["batches_run"] < 16  # merged, but never across weightings


def test_max_batch_splits_batches(defense, queries):
    app = create_app(defense, batch_window_ms=500, max_batch=4)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            start = time.monotonic()
            rs = await asyncio.gather(*(client.post("/classify", json={"images": [b64(png(im))]})
                                        for im in queries[:12]))
            return rs, time.monotonic() - start

    responses, elapsed = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    assert app.state.batcher.stats()["batches_run"] == 3  # full batches run without waiting
    assert elapsed < 5


def test_real_uvicorn_server_on_loopback(defense, queries):
    import uvicorn

    config = uvicorn.Config(create_app(defense), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/healthz").json()["ok"] is True
            files = [("images", ("q.png", png(queries[0]), "image/png"))]
            r = client.post("/classify", files=files)
            assert r.status_code == 200, r.text
            check_results(r.json(), defense, queries[:1])
            big = client.post("/classify", content=b"x" * (33 << 20),
                              headers={"content-type": "application/json"})
            assert big.status_code == 413
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_loads_the_job_and_binds_loopback(defense, monkeypatch):
    import uvicorn

    closed, seen = [], {}
    fake = types.SimpleNamespace(**vars(defense))
    fake.store = types.SimpleNamespace(close=lambda: closed.append(True), _dbs=[1])
    monkeypatch.setattr(DefendedClassifier, "from_job",
                        classmethod(lambda cls, job_dir, **kw: seen.setdefault("job", job_dir)
                                    and fake))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    from pipeline.serve import serve

    serve("some/job", max_batch=8)
    assert seen["job"] == "some/job" and seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert seen["app"].state.limits["max_batch"] == 8 and closed == [True]
