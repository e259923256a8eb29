"""run_units through a local Ray: bounded in-flight tasks, retries on chosen errors only,
failures recorded while the other units finish, node ids, and a re-run that redoes only what
is not done."""

import os
import time
from pathlib import Path

import pytest

from pipeline.runtime.manifest import Manifest
from pipeline.runtime.ray_runner import ClusterShape, StageFailed, Unit, run_units


def sleepy(seconds: float, n: int) -> dict:
    time.sleep(seconds)
    return {"samples": n, "skipped": {"corrupt_image": 1}}


def flaky(marker: str, error: str) -> dict:
    """Fails the first time it runs (counted in ``marker``), then succeeds."""
    calls = Path(marker)
    with calls.open("a") as f:
        f.write("x")
    if len(calls.read_text()) == 1:
        raise {"OSError": OSError, "ValueError": ValueError}[error](f"first call fails ({error})")
    return {"samples": 1}


def fails_on(unit: int, bad: int) -> dict:
    if unit == bad:
        raise ValueError(f"bad data in unit {unit}")
    return {"samples": 10}


def test_at_most_max_in_flight_units_are_out_at_once(tmp_path, ray_local):
    manifest = Manifest(tmp_path / "m.sqlite")
    outstanding = []

    def units():  # pulled lazily by run_units: count what is submitted but not finished
        for i in range(12):
            states = manifest.counts("s")
            outstanding.append(i - states.get("done", 0) - states.get("failed", 0) + 1)
            yield Unit(f"{i:02d}", sleepy, (0.3, 5))

    report = run_units(manifest, "s", units(), "fp", total=12, max_in_flight=3, progress=False,
                       samples_key="samples")
    assert max(outstanding) == 3  # the bound was reached and never passed
    assert (report.done, report.failed, report.cached, report.samples) == (12, 0, 0, 60)
    assert report.skipped == {"corrupt_image": 12}
    assert manifest.counts("s") == {"done": 12}
    nodes = {u["node"] for u in manifest.units("s")}
    assert len(nodes) == 1 and len(nodes.pop()) == 56  # Ray node ids are 28 bytes, hex
    info = manifest.stage_info("s")
    assert info["total"] == 12 and info["report"]["done"] == 12
    manifest.close()


def test_transient_errors_are_retried_and_bad_data_is_not(tmp_path, ray_local):
    manifest = Manifest(tmp_path / "m.sqlite")
    units = [Unit("io", flaky, (str(tmp_path / "io.calls"), "OSError")),
             Unit("data", flaky, (str(tmp_path / "data.calls"), "ValueError"))]
    with pytest.raises(StageFailed, match="1 of 2 unit") as err:
        run_units(manifest, "s", units, "fp", max_retries=2, retry_exceptions=[OSError],
                  progress=False)
    assert (tmp_path / "io.calls").read_text() == "xx"  # failed once, retried, done
    assert (tmp_path / "data.calls").read_text() == "x"  # ValueError: not retried
    assert manifest.counts("s") == {"done": 1, "failed": 1}
    (_, unit, error), = manifest.failures("s")
    assert unit == "data" and "ValueError: first call fails" in error
    assert err.value.report.failures[0][0] == "data"
    manifest.close()


def test_a_failing_unit_lets_the_others_finish_and_a_rerun_redoes_only_it(tmp_path, ray_local):
    manifest = Manifest(tmp_path / "m.sqlite")
    with pytest.raises(StageFailed) as err:
        run_units(manifest, "s", [Unit(str(i), fails_on, (i, 2)) for i in range(5)], "fp",
                  max_retries=0, progress=False, samples_key="samples")
    report = err.value.report
    assert (report.done, report.failed, report.samples) == (4, 1, 40)
    assert manifest.counts("s") == {"done": 4, "failed": 1}
    before = {u["unit"]: (u["attempts"], u["updated"]) for u in manifest.units("s")}

    report = run_units(manifest, "s", [Unit(str(i), fails_on, (i, -1)) for i in range(5)], "fp",
                       progress=False, samples_key="samples")
    assert (report.done, report.cached, report.samples) == (1, 4, 10)
    after = {u["unit"]: (u["attempts"], u["updated"]) for u in manifest.units("s")}
    assert after["2"][0] == 2
    assert {u: v for u, v in after.items() if u != "2"} == {u: v for u, v in before.items() if u != "2"}
    # another fingerprint (changed settings) redoes everything
    report = run_units(manifest, "s", [Unit(str(i), fails_on, (i, -1)) for i in range(5)], "fp2",
                       progress=False)
    assert (report.done, report.cached) == (5, 0)
    manifest.close()


def test_impossible_resources_are_named_against_the_largest_node():
    shape = ClusterShape(cpus=4, gpus=0, node_cpus=2, node_gpus=0, node_memory=8 * 2**30)
    assert shape.problems("index", {"num_cpus": 2, "memory": 4 * 2**30}) == []
    problems = shape.problems("features", {"num_cpus": 4, "num_gpus": 1, "memory": 16 * 2**30})
    assert len(problems) == 3
    assert problems[0].startswith("runtime.resources.features: num_cpus=4 but the largest node")
    assert "num_gpus=1" in problems[1] and "0 GPUs" in problems[1]
    assert "memory_gb=16" in problems[2] and "8.0 GB" in problems[2]


def test_manifest_of_an_older_layout_gains_the_new_columns(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE units (stage TEXT NOT NULL, unit TEXT NOT NULL, state TEXT NOT NULL, "
               "attempts INTEGER NOT NULL DEFAULT 0, fingerprint TEXT, error TEXT, counts TEXT, "
               "output_checksum TEXT, updated REAL NOT NULL, PRIMARY KEY (stage, unit))")
    db.execute("INSERT INTO units VALUES ('features', '00000', 'done', 1, 'fp', NULL, '{}', NULL, 1.0)")
    db.commit()
    db.close()
    manifest = Manifest(path)
    assert manifest.done_among("features", "fp", ["00000", "00001"]) == {"00000"}
    (row,) = manifest.units()
    assert row["node"] is None and row["state"] == "done"
    manifest.close()
    assert os.path.getsize(path) > 0


def test_url_output_on_several_nodes_needs_a_shared_staging_folder():
    from pipeline.config import parse_job
    from pipeline.runtime.job import resource_problems

    raw = {"name": "u", "output_dir": "s3://b/u", "data": {"database": "/d", "queries": "/q"},
           "runtime": {"resources": {"features": {"num_gpus": 1}}}}
    one_node = ClusterShape(cpus=8, gpus=1, node_cpus=8, node_gpus=1, node_memory=2**34, nodes=1)
    two_nodes = ClusterShape(cpus=16, gpus=0, node_cpus=8, node_gpus=0, node_memory=2**34, nodes=2)
    assert resource_problems(parse_job(raw), one_node) == []
    problems = resource_problems(parse_job(raw), two_nodes)
    assert len(problems) == 2 and "num_gpus=1" in problems[0]
    assert "set runtime.staging_dir to a folder every node mounts" in problems[1]
    raw["runtime"] = {"staging_dir": "/mnt/shared/u"}
    assert resource_problems(parse_job(raw), two_nodes) == []


def test_a_job_asking_more_than_any_node_has_stops_before_any_work(tmp_path, ray_local):
    import yaml
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.data.fashion_mnist import write_split_shards
    from tests.conftest import synthetic_images

    images, labels = synthetic_images(20, seed=1)
    write_split_shards(images, labels, tmp_path / "db", "train", samples_per_shard=10)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "greedy", "output_dir": str(tmp_path / "out"),
        "data": {"database": str(tmp_path / "db"), "queries": str(tmp_path / "db")},
        "runtime": {"resources": {"features": {"num_gpus": 1}, "index": {"num_cpus": 64}}}}))
    result = CliRunner().invoke(main, ["run", str(job), "--quiet"])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert lines[0] == "error: job greedy: 2 problems:"
    assert lines[1].startswith("  - runtime.resources.features: num_gpus=1 but the largest node")
    assert lines[2].startswith("  - runtime.resources.index: num_cpus=64 but the largest node")
    assert not (tmp_path / "out").exists()
