"""knn-defense decontaminate: near-duplicates of query images planted in the database (JPEG
re-encoded and cropped copies) are found with the job's own index, with the calibration's
precision and recall reported; evaluate.decontaminate: exclude drops those queries."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.config import ConfigError, parse_job
from pipeline.evaluate.decontaminate import (
    AUGMENTATIONS,
    NotDecontaminated,
    augment,
    choose_threshold,
    duplicates_path,
)

N_DB, N_QUERIES, PLANTED = 200, 100, 8  # planted: copies of the first PLANTED query images
LAYERS = ["conv_2_2", "conv_4_2"]
PER_SHARD = (N_DB + PLANTED) // 2  # two database shards; the planted copies in the second


SIDE = 48


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SIDExSIDE images, each a few random bright rectangles on a dark background (distinct
    images look distinct), plus a band whose height is the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    out = rng.integers(0, 30, (n, SIDE, SIDE)).astype(np.uint8)
    for i, c in enumerate(labels):
        for _ in range(3):
            x0, y0 = rng.integers(0, SIDE - 16, 2)
            w, h = rng.integers(8, 20, 2)
            out[i, y0:y0 + h, x0:x0 + w] = rng.integers(80, 256)
        out[i, 4 + 4 * c:8 + 4 * c, 4:SIDE - 4] = 255
    return out, labels.astype(np.int64)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _planted_copy(img: np.ndarray, i: int) -> tuple[str, bytes]:
    """Re-encoded as JPEG (quality 80), or, for every fourth, cropped (2 pixels off two sides)
    and resized back (PNG)."""
    pil = Image.fromarray(img)
    buf = io.BytesIO()
    if i % 4 != 3:
        pil.save(buf, format="JPEG", quality=80)
        return "jpg", buf.getvalue()
    pil.crop((2, 0, SIDE, SIDE - 2)).resize((SIDE, SIDE), Image.BICUBIC).save(buf, format="PNG")
    return "png", buf.getvalue()


@pytest.fixture(scope="module")
def planted_job(tmp_path_factory, ray_local):
    """A job up to verify whose last database shard holds copies of PLANTED query images."""
    from pipeline.data.shards import write_tar_shards
    from pipeline.runtime.job import run_job

    root = tmp_path_factory.mktemp("decontaminate")
    db, db_labels = _images(N_DB, seed=21)
    q, q_labels = _images(N_QUERIES, seed=22)
    samples = [("png", _png(img), int(c)) for img, c in zip(db, db_labels, strict=True)]
    samples += [(*_planted_copy(q[i], i), int(q_labels[i])) for i in range(PLANTED)]

    def db_sample(row, key):
        ext, data, label = samples[row]
        return {ext: data, "cls": label}

    def q_sample(row, key):
        return {"png": _png(q[row]), "cls": int(q_labels[row])}

    write_tar_shards(root / "db", len(samples), PER_SHARD, db_sample)
    write_tar_shards(root / "q", N_QUERIES, N_QUERIES, q_sample)
    spec = parse_job({
        "name": "decon", "output_dir": str(root / "job"),
        "data": {"database": str(root / "db"), "queries": str(root / "q")},
        "model": {"widths": [16, 32, 32]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "features": {"layers": LAYERS, "pooling": "rmac", "rmac_sample": 200, "pca_dim": 32,
                     "pca_sample": 200, "batch_size": 64},
        "index": {"factory": "IVF4,Flat", "train_sample": 200, "nprobe": 4},
        "store": {"partitions": 1},
        "evaluate": {"num_queries": 20, "k": 5, "attacks": [{"name": "pgd", "steps": 3}]},
        "runtime": {"progress": False},
    })
    run_job(spec, "verify")
    # the planted copies' database keys: the last PLANTED samples, in shard order
    planted_db_keys = []
    for row in range(N_DB, N_DB + PLANTED):
        planted_db_keys.append(f"{row // PER_SHARD:05d}{row % PER_SHARD:06d}")
    q_keys = [f"00000{row:06d}" for row in range(N_QUERIES)]
    return spec, root, q_keys, planted_db_keys


@pytest.fixture(scope="module")
def decontaminated(planted_job):
    spec, root, q_keys, planted_db_keys = planted_job
    result = CliRunner().invoke(main, ["decontaminate", spec.output_dir, "--queries",
                                       str(root / "q"), "--calibration", str(N_QUERIES)])
    assert result.exit_code == 0, result.output
    return result


def test_decontaminate_finds_the_planted_duplicates_with_the_reported_precision_and_recall(
        planted_job, decontaminated):
    spec, root, q_keys, planted_db_keys = planted_job
    table = pq.read_table(duplicates_path(spec.output_dir)).to_pylist()
    assert table and set(table[0]) == {"query_key", "query_url", "db_id", "db_key", "distance"}
    pairs = {(r["query_key"], r["db_key"]) for r in table}
    planted = set(zip(q_keys[:PLANTED], planted_db_keys, strict=True))
    found = pairs & planted
    # every re-encoded copy; a cropped copy only as often as the calibration's crop recall says
    # (this tiny network's pooled features move under a 2-pixel crop as far as to another image)
    jpeg = {pair for i, pair in enumerate(zip(q_keys[:PLANTED], planted_db_keys, strict=True)) if i % 4 != 3}
    assert jpeg <= found, sorted(jpeg - found)
    assert len(found) >= PLANTED - 2, (sorted(pairs), sorted(planted))
    # false positives: the calibrated threshold lets through a small share of distinct nearest
    # images (the report's false_positive_rate, per pair, over k neighbours of every query)
    assert len(pairs - planted) <= 0.05 * N_QUERIES, sorted(pairs - planted)
    report = json.loads((duplicates_path(spec.output_dir).parent / "report.json").read_text())
    assert report["layer"] in LAYERS and report["threshold"] > 0
    assert report["queries_scanned"] == N_QUERIES
    assert report["queries_with_duplicate"] == len({q for q, _ in pairs})
    assert report["database_images_found"] == len({d for _, d in pairs})
    cal = report["calibration"]
    assert cal["images"] == N_QUERIES and cal["positives"] == N_QUERIES * len(AUGMENTATIONS)
    for rate in (cal["precision"], cal["recall"]):
        lo, hi = rate["ci95"]
        assert 0 <= lo <= rate["value"] <= hi <= 1
    assert set(cal["per_augmentation"]) == set(AUGMENTATIONS)
    assert cal["precision"]["value"] >= 0.9
    jpeg_recall = cal["per_augmentation"]["jpeg"]["recall"]
    assert jpeg_recall["value"] >= 0.9  # what the planted re-encodes met
    # the one-screen summary
    out = decontaminated.output
    assert f"{N_QUERIES} queries scanned" in out and "precision" in out and "jpeg" in out


def test_exclude_drops_the_queries_with_a_duplicate_and_reports_the_counts(
        planted_job, decontaminated):
    from pipeline.evaluate.experiment import evaluate_job

    spec, root, q_keys, planted_db_keys = planted_job
    table = pq.read_table(duplicates_path(spec.output_dir)).to_pylist()
    with_dup = {r["query_key"] for r in table}
    ev = spec.evaluate.model_copy(update={"decontaminate": "exclude", "num_queries": None})
    result = evaluate_job(spec.output_dir, ev=ev, progress=False, num_threads=1)
    assert result["num_queries"] == N_QUERIES - len(with_dup)
    info = result["decontamination"]
    assert info["queries_excluded"] == len(with_dup)
    assert info["duplicates_found"] == len({r["db_id"] for r in table})
    assert f"{len(with_dup)} query image(s) excluded" in result["markdown"]


def test_exclude_without_the_list_refuses_naming_the_command(planted_job, tmp_path):
    from pipeline.evaluate.experiment import _decontamination

    ev = planted_job[0].evaluate.model_copy(update={"decontaminate": "exclude"})
    with pytest.raises(NotDecontaminated, match="run `knn-defense decontaminate"):
        _decontamination(tmp_path, ev)
    # remove: the runner removed them before the stage; evaluate still reads the list to say so
    with pytest.raises(NotDecontaminated):
        _decontamination(tmp_path, ev.model_copy(update={"decontaminate": "remove"}))


def test_remove_takes_the_duplicates_out_before_the_evaluate_stage(planted_job, decontaminated,
                                                                    tmp_path):
    """evaluate.decontaminate: remove: the runner removes the listed database images (a
    journaled `knn-defense remove`) once per list, then evaluates; the report says so."""
    import shutil

    from pipeline.jobfolder import read_generations, removed_ids
    from pipeline.layout import JobLayout
    from pipeline.runtime.job import run_job
    from pipeline.runtime.verify import verify_folder

    spec, root, q_keys, planted_db_keys = planted_job
    job = tmp_path / "job"
    shutil.copytree(spec.output_dir, job)
    table = pq.read_table(duplicates_path(job)).to_pylist()
    ev = spec.evaluate.model_copy(update={"decontaminate": "remove"})
    removing = spec.model_copy(update={"output_dir": str(job), "evaluate": ev})
    summary = run_job(removing, progress=False)
    layout = JobLayout(job)
    assert set(removed_ids(layout).tolist()) == {r["db_id"] for r in table}
    assert read_generations(layout)["generation"] == 1
    assert "removed from the database before this evaluation" in (job / "eval" / "results.md").read_text()
    verify_folder(str(job))
    # once per list: a second run removes nothing and evaluates nothing again
    again = run_job(removing, progress=False)
    assert read_generations(layout)["generation"] == 1
    assert again["stages"]["evaluate"]["done"] == 0 and summary["stages"]["evaluate"]["done"] == 1


def test_spec_takes_remove_exclude_off_and_refuses_other_values():
    base = {"name": "x", "output_dir": "out", "data": {"database": "db", "queries": "q"}}
    assert parse_job(base).evaluate.decontaminate == "off"
    for mode in ("remove", "exclude", "off"):
        assert parse_job({**base, "evaluate": {"decontaminate": mode}}).evaluate.decontaminate == mode
    with pytest.raises(ConfigError, match="decontaminate"):
        parse_job({**base, "evaluate": {"decontaminate": "maybe"}})


def test_bad_input_is_one_line(planted_job, tmp_path):
    spec, root = planted_job[:2]
    runner = CliRunner()
    cases = [
        ([str(tmp_path / "nojob"), "--queries", str(root / "q")], "not a job folder"),
        ([spec.output_dir, "--queries", str(root / "q"), "--layer", "conv_9"], "--layer conv_9"),
        ([spec.output_dir, "--queries", str(tmp_path / "none")], "does not exist"),
        ([spec.output_dir, "--queries", str(tmp_path)], "matches no .tar shard"),
        ([spec.output_dir, "--queries", str(root / "q"), "--threshold", "1"], "needs --layer"),
    ]
    for args, message in cases:
        result = runner.invoke(main, ["decontaminate", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_threshold_rule_and_augmentations():
    pos = np.array([0.1, 0.2, 0.3, 0.4])
    neg = np.array([0.35, 0.9, 1.0, 1.1])
    t, rule = choose_threshold(pos, neg)
    assert 0.3 < t < 0.35 and "precision >= 0.99" in rule
    t, rule = choose_threshold(np.array([0.5, 0.6]), np.array([0.1, 0.2]))
    assert "F1" in rule
    img = _png(_images(1, 0)[0][0])
    rng = np.random.default_rng(0)
    for kind in AUGMENTATIONS:
        copy = Image.open(io.BytesIO(augment(img, kind, rng)))
        assert copy.size == (SIDE, SIDE)
    with pytest.raises(ValueError):
        augment(img, "rotate", rng)
