"""The evaluation harness: every attack and setting through the grid (budget/box checked on the
saved sets), worst case, black-box vs gray-box, determinism, resume, experiment files, CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.attacks.knn_aware import make_feature_fn
from pipeline.attacks.projection import normalised_l2
from pipeline.cli import main
from pipeline.config import ConfigError, EvaluateSpec
from pipeline.data.fashion_mnist import write_split_shards
from pipeline.evaluate import experiment as exp_mod
from pipeline.evaluate.experiment import Database, ExperimentSpec, load_experiment, run_grid
from pipeline.evaluate.grid import NONE, worst_case_rows
from pipeline.evaluate.suite import AttackContext, AttackDatabase, plan_sets
from pipeline.features.backbones import images_to_tensor, pool
from pipeline.features.transforms import fit_pca
from tests.conftest import synthetic_images, train_tiny_model

LAYER = "conv_4_1"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(n, seed):
    images, labels = synthetic_images(n, seed)
    return images[..., None], labels


@pytest.fixture(scope="module")
def toy():
    """Target and (differently seeded and shaped) surrogate band models, a kNN attack database
    of 300 images' PCA features, and 40 saturated query images (clipping meets projection)."""
    torch.manual_seed(0)
    images, labels = _batch(512, 3)
    x, y = images_to_tensor(images), torch.as_tensor(labels)
    target = train_tiny_model(x, y)
    torch.manual_seed(1)
    surrogate = train_tiny_model(x[:256], y[:256], epochs=2)
    db_images, _ = _batch(300, 11)
    x_db = images_to_tensor(db_images)
    with torch.no_grad():
        logits, taps = target.forward_taps(x_db, [LAYER])
    pca = fit_pca(pool(taps[LAYER], "avg").numpy(), 16)
    feature_fn = make_feature_fn(target, LAYER, pca.mean, pca.components)
    with torch.no_grad():
        db = AttackDatabase({LAYER: feature_fn(x_db)}, logits.softmax(1), logits.argmax(1), 300)
    q_images, q_labels = _batch(40, 7)
    q_images = np.where(q_images < 40, 0, np.where(q_images > 180, 255, q_images)).astype(np.uint8)
    return {"target": target, "surrogate": surrogate, "feature_fn": feature_fn, "db": db,
            "queries": {"keys": [str(i) for i in range(40)], "images": q_images,
                        "labels": q_labels, "skipped": {}}}


ALL_ATTACKS = [
    {"name": "fgsm", "budget": [0.05, 0.1]},
    {"name": "ifgsm", "steps": 4, "budget": 0.1},
    {"name": "pgd", "steps": 5, "budget": [0.05, 0.1]},
    {"name": "cw", "steps": 15, "binary_steps": 2, "lr": 0.05, "budget": [0.05, 0.1]},
    {"name": "fgsm", "threat": "black_box", "budget": 0.1},
    {"name": "pgd", "threat": "black_box", "steps": 5, "budget": 0.1},
    {"name": "pgd_pr", "layers": [LAYER], "steps": 4, "k": 10, "budget": 0.1},
    {"name": "pgd_fs", "layers": [LAYER], "steps": 4, "m": 5, "budget": 0.1},
    {"name": "adaptive", "layers": [LAYER], "steps": 6, "k": 10, "budget": 0.1},
    {"name": "min_norm", "layers": [LAYER], "steps": 10, "k": 10, "budget": [0.05, 0.1]},
]


def _spec(attacks=None, **extra) -> EvaluateSpec:
    return EvaluateSpec.model_validate({
        "num_queries": None, "attacks": attacks or ALL_ATTACKS, "cbw_d": {"m": 9},
        "surrogate": {"model": {"arch": "small_resnet"}}, **extra})


def _ctx(toy) -> AttackContext:
    return AttackContext(toy["target"], 0, feature_fn=lambda layer: toy["feature_fn"],
                         surrogate_builder=lambda: toy["surrogate"],
                         attack_db_builder=lambda: toy["db"], cbw_d=(9, 3.0))


def _grid(toy, out, ev, ctx=None):
    db = Database("undefended", 0, None, "fp")
    return run_grid(out, ev, toy["queries"], ctx or _ctx(toy), [db], [], "ctx", progress=False)


@pytest.fixture(scope="module")
def full_grid(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    return out, _grid(toy, out, _spec())


def test_plan_has_one_set_per_attack_budget_and_layer():
    sets = plan_sets(_spec().attacks, ["a", "b"])
    labels = [s.label for s in sets]
    assert len(labels) == len(set(labels)) == 2 + 1 + 2 + 2 + 1 + 1 + 3 + 2
    assert "pgd_pr-white_box[conv_4_1]@0.1" in labels and "cw-gray_box@0.05" in labels
    spec = EvaluateSpec.model_validate({"attacks": [{"name": "adaptive"}]})
    assert [s.layer for s in plan_sets(spec.attacks, ["a", "b"])] == ["a", "b"]


def test_every_attack_and_setting_keeps_budget_and_box_checked_on_the_saved_sets(toy, full_grid):
    out, result = full_grid
    x = images_to_tensor(toy["queries"]["images"])
    assert len(result["attacks"]) == 14
    for stats in result["attacks"]:
        saved = next(p for p in (out / "sets").iterdir() if p.name.startswith(stats["condition"] + "-"))
        x_adv = torch.from_numpy(np.load(saved)["x"])
        achieved = normalised_l2(x_adv, x)
        assert (achieved <= stats["budget"] * (1 + 1e-4)).all(), stats["condition"]
        assert ((x_adv >= 0) & (x_adv <= 1)).all(), stats["condition"]
        assert stats["within_budget"] and stats["pixels_in_range"]
        assert stats["achieved_l2_max"] == pytest.approx(float(achieved.max()), rel=1e-5)
        if stats["attack"] in ("pgd", "fgsm"):  # these use their whole budget
            assert stats["budget_used"] > 0.95, stats["condition"]
    cw = [s for s in result["attacks"] if s["attack"] == "cw"]
    assert all(0 <= s["cw_under_budget_rate"] <= s["cw_success_rate"] <= 1 for s in cw)
    assert cw[0]["cw_under_budget_rate"] <= cw[1]["cw_under_budget_rate"]  # 0.05 then 0.1
    min_norm = [s for s in result["attacks"] if s["attack"] == "min_norm"]
    assert [s["budget"] for s in min_norm] == [0.05, 0.1]
    assert 0 <= min_norm[0]["min_norm_under_budget_rate"] <= min_norm[1]["min_norm_under_budget_rate"]
    assert min_norm[1]["min_norm_under_budget_rate"] <= min_norm[1]["min_norm_success_rate"] <= 1
    black = [s for s in result["attacks"] if s["threat"] == "black_box"]
    assert all(0 <= s["transfer_rate"] <= 1 and "surrogate_error_rate" in s for s in black)


def _acc(rows, condition):
    return next(r["accuracy"] for r in rows if r["condition"] == condition and r["layer"] == "none")


def test_adversarial_accuracy_is_at_most_clean_and_black_box_is_not_stronger(full_grid):
    _, result = full_grid
    rows = result["rows"]
    clean = _acc(rows, "clean")
    for cond in {r["condition"] for r in rows if r["threat"] == "gray_box"}:
        assert _acc(rows, cond) <= clean, cond
    assert _acc(rows, "pgd-black_box@0.1") >= _acc(rows, "pgd-gray_box@0.1")
    assert _acc(rows, "fgsm-black_box@0.1") >= _acc(rows, "fgsm-gray_box@0.1")
    assert _acc(rows, "pgd-gray_box@0.1") <= _acc(rows, "pgd-gray_box@0.05")


def test_worst_case_is_the_per_image_intersection(full_grid):
    out, result = full_grid
    rows = result["rows"]
    worst = _acc(rows, "worst-case@0.1")
    at_budget = [r for r in rows if r["budget"] == 0.1 and r["attack"] != "worst-case"
                 and r["layer"] == "none"]
    assert worst <= min(r["accuracy"] for r in at_budget)
    labels = next((out / "cells" / "undefended").glob("clean-*.npz"))
    labels = np.load(labels)["labels"]
    robust = {0.05: np.ones(len(labels), bool), 0.1: np.ones(len(labels), bool)}
    for path in (out / "cells" / "undefended").glob("*.npz"):
        correct = np.load(path)["preds"][0] == labels
        for budget in robust:  # a set within 0.05 is within 0.1 too
            if path.name.startswith("clean-") or float(path.name.split("@")[1].split("-")[0]) <= budget:
                robust[budget] &= correct
    assert worst == pytest.approx(robust[0.1].mean())
    assert _acc(rows, "worst-case@0.05") == pytest.approx(robust[0.05].mean())
    assert robust[0.05].mean() >= worst


def test_worst_case_rows_by_hand():
    labels = np.array([0, 1, 2, 3])
    clean = np.array([[0, 1, 2, 0]])  # image 3 already wrong
    attacked = {0.06: [np.array([[0, 1, 0, 3]]), np.array([[0, 0, 2, 3]])]}
    (row,) = worst_case_rows({"database": "d", "db_size": 4}, clean, attacked, [NONE], labels)
    assert row["correct"] == 1 and row["attacks_in_worst_case"] == 2 and row["condition"] == "worst-case@0.06"


def test_sets_are_deterministic_under_a_seed(toy, tmp_path):
    attacks = [{"name": "pgd", "steps": 3, "budget": 0.1, "random_start": True},
               {"name": "adaptive", "layers": [LAYER], "steps": 3, "k": 10, "budget": 0.1,
                "random_start": True}]
    ev = _spec(attacks)
    _grid(toy, tmp_path / "a", ev)
    _grid(toy, tmp_path / "b", ev)
    for path in (tmp_path / "a" / "sets").glob("*.npz"):
        assert np.array_equal(np.load(path)["x"], np.load(tmp_path / "b" / "sets" / path.name)["x"])


def test_harness_resumes_without_recomputing_written_cells(toy, tmp_path, monkeypatch):
    ev = _spec([{"name": "fgsm", "budget": 0.1}, {"name": "pgd", "steps": 2, "budget": 0.1}])
    first = _grid(toy, tmp_path, ev)
    assert first["sets_crafted"] == 2 and first["cells_evaluated"] == 3
    (next((tmp_path / "cells" / "undefended").glob("pgd-*.npz"))).unlink()  # as if killed there

    def no_crafting(*args, **kwargs):
        raise AssertionError("a written set was crafted again")

    monkeypatch.setattr("pipeline.evaluate.experiment.craft", no_crafting)
    second = _grid(toy, tmp_path, ev)
    assert second["sets_crafted"] == 0 and second["cells_evaluated"] == 1
    assert second["rows"] == first["rows"]
    # a changed attack setting is a new set, not a stale reuse
    monkeypatch.undo()
    third = _grid(toy, tmp_path, _spec([{"name": "pgd", "steps": 3, "budget": 0.1}]))
    assert third["sets_crafted"] == 1
    assert third["cells_evaluated"] == 1  # the new set's predictions, not its predecessor's


def test_evaluate_spec_and_experiment_validation(tmp_path):
    with pytest.raises(ValueError, match="surrogate"):
        EvaluateSpec.model_validate({"attacks": [{"name": "pgd", "threat": "black_box"}]})
    with pytest.raises(ValueError, match="white_box|threat"):
        EvaluateSpec.model_validate({"attacks": [{"name": "pgd_pr", "threat": "gray_box"}]})
    with pytest.raises(ValueError, match="exactly one"):
        ExperimentSpec.model_validate({"name": "x"})
    with pytest.raises(ValueError, match="need a kNN defense"):
        ExperimentSpec.model_validate({"name": "x", "model": {"arch": "small_resnet"},
                                       "queries": "q", "evaluate": {"attacks": [{"name": "pgd_fs"}]}})
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "job": "jobs/demo.yaml",
                                    "evaluate": {"attacks": [{"name": "cw", "steps": 0}]}}))
    with pytest.raises(ConfigError, match=r"e\.yaml: bad value for 'evaluate.attacks.0.cw.steps'"):
        load_experiment(path)
    path.write_text(yaml.safe_dump({"name": "x", "job": str(tmp_path / "missing.yaml")}))
    with pytest.raises(ConfigError, match="missing.yaml' not found"):
        load_experiment(path)


def test_committed_experiment_files_validate():
    for path in sorted(Path("experiments").glob("*.yaml")):
        spec = load_experiment(path) if "imagenet" not in path.name else \
            ExperimentSpec.model_validate(yaml.safe_load(path.read_text()))
        assert spec.evaluate.attacks, path


def test_cli_evaluates_a_model_only_experiment_and_resumes(toy, tmp_path):
    """`knn-defense evaluate EXP.yaml` without a job: undefended classifier, gray- and black-box
    attacks, tables/CSV/plots; the second run reuses every set and cell."""
    images, labels = synthetic_images(30, seed=4)
    write_split_shards(images, labels, tmp_path / "q", "test", samples_per_shard=20)
    torch.manual_seed(0)
    torch.save(toy["target"].state_dict(), tmp_path / "target.pt")
    torch.save(toy["surrogate"].state_dict(), tmp_path / "surrogate.pt")
    shape = {"arch": "small_resnet", "widths": [8, 16, 16], "blocks": [1, 1, 1]}
    exp = {"name": "tiny", "output_dir": str(tmp_path / "out"), "queries": str(tmp_path / "q"),
           "model": {**shape, "weights": str(tmp_path / "target.pt")},
           "evaluate": {"num_queries": 20, "headline_budget": 0.1, "attacks": [
               {"name": "pgd", "steps": 2, "budget": [0.05, 0.1]},
               {"name": "fgsm", "budget": 0.1},
               {"name": "fgsm", "threat": "black_box", "budget": 0.1}],
               "surrogate": {"model": {**shape, "weights": str(tmp_path / "surrogate.pt")}}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "4 adversarial set(s) crafted" in result.output and "| no defense |" in result.output
    out = tmp_path / "out"
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 5 + 2  # clean, sets, worst cases
    assert (out / "acc_vs_budget.png").stat().st_size > 1000
    claims = json.loads((out / "claims.json").read_text())
    assert set(claims) == {"C5", "sanity"}  # the only claim an undefended grid can test
    checks = claims["sanity"]["undefended"]["checks"]
    assert checks["black_vs_gray"]["status"] == "pass" and checks["unbounded"]["status"] == "not run"
    attacks = (out / "attacks.csv").read_text()
    assert "transfer_rate" in attacks and "fgsm-black_box@0.1" in attacks
    again = runner.invoke(main, ["evaluate", str(path), "--no-progress"])
    assert again.exit_code == 0 and "0 adversarial set(s) crafted, 0 cell(s)" in again.output
    bad = runner.invoke(main, ["evaluate", str(path), "--set", "evaluate.attacks=[{name: pgd_pr}]"])
    assert bad.exit_code == 2 and "need a kNN defense" in bad.output


def test_variant_job_reuses_the_trained_classifier(tmp_path):
    from pipeline.config import parse_job

    job = parse_job({"name": "j", "data": {"database": "db", "queries": "q"}})
    spec = ExperimentSpec.model_validate({"name": "e", "output_dir": str(tmp_path), "job": "j.yaml",
                                          "databases": [{"subset": {"kind": "all", "size": 3000}}]})
    variant = exp_mod.variant_job(job, spec.databases[0], spec, str(tmp_path / "w.pt"))
    assert variant.name == "j-IG-3k-All" and variant.subset.size == 3000
    assert variant.model.weights == str((tmp_path / "w.pt").resolve()) and not variant.model.trained_here
    assert variant.output_dir == str(tmp_path / "databases" / "IG-3k-All")


def test_two_entries_of_one_attack_need_a_tag():
    with pytest.raises(ValueError, match="same set pgd-gray_box@0.06: give one a `tag`"):
        EvaluateSpec.model_validate({"attacks": [{"name": "pgd"}, {"name": "pgd", "steps": 50}]})
    with pytest.raises(ValueError, match="same set min_norm-white_box@0.1"):
        EvaluateSpec.model_validate({"attacks": [{"name": "min_norm", "budget": [0.05, 0.1]},
                                                 {"name": "min_norm", "budget": 0.1, "layers": ["a"]}]})
    spec = EvaluateSpec.model_validate({"attacks": [
        {"name": "pgd"}, {"name": "pgd", "steps": 50, "tag": "long"},
        {"name": "min_norm", "layers": ["a"]}, {"name": "min_norm", "layers": ["b"]}]})
    sets = plan_sets(spec.attacks, ["a", "b"])
    assert [s.label for s in sets] == ["pgd-gray_box@0.06", "pgd.long-gray_box@0.06",
                                       "min_norm-white_box[a]@0.06", "min_norm-white_box[b]@0.06"]
    assert sets[1].title == "PGD long gray" and sets[2].title == "min-norm kNN white"
    # the tag names the set (label, file name) but is not a parameter of the attack: tagging
    # an entry later reuses its crafted set
    assert sets[1].fingerprint("ctx") == plan_sets(EvaluateSpec.model_validate(
        {"attacks": [{"name": "pgd", "steps": 50}]}).attacks, [])[0].fingerprint("ctx")
