"""A living database through the CLI: add a shard, remove images (also killed mid-journal and
re-run), compact; verify holds after each, and `knn-defense run` has nothing left to do."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.fashion_mnist import encode_image
from pipeline.defense.classifier import DefendedClassifier
from pipeline.index.faiss_index import all_ids, load_index, read_index
from pipeline.jobfolder import read_generations
from pipeline.layout import JobLayout
from pipeline.runtime.job import run_job
from pipeline.runtime.verify import verify_folder
from tests.conftest import synthetic_images

NEW = 40


def _copy(finished_job, tmp_path, name="job"):
    spec, layout, _, data = finished_job
    root = tmp_path / name
    shutil.copytree(layout.root, root)
    return spec.model_copy(update={"output_dir": str(root)}), JobLayout(root), data


def _new_shard(folder, seed=21):
    """A shard of NEW images with keys of their own (new-0000, ...)."""
    images, labels = synthetic_images(NEW, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(NEW):
            sink.write({"__key__": f"new-{i:04d}", "png": encode_image(images[i], "png"),
                        "cls": int(labels[i])})
    return path, images


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _neighbour_ids(job, images, layer="conv_4_2", k=10):
    defense = DefendedClassifier.from_job(job, layer=layer)
    try:
        _, _, neigh = defense.predict(images[..., None], return_neighbours=True)
        return neigh.ids, neigh.distances, defense
    finally:
        defense.close()


def test_add_a_shard_then_run_has_nothing_to_do(finished_job, tmp_path):
    spec, layout, (images, _) = _copy(finished_job, tmp_path)
    shard, new_images = _new_shard(tmp_path / "new")
    code, out = _cli("add", layout.root, shard, "--no-progress")
    assert code == 0, out
    assert "generation 1: 1 shard(s), 40 images" in out and "verify ok, 340 keys" in out
    for again in (shard, os.path.relpath(shard)):  # a shard is added once, by any path
        code, out = _cli("add", layout.root, again, "--no-progress")
        assert code == 2 and out.count("\n") == 1 and "already in the database" in out
    code, out = _cli("status", layout.root)
    assert "generation 1: added 1 shard(s), 40 images (own index and store files)" in out
    # the new images are found: each one's nearest neighbour is itself, by key
    ids, dists, defense = _neighbour_ids(layout.root, new_images[:5])
    assert (dists[:, 0] < 1e-3).all()
    assert defense.keys_of(ids[:, 0]) == [f"new-{i:04d}" for i in range(5)]
    png = tmp_path / "q.png"
    png.write_bytes(encode_image(new_images[3], "png"))
    code, out = _cli("classify", "--job", layout.root, png, "--neighbours")
    assert code == 0 and "key=new-0003" in out, out
    # ... and by id, through the viewer's lookup
    img = Image.open(io.BytesIO(DefendedClassifier.from_job(layout.root).image(ids[3, 0])))
    assert np.array_equal(np.asarray(img), new_images[3])
    # the job's own stages, fingerprints and shard table are untouched
    summary = run_job(spec, progress=False)
    assert all(r["done"] == 0 for r in summary["stages"].values()), summary["stages"]
    assert verify_folder(str(layout.root))["keys"] == 300 + NEW


def _removal_keys(layout, path, extra=()):
    keys = pq.read_table(layout.features_file(1), columns=["key"]).column("key").to_pylist()[:3]
    path.write_text("\n".join([*keys, *extra, "no-such-key", ""]))
    return keys


def test_remove_takes_images_out_of_every_index_and_the_store(finished_job, tmp_path):
    spec, layout, (images, _) = _copy(finished_job, tmp_path)
    keys = _removal_keys(layout, tmp_path / "keys.txt")
    table = pq.read_table(layout.features_file(1), columns=["key", "id"]).to_pydict()
    gone = [i for k, i in zip(table["key"], table["id"], strict=True) if k in keys]
    code, out = _cli("remove", layout.root, "--keys", tmp_path / "keys.txt")
    assert code == 0, out
    assert "3 of 4 keys removed, 0 already removed, 1 unknown (e.g. no-such-key)" in out
    for layer in spec.features.layers:
        assert not np.isin(gone, all_ids(load_index(layout.merged_index(layer)))).any()
    defense = DefendedClassifier.from_job(layout.root)
    try:
        with pytest.raises(KeyError):
            defense.store.get_many(np.asarray(gone[:1]))
        # the removed images' own pixels no longer find them
        rows = [int(i) & 0xFFFFFF for i in gone]
        first = 80  # shard 1 starts at row 80 of the fixture's images
        _, _, neigh = defense.predict(images[[first + r for r in rows], ..., None],
                                      return_neighbours=True)
        assert not np.isin(neigh.ids, gone).any()
    finally:
        defense.close()
    assert verify_folder(str(layout.root))["keys"] == 297
    # idempotent: the same list again removes nothing more
    code, out = _cli("remove", layout.root, "--keys", tmp_path / "keys.txt")
    assert code == 0 and "0 of 4 keys removed, 3 already removed" in out, out
    assert read_generations(layout)["generation"] == 2


def _state(layout, spec) -> dict:
    """What a removal leaves: the removed table, every index file's ids, the store's ids."""
    from pipeline.store.softmax_store import SoftmaxStore

    ids = {layer: np.sort(all_ids(read_index(layout.merged_index(layer)))).tolist()
           for layer in spec.features.layers}
    with SoftmaxStore(layout.store_dir, spec.store.partitions) as store:
        stored = sorted(store.iter_ids())
    return {"removed": pq.read_table(layout.removed_table).to_pydict(), "index": ids,
            "store": stored}


def test_remove_killed_at_a_journal_step_then_rerun_equals_an_uninterrupted_one(finished_job, tmp_path):
    spec, killed, _ = _copy(finished_job, tmp_path, "killed")
    _, clean, _ = _copy(finished_job, tmp_path, "clean")
    keys_file = tmp_path / "keys.txt"
    _removal_keys(killed, keys_file)
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "remove"]
    step = "index:index/conv_3_2/index.faiss"
    env = {**os.environ, "KNN_DEFENSE_KILL_AFTER_STEP": step}
    first = subprocess.run([*command, str(killed.root), "--keys", str(keys_file)], env=env,
                           capture_output=True, text=True)
    assert first.returncode == -9, first.stderr
    assert read_generations(killed)["generation"] == 0  # not published: readers see no change
    done = subprocess.run([*command, str(killed.root), "--keys", str(keys_file)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    CliRunner().invoke(main, ["remove", str(clean.root), "--keys", str(keys_file)])
    (folder,) = (killed.root / "changes").glob("*-remove")
    steps = [json.loads(line)["step"] for line in (folder / "journal.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)) and step in steps and steps[-1] == "finished"
    assert _state(killed, spec) == _state(clean, spec)
    verify_folder(str(killed.root))


def test_compact_folds_generations_and_tombstones(finished_job, tmp_path):
    spec, layout, (images, _) = _copy(finished_job, tmp_path)
    # on-disk lists: read-only, so a removal leaves tombstones that searches must skip
    ondisk = spec.model_copy(update={"index": spec.index.model_copy(update={"merge": "ondisk"})})
    run_job(ondisk, until="index", progress=False)
    shard, new_images = _new_shard(tmp_path / "new")
    assert _cli("add", layout.root, shard, "--no-progress")[0] == 0
    keys = _removal_keys(layout, tmp_path / "keys.txt", extra=["new-0001"])
    code, out = _cli("remove", layout.root, "--keys", tmp_path / "keys.txt")
    assert code == 0 and "4 of 5 keys removed" in out and "skip them until" in out, out
    removed = pq.read_table(layout.removed_table).column("id").to_numpy()
    ids, dists, _ = _neighbour_ids(layout.root, np.concatenate([images[80:90], new_images[:4]]))
    assert not np.isin(ids, removed).any()  # tombstones skipped inside the search
    verify_folder(str(layout.root))
    code, out = _cli("compact", layout.root)
    assert code == 0 and "1 added generation(s) folded" in out, out
    gens = read_generations(layout)
    assert gens["added"] == [] and [g["generation"] for g in gens["compacted"]] == [1]
    assert not list(layout.store_dir.glob("gen-*")) and not list(layout.index_dir("conv_4_2").glob("gen-*"))
    for layer in spec.features.layers:  # the rewritten lists no longer hold removed ids
        assert not np.isin(removed, all_ids(load_index(layout.merged_index(layer)))).any()
    after, after_d, _ = _neighbour_ids(layout.root, np.concatenate([images[80:90], new_images[:4]]))
    assert np.array_equal(after, ids) and np.allclose(after_d, dists)
    assert verify_folder(str(layout.root))["keys"] == 300 + NEW - len(keys) - 1
    from pipeline.jobfolder import tombstones

    assert tombstones(layout, spec.features.layers) is None  # retired by the rewrite
    assert _cli("compact", layout.root)[1].startswith("compact: generation")


def test_add_and_remove_while_serving(finished_job, tmp_path):
    """serve follows the database's generations: it polls generation.json and swaps the new
    one in between batches, so requests during the reloads all get a 200 from the old or the
    new generation; the removal's store deletions, deferred to serve (it holds the store),
    are applied by it."""
    import threading
    import time

    from fastapi.testclient import TestClient

    from pipeline.jobfolder import pending_store_deletions
    from pipeline.serve.app import create_app

    spec, layout, (images, _) = _copy(finished_job, tmp_path)
    shard, new_images = _new_shard(tmp_path / "new")
    keys = _removal_keys(layout, tmp_path / "keys.txt")
    table = pq.read_table(layout.features_file(1), columns=["key", "id"]).to_pydict()
    gone = [i for k, i in zip(table["key"], table["id"], strict=True) if k in keys]
    defense = DefendedClassifier.from_job(layout.root, layer="conv_4_2")
    png = encode_image(new_images[3], "png")
    answers, stop = [], threading.Event()

    def wait_for_generation(client, g):
        deadline = time.monotonic() + 60
        while client.get("/info").json()["generation"] != g:
            assert time.monotonic() < deadline, f"serve never reached generation {g}"
            time.sleep(0.1)

    with TestClient(create_app(defense, job_dir=layout.root, reload_interval_s=0.2)) as client:
        def hammer():
            while not stop.is_set():
                r = client.post("/classify?neighbours=true", files={"images": ("q.png", png)})
                answers.append((r.status_code, r.json().get("generation"),
                                r.json()["results"][0]["neighbours"]["keys"][0]
                                if r.status_code == 200 else r.text))

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        code, out = _cli("add", layout.root, shard, "--no-progress")
        assert code == 0 and "verify skipped: a running serve holds the store" in out, out
        wait_for_generation(client, 1)
        code, out = _cli("remove", layout.root, "--keys", tmp_path / "keys.txt")
        assert code == 0 and "it deletes 3 of them on its next reload" in out, out
        wait_for_generation(client, 2)
        stop.set()
        for t in threads:
            t.join()
        body = client.post("/classify?neighbours=true", files={"images": ("q.png", png)}).json()
        assert body["generation"] == 2 and body["results"][0]["neighbours"]["keys"][0] == "new-0003"
    defense.close()
    assert answers and all(code == 200 for code, _, _ in answers), answers[:3]
    # generation 0 could not know the new image; generation 1 and 2 find it first
    assert {g for _, g, _ in answers} >= {0, 2}
    assert all(top == "new-0003" for _, g, top in answers if g >= 1)
    assert pending_store_deletions(layout) == []
    assert verify_folder(str(layout.root))["keys"] == 300 + NEW - 3
    with pytest.raises(KeyError):
        DefendedClassifier.from_job(layout.root).store.get_many(np.asarray(gone[:1]))
