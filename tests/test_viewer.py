"""The neighbour viewer's endpoints over a finished job: explain, images by id, the query list,
the attack control (one at a time, capped, timed out, never blocking /classify) and tokens."""

import io
import shutil
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.cli import main
from pipeline.data.fashion_mnist import encode_image
from pipeline.defense.classifier import DefendedClassifier
from pipeline.serve.access import AccessError, resolve_token
from pipeline.serve.app import create_app

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def viewer_job(finished_job, tmp_path_factory):
    """A copy of the session's job (its own LevelDB lock), and one of its database images."""
    _, layout, _, (images, labels) = finished_job
    root = tmp_path_factory.mktemp("viewer") / "job"
    shutil.copytree(layout.root, root)
    return root, images, labels


@pytest.fixture(scope="module")
def defense(viewer_job):
    defense = DefendedClassifier.from_job(viewer_job[0], layer="conv_4_2")
    yield defense
    defense.close()


def client_for(defense, job_dir, **kwargs) -> TestClient:
    return TestClient(create_app(defense, job_dir=job_dir, attack_database_size=64, **kwargs))


def test_page_and_its_files_are_served(defense, viewer_job):
    with client_for(defense, viewer_job[0]) as client:
        page = client.get("/")
        assert page.status_code == 200 and "neighbour viewer" in page.text
        # one self-contained response: the script and styles inlined, nothing from elsewhere
        assert "function render()" in page.text and "--accent" in page.text
        assert "src=" not in page.text.split("<script>")[0] and "https://" not in page.text
        info = client.get("/viewer-info").json()
        assert info["attacks"] == ["pgd", "adaptive"] and info["queries"] is True
        assert info["class_names"][3] == "dress"  # from the shards' JSON metadata


def test_explain_shows_every_layer_and_rule_and_neighbours_by_id(defense, viewer_job):
    _, images, labels = viewer_job
    with client_for(defense, viewer_job[0]) as client:
        body = client.post("/explain", files={"images": ("q.png", encode_image(images[0], "png"))},
                           data={"k": "7"}).json()
        assert body["k"] == 7 and set(body["layers"]) == set(defense.layers)
        layer = body["layers"]["conv_4_2"]
        assert set(layer["predictions"]) == {"uw", "cbw_e", "cbw_d"}
        first = layer["neighbours"][0]
        assert len(layer["neighbours"]) == 7 and first["distance"] < 1e-3  # itself
        assert first["key"] == defense.keys_of([first["id"]])[0]
        thumb = client.get(f"/image/{first['id']}?size=64")
        assert thumb.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumb.content))), images[0])
        assert client.get("/image/123456789").status_code == 404
        assert "no shard" in client.get(f"/image/{99 << 24}").json()["detail"]
        assert client.get(f"/image/{first['id']}?size=5").status_code == 422
        bad = client.post("/explain", files={"images": ("x.png", b"not an image")})
        assert bad.status_code == 415 and "images[0]" in bad.json()["detail"]


def test_query_split_is_paged_and_fetched_by_key(defense, viewer_job):
    with client_for(defense, viewer_job[0], queries_per_page=40) as client:
        pages = [client.get(f"/queries?page={p}").json() for p in range(3)]
        assert [p["total"] for p in pages] == [90] * 3 and pages[0]["pages"] == 3
        keys = [q["key"] for p in pages for q in p["queries"]]
        assert len(keys) == len(set(keys)) == 90
        assert client.get("/queries?page=3").status_code == 422
        image = client.get(f"/query-image/{keys[5]}")
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (28, 28)
        assert client.get("/query-image/no-such-key").status_code == 404


def _attack(client, image, **fields):
    return client.post("/attack", files={"images": ("q.png", encode_image(image, "png"))},
                       data={k: str(v) for k, v in fields.items()})


def test_attack_runs_within_its_caps(defense, viewer_job):
    _, images, labels = viewer_job
    with client_for(defense, viewer_job[0]) as client:
        for method in ("pgd", "adaptive"):
            body = _attack(client, images[1], method=method, budget=0.3, steps=5,
                           label=int(labels[1])).json()
            assert body["method"] == method and 0 < body["achieved"] <= 0.3 + 0.01
            assert body["images"]["adversarial"].startswith("data:image/png;base64,")
            for side in ("clean", "adversarial"):
                assert set(body[side]["layers"]) == set(defense.layers)
        assert _attack(client, images[1], budget=2).status_code == 422
        assert _attack(client, images[1], steps=1000).status_code == 422
        assert _attack(client, images[1], method="cw").status_code == 422
    with client_for(defense, viewer_job[0], attack_timeout_s=0.0) as client:
        slow = _attack(client, images[1], steps=5)
        assert slow.status_code == 504 and "--attack-timeout-s" in slow.json()["detail"]


def test_one_attack_at_a_time_and_classify_keeps_answering(defense, viewer_job):
    _, images, _ = viewer_job
    app = create_app(defense, job_dir=viewer_job[0])
    started, release = threading.Event(), threading.Event()

    def held(image, *args):  # an attack that runs until the test lets it finish
        started.set()
        release.wait(30)
        return image

    app.state.attacker.run = held
    with TestClient(app) as client:
        first = {}
        thread = threading.Thread(target=lambda: first.update(r=_attack(client, images[2])))
        thread.start()
        assert started.wait(30)
        busy = _attack(client, images[2])
        assert busy.status_code == 429 and "already running" in busy.json()["detail"]
        t = time.monotonic()
        ok = client.post("/classify", files={"images": ("q.png", encode_image(images[3], "png"))})
        assert ok.status_code == 200 and time.monotonic() - t < 20
        release.set()
        thread.join(30)
        assert first["r"].status_code == 200


def test_token_guards_everything_but_healthz(defense, viewer_job):
    _, images, _ = viewer_job
    png = encode_image(images[0], "png")
    with client_for(defense, viewer_job[0], token=TOKEN) as client:
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}):
            assert client.post("/classify", files={"images": ("q.png", png)},
                               headers=headers).status_code == 401
            assert client.get("/image/0", headers=headers).status_code == 401
            assert client.get("/queries", headers=headers).status_code == 401
            assert client.get("/", headers=headers).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post("/classify", files={"images": ("q.png", png)},
                           headers=good).status_code == 200
        assert client.get("/image/0", headers=good).status_code == 200
        assert client.get(f"/queries?token={TOKEN}").status_code == 200  # the page's own links
        assert client.get(f"/?token={TOKEN}").status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/queries?token=%E2%82%AC").status_code == 401  # not a 500
        assert client.get(f"/image/{1 << 70}?token={TOKEN}").status_code == 404


def test_public_bind_needs_a_token(tmp_path, monkeypatch, viewer_job):
    monkeypatch.delenv("KNN_DEFENSE_SERVE_TOKEN", raising=False)
    assert resolve_token("127.0.0.1") is None and resolve_token("localhost") is None
    with pytest.raises(AccessError, match="--host 0.0.0.0 would expose"):
        resolve_token("0.0.0.0")
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(AccessError, match="at least 16"):
        resolve_token("0.0.0.0", short)
    monkeypatch.setenv("KNN_DEFENSE_SERVE_TOKEN", TOKEN)
    assert resolve_token("0.0.0.0") == TOKEN
    monkeypatch.delenv("KNN_DEFENSE_SERVE_TOKEN")
    result = CliRunner().invoke(main, ["serve", "--job", str(viewer_job[0]), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "give a token with --token-file" in result.output
