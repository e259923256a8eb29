"""The job end to end through Ray on a few hundred images, with a corrupt one among them."""

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.data.fashion_mnist import encode_image, write_split_shards
from pipeline.defense.classifier import DefendedClassifier
from pipeline.features.backbones import SmallResNet
from pipeline.features.extract import extract_shard, read_metadata
from pipeline.features.stack import LayerTransform
from pipeline.features.transforms import fit_pca
from pipeline.index.faiss_index import all_ids, load_index
from pipeline.layout import JobLayout
from pipeline.runtime.job import run_job
from pipeline.runtime.manifest import Manifest
from pipeline.store.softmax_store import SoftmaxStore
from tests.conftest import E2E_LAYERS as LAYERS
from tests.conftest import append_corrupt_sample, synthetic_images


def _parquet_rows(layout: JobLayout):
    tables = [pq.read_table(p, columns=["key", "id", "label"])
              for p in sorted(layout.features_dir.glob("*.parquet"))]
    keys = sum((t.column("key").to_pylist() for t in tables), [])
    ids = np.concatenate([t.column("id").to_numpy() for t in tables])
    return keys, ids


@pytest.mark.slow
def test_every_database_key_is_in_parquet_faiss_and_leveldb_exactly_once(finished_job):
    spec, layout, summary, (images, _) = finished_job
    keys, ids = _parquet_rows(layout)
    expected_keys = {f"{s:05d}{r:06d}" for s in range(4) for r in range(80 if s < 3 else 60)}
    assert len(keys) == len(set(keys)) == 300
    assert set(keys) == expected_keys
    assert len(np.unique(ids)) == 300
    for layer in LAYERS:
        got = all_ids(load_index(layout.merged_index(layer)))
        assert len(got) == 300 and np.array_equal(np.sort(got), np.sort(ids)), layer
    with SoftmaxStore(layout.store_dir, 2) as store:
        stored = np.fromiter(store.iter_ids(), np.int64)
    assert len(stored) == 300 and np.array_equal(np.sort(stored), np.sort(ids))
    assert summary["skipped"] == {"corrupt_image": 1}
    assert summary["written"] == 300 and summary["keys_read"] == 301
    assert summary["verify"]["keys"] == 300


@pytest.mark.slow
def test_parquet_shard_contract(finished_job):
    spec, layout, _, _ = finished_job
    table = pq.read_table(layout.features_file(1))
    assert table.schema.names == ["key", "id", "label"] + LAYERS + ["softmax"]
    assert str(table.schema.field("softmax").type) == "fixed_size_list<element: halffloat>[10]"
    assert str(table.schema.field("conv_4_2").type) == "fixed_size_list<element: halffloat>[8]"
    assert table.column("id").to_pylist()[:2] == [1 << 24, (1 << 24) + 1]
    softmax = np.stack(table.column("softmax").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.allclose(softmax.sum(1), 1, atol=1e-2)
    meta = read_metadata(layout.features_file(1))  # the file's key-value metadata
    assert meta["stats"]["skipped"] == {"corrupt_image": 1}
    assert set(meta["transform_sha256"]) == set(LAYERS) and len(meta["weights_sha256"]) == 64


@pytest.mark.slow
def test_evaluation_table_and_rerun_is_cached(finished_job):
    spec, layout, summary, _ = finished_job
    csv = (layout.eval_dir / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + 3 * (1 + len(LAYERS) * 3)  # clean, PGD, worst case
    md = (layout.eval_dir / "results.md").read_text()
    assert "no defense" in md and "kNN CBW-D" in md and "achieved normalised L2" in md
    assert (layout.eval_dir / "accuracy.png").stat().st_size > 1000
    attacks = (layout.eval_dir / "attacks.csv").read_text()
    assert "pgd-gray_box@0.06" in attacks
    before = Manifest(layout.manifest)
    attempts_before = before._db.execute("SELECT SUM(attempts), COUNT(*) FROM units").fetchone()
    before.close()
    run_job(spec)  # everything is done with the same fingerprints: nothing runs again
    after = Manifest(layout.manifest)
    assert after._db.execute("SELECT SUM(attempts), COUNT(*) FROM units").fetchone() == attempts_before
    after.close()


@pytest.mark.slow
def test_defended_classifier_and_cli_classify(finished_job, tmp_path):
    spec, layout, _, (images, labels) = finished_job
    defense = DefendedClassifier.from_job(layout.root, layer="conv_4_2", weighting="cbw_d")
    try:
        pred, scores, neigh = defense.predict(images[:20, ..., None], return_neighbours=True)
        assert pred.shape == (20,) and scores.shape == (20, 10)
        assert neigh.ids.shape == (20, 10) and neigh.found.all()
        # a database image's nearest neighbour is itself (distance ~0)
        assert np.mean(neigh.distances[:, 0] < 1e-3) > 0.9
        assert (pred == labels[:20]).mean() > 0.5
    finally:
        defense.store.close()
    png = tmp_path / "q.png"
    png.write_bytes(encode_image(images[0], "png"))
    result = CliRunner().invoke(main, ["classify", "--job", str(layout.root), str(png), "--neighbours"])
    assert result.exit_code == 0, result.output
    assert f"label={labels[0]}" in result.output and "id=" in result.output


def test_crash_mid_shard_leaves_no_output(tmp_path):
    images, labels = synthetic_images(100, seed=1)
    write_split_shards(images, labels, tmp_path / "db", "train", samples_per_shard=100)

    class Exploding(SmallResNet):
        calls = 0

        def forward_taps(self, x, taps=()):
            Exploding.calls += 1
            if Exploding.calls == 2:
                raise RuntimeError("simulated worker crash")
            return super().forward_taps(x, taps)

    model = Exploding().eval()
    transforms = {"conv_4_2": LayerTransform("avg", fit_pca(np.random.default_rng(0).normal(size=(50, 128)), 8))}
    out = tmp_path / "features" / "00000.parquet"
    with pytest.raises(RuntimeError, match="simulated"):
        with torch.inference_mode():
            extract_shard(model, transforms, str(tmp_path / "db" / "00000.tar"), 0, str(out),
                          layers=["conv_4_2"], batch_size=40,
                          decode={"channels": 1}, max_pixels=10**8, provenance={})
    assert not out.exists()
    assert not out.with_name(out.name + ".tmp").exists()


@pytest.mark.slow
def test_cli_index_info_and_search(finished_job, tmp_path):
    import json

    spec, layout, _, _ = finished_job
    result = CliRunner().invoke(main, ["index", "info", "--job", str(layout.root)])
    assert result.exit_code == 0, result.output
    infos = [json.loads(line) for line in result.output.splitlines()]
    assert [i["layer"] for i in infos] == LAYERS and all(i["ntotal"] == 300 for i in infos)
    table = pq.read_table(layout.features_file(2), columns=["key", "id", "conv_4_2"])
    queries = np.stack(table.column("conv_4_2").to_numpy(zero_copy_only=False)[:3]).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    result = CliRunner().invoke(main, ["index", "search", "--job", str(layout.root), "--layer",
                                       "conv_4_2", "-k", "3", str(tmp_path / "q.npy")])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.output.splitlines()]
    assert [h["keys"][0] for h in hits] == table.column("key").to_pylist()[:3]
    assert [h["ids"][0] for h in hits] == table.column("id").to_pylist()[:3]


@pytest.mark.slow
def test_compact_topk_store_keeps_decisions(finished_job):
    """Last in this file: rebuilds the shared job's store with the compact encoding."""
    spec, layout, _, (images, _) = finished_job
    full = DefendedClassifier.from_job(layout.root)
    _, by_layer = full.neighbours_all_layers(images[:60, ..., None])
    want = {rule: full.vote(by_layer["conv_4_2"], rule)[0] for rule in ("uw", "cbw_e", "cbw_d")}
    full.store.close()
    spec.store.encoding, spec.store.topk = "topk", 3  # 3 of 10 classes + residual: 22 bytes
    run_job(spec)  # store, verify and evaluate run again; features and index are reused
    compact = DefendedClassifier.from_job(layout.root)
    try:
        assert compact.stored_weights
        _, by_layer = compact.neighbours_all_layers(images[:60, ..., None])
        assert by_layer["conv_4_2"].weights.shape == (60, 10, 2)
        for rule, labels in want.items():
            agree = (compact.vote(by_layer["conv_4_2"], rule)[0] == labels).mean()
            assert agree >= 0.95, (rule, agree)
    finally:
        compact.store.close()
    value_sizes = {len(v) for v in __import__("plyvel").DB(str(layout.store_dir / "part-000")).iterator(include_key=False)}
    assert value_sizes == {13 + 3 * 3}


@pytest.mark.slow
def test_experiment_over_two_databases_with_white_box_attacks(finished_job, tmp_path):
    """`knn-defense evaluate EXPERIMENT.yaml`: the job's database plus an IG-100-All subset built
    by the same pipeline with the job's classifier; gray-box and adaptive attacks; tables, the
    database-size plot, and a resumed second run that recomputes nothing."""
    import yaml

    spec, layout, _, _ = finished_job
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    exp = {"name": "two-dbs", "output_dir": str(tmp_path / "exp"), "job": str(job_yaml),
           "databases": [{"subset": {"kind": "all", "size": 100}}],
           "evaluate": {"num_queries": 60, "k": 10, "ks": [1, 5], "cbw_d": {"m": 9},
                        "attacks": [{"name": "pgd", "steps": 2},
                                    {"name": "adaptive", "layers": ["conv_4_1"], "steps": 3, "k": 10}],
                        "attack_database": {"size": 100, "overlap": 0.8}}}
    exp_yaml = tmp_path / "exp.yaml"
    exp_yaml.write_text(yaml.safe_dump(exp))
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", str(exp_yaml), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "## Database e2e (300 images)" in result.output
    # 100 selected keys; a corrupt image among them would be skipped and counted, not indexed
    assert re.search(r"## Database IG-100-All \((100|99) images\)", result.output)
    out = tmp_path / "exp"
    rows = (out / "results.csv").read_text().splitlines()
    defenses = 1 + len(LAYERS) * 3 * 3  # none + layer x weighting x K
    assert len(rows) == 1 + 2 * 4 * defenses  # 2 databases x (clean, pgd, adaptive, worst case)
    for plot in ("accuracy.png", "acc_vs_k.png", "acc_vs_layer.png", "acc_vs_dbsize.png", "whitebox.png"):
        assert (out / plot).stat().st_size > 1000, plot
    variant = JobLayout(out / "databases" / "IG-100-All")
    model_info = __import__("json").loads(variant.model_info.read_text())
    assert model_info["sha256"] == __import__("json").loads(layout.model_info.read_text())["sha256"]
    again = runner.invoke(main, ["evaluate", str(exp_yaml), "--no-progress"])
    assert again.exit_code == 0 and "0 adversarial set(s) crafted, 0 cell(s)" in again.output


def test_shard_is_streamed_in_row_groups_with_the_same_content(tmp_path):
    """flush_rows bounds what a worker holds: a long shard is written in several row groups,
    ids numbered across them, and the file equals the one written in a single group."""
    images, labels = synthetic_images(100, seed=2)
    write_split_shards(images, labels, tmp_path / "db", "train", samples_per_shard=100)
    append_corrupt_sample(tmp_path / "db" / "00000.tar", "bad")
    torch.manual_seed(0)
    model = SmallResNet().eval()
    transforms = {"conv_4_2": LayerTransform("avg", fit_pca(np.random.default_rng(0).normal(size=(50, 128)), 8))}
    tables = {}
    for flush_rows in (24, 10**6):
        out = tmp_path / f"rows-{flush_rows}.parquet"
        result = extract_shard(model, transforms, str(tmp_path / "db" / "00000.tar"), 3,
                               str(out), layers=["conv_4_2"], batch_size=16,
                               decode={"channels": 1}, max_pixels=10**8, provenance={"p": 1},
                               flush_rows=flush_rows)
        assert result["written"] == 100 and result["skipped"] == {"corrupt_image": 1}
        tables[flush_rows] = pq.read_table(out)
        groups = pq.ParquetFile(out).metadata.num_row_groups
        assert groups == (4 if flush_rows == 24 else 1)  # 32, 32, 32, 4: pairs of 16-image batches
        meta = read_metadata(out)
        assert meta["p"] == 1 and meta["stats"]["skipped_keys"] == [["bad", "corrupt_image"]]
    streamed, whole = tables[24], tables[10**6]
    assert streamed.equals(whole)
    assert streamed.column("id").to_pylist() == [(3 << 24) + i for i in range(100)]


@pytest.mark.slow
def test_one_feature_recipe_recorded_and_mixed_recipes_refused(finished_job, tmp_path):
    """Every feature shard and index.json carry the same recipe; the query side runs it; a shard
    made by other arithmetic makes verify fail with one line naming it."""
    import json
    import shutil

    from pipeline.features.extract import META_KEY
    from pipeline.features.recipe import FeatureRecipe
    from pipeline.layout import read_json
    from pipeline.runtime.verify import VerifyFailed, verify_folder

    spec, layout, _, _ = finished_job
    files = sorted(layout.features_dir.glob("*.parquet"))
    recipes = {json.dumps(read_metadata(f)["recipe"], sort_keys=True) for f in files}
    assert len(recipes) == 1
    recipe = FeatureRecipe.from_dict(json.loads(recipes.pop()))
    assert (recipe.device, recipe.precision, recipe.decoder) == ("cpu", "fp32", "pil")
    for layer in LAYERS:
        assert read_json(layout.index_info(layer))["recipe"] == recipe.as_dict()
    defense = DefendedClassifier.from_job(layout.root)
    assert defense.recipe["differs"] == {} and defense.decoder == "pil"
    assert defense.model.feature_precision == "fp32"

    copy = tmp_path / "job"
    shutil.copytree(layout.root, copy)
    victim = copy / "features" / files[1].name
    mixed = read_metadata(victim)
    mixed["recipe"]["precision"] = "bf16"
    table = pq.read_table(victim)
    with pq.ParquetWriter(victim, table.schema) as writer:  # the same rows, another recipe
        writer.write_table(table)
        writer.add_key_value_metadata({META_KEY: json.dumps(mixed).encode()})
    with pytest.raises(VerifyFailed, match=rf"{victim.name}: made by feature recipe .*precision fp32 vs bf16"):
        verify_folder(str(copy))


@pytest.mark.slow
def test_default_layer_comes_from_the_evaluation_with_its_reason(finished_job):
    """The evaluate stage records the query side's default layer and why; serve/classify use
    it unless told otherwise, and say which layer answers and why."""
    import json

    from pipeline.serve.app import create_app

    spec, layout, _, (images, _) = finished_job
    choice = json.loads(layout.default_layer.read_text())
    assert choice["layer"] in LAYERS and choice["budget"] is not None
    assert set(choice["by_layer"]) == set(LAYERS) and "worst-case accuracy" in choice["reason"]
    defense = DefendedClassifier.from_job(layout.root)
    try:
        assert (defense.layer, defense.layer_reason) == (choice["layer"], choice["reason"])
        from fastapi.testclient import TestClient

        with TestClient(create_app(defense)) as client:
            info = client.get("/info").json()
        assert info["layer"] == choice["layer"] and info["layer_reason"] == choice["reason"]
    finally:
        defense.store.close()
    overridden = DefendedClassifier.from_job(layout.root, layer="conv_2_2")
    try:
        assert overridden.layer == "conv_2_2" and "chosen by the caller" in overridden.layer_reason
    finally:
        overridden.store.close()
    with pytest.raises(ValueError, match="layer 'conv_9_9': this defense has"):
        DefendedClassifier.from_job(layout.root, layer="conv_9_9")
