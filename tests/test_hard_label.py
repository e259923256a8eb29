"""The hard-label attack: foolbox's HopSkipJump around a labels-only function, queries counted per
image, images counted only after 8-bit rounding within the budget; and on the deployed
classifiers of a finished job (undefended + each layer's hard vote), resumable per classifier."""

import numpy as np
import pytest
import torch

from pipeline.attacks.hard_label import hop_skip_jump
from pipeline.attacks.projection import normalised_l2
from pipeline.features.backbones import images_to_tensor
from tests.conftest import synthetic_images


class Counting:
    """A labels function that counts the images it was asked about."""

    def __init__(self, fn):
        self.fn, self.calls, self.images = fn, 0, 0

    def __call__(self, x):
        self.calls += 1
        self.images += len(x)
        return self.fn(x)


def _model_labels(model):
    def labels(x):
        with torch.inference_mode():
            return model(x).argmax(1).numpy()
    return labels


def test_counts_queries_and_counts_only_8bit_images_within_budget(trained_small_model):
    images, labels = synthetic_images(10, seed=9)
    x, y = images_to_tensor(images[..., None]), torch.as_tensor(labels)
    fn = Counting(_model_labels(trained_small_model))
    r = hop_skip_jump(fn, x, y, 0.3, [25, 80], 10, batch_size=10, seed=0)
    assert r["queries"] == 80  # the largest budget, spent in full (start query included)
    # clean + pool labels + 79 lockstep calls + at most 4 counting calls per budget
    assert fn.calls <= 2 + 79 + 8
    correct = r["correct"]
    assert (correct[1] <= correct[0]).all()  # more queries never give accuracy back
    clean_wrong = ~r["clean_correct"]
    assert not correct[:, clean_wrong].any() and (r["queries_to_success"][clean_wrong] == 0).all()
    broken = ~correct[-1] & r["clean_correct"]
    assert broken.any(), "a 0.3 budget on the band model should break some images"
    adv = torch.as_tensor(r["adversarial"])
    on_grid = torch.allclose(adv * 255, torch.round(adv * 255), atol=1e-4)
    assert on_grid  # what serve would receive
    b = torch.as_tensor(broken)
    assert (normalised_l2(adv[b], x[b]) <= 0.3 * (1 + 1e-6)).all()
    assert (_model_labels(trained_small_model)(adv[b]) != y[b].numpy()).all()
    assert np.allclose(r["achieved"][-1][broken], normalised_l2(adv[b], x[b]).numpy())
    assert (r["queries_to_success"][broken] <= 80).all()
    # deterministic under the seed
    again = hop_skip_jump(_model_labels(trained_small_model), x, y, 0.3, [25, 80], 10,
                          batch_size=10, seed=0)
    assert np.array_equal(again["correct"], correct)


def test_a_classifier_with_one_label_cannot_be_attacked():
    x = torch.rand(4, 1, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    r = hop_skip_jump(lambda z: np.zeros(len(z), dtype=np.int64), x, y, 0.5, [10], 2)
    assert r["correct"].all() and not r["attacked"].any() and r["queries"] == 0


def test_an_easy_decision_boundary_is_found_within_the_budget():
    """Label = is the mean brightness above 0.5: images at 0.48 are a small step from the
    boundary, which HopSkipJump must find (and keep after rounding) in a few hundred queries."""
    torch.manual_seed(0)
    x = (0.48 + 0.02 * torch.rand(6, 1, 16, 16)).clamp(0, 0.49)
    x = torch.round(x * 255) / 255
    y = torch.zeros(6, dtype=torch.long)
    pool = torch.full((1, 1, 16, 16), 0.9)

    def labels(z):
        return (z.flatten(1).mean(1) > 0.5).long().numpy()

    r = hop_skip_jump(labels, x, y, 0.2, [50, 300], 2, pool=pool, seed=1)
    assert r["attacked"].all() and not r["correct"][-1].any()
    assert (r["min_norm"] < 0.1).all()
    # the counted images are the minimal ones where they survive rounding, not the budget's
    assert np.nanmedian(r["achieved"][-1]) < 0.15


@pytest.mark.slow
def test_deployed_classifiers_of_a_job_resume_per_classifier(finished_job, tmp_path, monkeypatch):
    from pipeline.config import EvaluateSpec
    from pipeline.defense.classifier import DefendedClassifier
    from pipeline.evaluate import hard_label as hl
    from pipeline.evaluate.experiment import Database

    spec_job, layout, _, _ = finished_job
    ev = EvaluateSpec.model_validate({"k": 10, "weightings": ["uw", "cbw_d"], "attacks": [
        {"name": "hsj", "budget": 0.3, "num_images": 5, "query_budgets": [15, 40]}]})
    attack = ev.attacks[0]
    defense = DefendedClassifier.from_job(spec_job.output_dir)
    try:
        images, labels = synthetic_images(12, seed=21)
        x, y = images_to_tensor(images[..., None]), torch.as_tensor(labels)
        db = Database("e2e", 300, defense, "fp")
        layers = defense.layers
        targets = hl.classifiers(db, layers, ev)
        assert targets == [("none", "-", 0)] + [(layer, "cbw_d", 10) for layer in layers]
        # a defended labels function is the defense's own hard vote
        for layer in layers[:2]:
            fn = hl.labels_function(db, defense.model, (layer, "cbw_d", 10))
            expected = defense.predict(x, layer=layer, weighting="cbw_d")[0]
            assert defense.k == 10 and np.array_equal(fn(x), expected)
        records = hl.run_hard_label(tmp_path, attack, x, y, db, defense.model, layers, ev, "fp",
                                    10, progress=False)
        assert [r["defense"] for r in records] == targets
        assert all(r["correct"].shape == (2, 5) and len(r["images"]) == 5 for r in records)
        assert all((r["correct"][1] <= r["correct"][0]).all() for r in records)
        assert all(r["stats"]["queries_per_image"] <= 40 for r in records)
        rows = hl.hard_label_rows(records, attack, labels, {"database": "e2e", "db_size": 300})
        assert {r["attack"] for r in rows} == {"hsj.15", "hsj.40"} and all(r["n"] == 5 for r in rows)
        # a second run loads every classifier's saved result
        monkeypatch.setattr(hl, "hop_skip_jump", lambda *a, **k: pytest.fail("re-attacked"))
        again = hl.run_hard_label(tmp_path, attack, x, y, db, defense.model, layers, ev, "fp",
                                  10, progress=False)
        assert all(np.array_equal(a["correct"], b["correct"]) for a, b in zip(records, again, strict=True))
    finally:
        defense.close()


def test_batch_is_capped_by_memory_at_imagenet_size():
    from pipeline.attacks.hard_label import max_batch

    assert max_batch(3 * 224 * 224, 10_000) <= 4
    assert max_batch(28 * 28, 10_000) >= 100
    assert max_batch(3 * 224 * 224, 1_000) >= max_batch(3 * 224 * 224, 10_000)
