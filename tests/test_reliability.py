"""Reliability on loopback: a worker killed mid-shard, the driver killed mid-job, a shard that
always fails, uploads to an fsspec URL, a two-node cluster and a Jobs API submission. Every job
ends with `knn-defense verify`: each selected key exactly once in Parquet, every FAISS index and
the LevelDB store, or recorded as skipped. Every Ray a test starts is stopped by the test."""

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.data.fashion_mnist import write_split_shards
from pipeline.features.backbones import SmallResNet
from pipeline.layout import JobLayout
from pipeline.runtime.job import run_job
from pipeline.runtime.manifest import Manifest
from pipeline.validate import load_job
from tests.conftest import synthetic_images
from tests.ray_procs import (
    kill_pids,
    loopback_env,
    ray_head,
    run_script,
    token_file,
)

ROOT = Path(__file__).parent.parent
WIDTHS, BLOCKS = [8, 16, 16], [1, 1, 1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Database shards, query shards and a SmallResNet's weights (no train stage: fast)."""
    root = tmp_path_factory.mktemp("reliability")
    images, labels = synthetic_images(2400, seed=31)
    write_split_shards(images, labels, root / "db", "train", samples_per_shard=400)
    q_images, q_labels = synthetic_images(40, seed=32)
    write_split_shards(q_images, q_labels, root / "q", "test", samples_per_shard=40)
    torch.manual_seed(0)
    torch.save(SmallResNet(widths=WIDTHS, blocks=BLOCKS).state_dict(), root / "weights.pt")
    return root


def job_yaml(data: Path, out: Path, name: str, **sections) -> Path:
    """A small job spec (6 shards of 400 images) written beside its output folder."""
    raw = {"name": name, "output_dir": str(out),
           "data": {"database": str(data / "db"), "queries": str(data / "q")},
           "model": {"widths": WIDTHS, "blocks": BLOCKS, "weights": str(data / "weights.pt")},
           "features": {"layers": ["conv_3_1", "conv_4_1"], "pca_dim": 8, "pca_sample": 200,
                        "batch_size": 16, "decode_workers": 1},
           "index": {"factory": "Flat"}, "store": {"partitions": 2},
           "evaluate": {"num_queries": 20, "k": 5, "attacks": [{"name": "pgd", "steps": 2}]},
           "runtime": {"progress": False, "max_retries": 2}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = out.parent / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def verify_ok(job_dir) -> dict:
    result = CliRunner().invoke(main, ["verify", str(job_dir)])
    assert result.exit_code == 0, result.output
    assert "verify: ok" in result.output
    return json.loads(result.output.splitlines()[0])


def done_units(job_dir) -> dict:
    manifest = Manifest(JobLayout(job_dir).manifest)
    try:
        return {(u["stage"], u["unit"]): (u["attempts"], u["updated"])
                for u in manifest.units() if u["state"] == "done"}
    finally:
        manifest.close()


def _features_worker_mid_shard(db: Path, features_dir: Path):
    """(process, shard) of one of this process's Ray workers inside a features task, with a
    database shard open whose feature file does not exist yet."""
    for proc in psutil.Process().children(recursive=True):
        try:
            if not any("knn-defense:features" in part for part in proc.cmdline()):
                continue
            for f in proc.open_files():
                path = Path(f.path)
                if path.parent == db and path.suffix == ".tar" and \
                        not (features_dir / f"{path.stem}.parquet").exists():
                    return proc, path.stem
        except psutil.Error:
            continue
    return None


def _kill_a_features_worker_mid_shard(runner: threading.Thread, db: Path, features_dir: Path
                                      ) -> tuple[int, str] | None:
    """While ``runner`` runs the job: SIGKILL the first worker caught reading a shard whose
    features are not written yet; (its pid, the shard), or None if the job ended first."""
    while runner.is_alive():
        found = _features_worker_mid_shard(db, features_dir)
        if found:
            proc, shard = found
            proc.send_signal(signal.SIGKILL)
            return proc.pid, shard
        time.sleep(0.02)
    return None


@pytest.mark.slow
def test_worker_killed_mid_feature_shard_is_retried_and_nothing_is_lost(data, tmp_path, ray_local):
    spec = load_job(job_yaml(data, tmp_path / "job", "worker-kill"))
    layout = JobLayout(spec.output_dir)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_job(spec, "verify")))
    runner.start()
    killed = _kill_a_features_worker_mid_shard(runner, data / "db", layout.features_dir)
    runner.join(600)
    assert killed is not None, "no features task was caught mid-shard"
    killed = killed[1]
    summary = outcome["summary"]
    assert summary["status"] == "done" and summary["stages"]["features"]["done"] == 6
    assert (layout.features_dir / f"{killed}.parquet").is_file()
    result = verify_ok(layout.root)
    assert result["keys"] == 2400 and result["skipped"] == {}


def _features_processes() -> set[int]:
    """Pids of this process's Ray workers running a features unit now (their process title)."""
    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("knn-defense:features" in part for part in proc.cmdline()):
                pids.add(proc.pid)
        except psutil.Error:
            continue
    return pids


@pytest.mark.slow
def test_extraction_actor_killed_mid_shard_redoes_the_shard_on_its_restart(data, tmp_path, ray_local):
    """The features stage runs on long-lived actors (one per CPU slot: 2 here). SIGKILL one
    while it extracts a shard: Ray restarts it and retries the shard on it within the same run
    (one manifest attempt), 6 shards use at most 3 processes (2 actors and the restart), and the
    job verifies. One layer and one store partition keep the job short."""
    spec = load_job(job_yaml(data, tmp_path / "job", "actor-kill", features={"layers": ["conv_4_1"]},
                             store={"partitions": 1}))
    layout = JobLayout(spec.output_dir)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_job(spec, "verify")))
    runner.start()
    while runner.is_alive() and not layout.features_dir.is_dir():  # no scans before features
        time.sleep(0.05)
    killed = _kill_a_features_worker_mid_shard(runner, data / "db", layout.features_dir)
    seen = {killed[0]} if killed else set()
    while runner.is_alive() and len(list(layout.features_dir.glob("*.parquet"))) < 6:
        seen |= _features_processes()
        time.sleep(0.1)
    runner.join(600)
    assert killed is not None, "no extraction actor was caught mid-shard"
    killed = killed[1]
    summary = outcome["summary"]
    assert summary["status"] == "done" and summary["stages"]["features"]["done"] == 6
    assert (layout.features_dir / f"{killed}.parquet").is_file()
    attempts = {unit: n for (stage, unit), (n, _) in done_units(layout.root).items() if stage == "features"}
    assert attempts == {f"{i:05d}": 1 for i in range(6)}  # retried by Ray, not by a new run
    assert len(seen) <= 3, seen  # workers outlived their shards: a pool, not a task per shard
    result = verify_ok(layout.root)
    assert result["keys"] == 2400 and result["skipped"] == {}


@pytest.mark.slow
def test_driver_killed_mid_job_then_resume_redoes_nothing_done(data, tmp_path, ray_local):
    path = job_yaml(data, tmp_path / "job", "driver-kill")
    layout = JobLayout(tmp_path / "job")
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path), "--quiet",
                               "--until", "verify"], env=loopback_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = set()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            tree |= {p.pid for p in psutil.Process(driver.pid).children(recursive=True)}
            if layout.manifest.is_file():
                db = sqlite3.connect(f"file:{layout.manifest}?mode=ro", uri=True, timeout=10)
                try:
                    done = db.execute("SELECT COUNT(*) FROM units WHERE stage='features' "
                                      "AND state='done'").fetchone()[0]
                except sqlite3.OperationalError:  # schema not there yet
                    done = 0
                db.close()
                if done >= 1:
                    break
            time.sleep(0.05)
        assert driver.poll() is None, "the job ended before any features unit was done"
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        kill_pids([driver.pid])
        time.sleep(2)  # Ray's processes die with their driver; make sure of it
        kill_pids(tree)
    before = done_units(layout.root)
    assert 1 <= sum(stage == "features" for stage, _ in before) < 6
    assert not layout.summary.exists()  # the job never finished

    result = CliRunner().invoke(main, ["resume", str(layout.root), "--quiet"])
    assert result.exit_code == 0, result.output
    after = done_units(layout.root)
    assert {k: after[k] for k in before} == before  # attempts and timestamps untouched
    assert sum(stage == "features" for stage, _ in after) == 6 and ("evaluate", "evaluate") in after
    assert verify_ok(layout.root)["keys"] == 2400


@pytest.mark.slow
def test_a_shard_that_always_fails_is_failed_the_rest_done_and_resume_fixes_it(data, tmp_path, ray_local):
    path = job_yaml(data, tmp_path / "job", "bad-shard", runtime={"max_retries": 1})
    layout = JobLayout(tmp_path / "job")
    # storage that refuses shard 2's output on every attempt: the rename lands on a directory
    (layout.features_dir / "00002.parquet").mkdir(parents=True)
    result = CliRunner().invoke(main, ["run", str(path), "--until", "verify", "--quiet"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert "FAILED: 1 unit(s) of stage features" in lines
    assert any(line.startswith("  features/00002: IsADirectoryError") for line in lines)
    assert f"retry: knn-defense resume {layout.root}" in lines
    assert lines[-1].startswith("error: stage features: 1 of 6 unit(s) failed")
    summary = json.loads(layout.summary.read_text())
    assert summary["status"] == "failed" and summary["failed_total"] == 1
    assert summary["stages"]["features"]["done"] == 5 and summary["stages"]["features"]["failed"] == 1
    assert summary["retry"] == f"knn-defense resume {layout.root}"
    manifest = Manifest(layout.manifest)
    assert manifest.counts("features") == {"done": 5, "failed": 1}
    assert "index.populate" not in manifest.stage_names()  # later stages never started
    manifest.close()
    result = CliRunner().invoke(main, ["status", str(layout.root)])
    assert "FAILED features/00002: IsADirectoryError" in result.output

    before = done_units(layout.root)
    shutil.rmtree(layout.features_dir / "00002.parquet")
    result = CliRunner().invoke(main, ["resume", str(layout.root), "--quiet"])
    assert result.exit_code == 0, result.output
    after = done_units(layout.root)
    assert {k: after[k] for k in before} == before
    assert after[("features", "00002")][0] == 2  # only the failed unit ran again
    assert verify_ok(layout.root)["keys"] == 2400


@pytest.mark.slow
def test_output_to_an_fsspec_url_uploads_stages_with_markers_and_resumes_elsewhere(
        data, tmp_path, ray_local, monkeypatch):
    from pipeline.runtime import remote as remote_module

    monkeypatch.setattr(remote_module, "default_cache", lambda url: tmp_path / "reader-copy")
    url = f"file://{tmp_path}/bucket/job"
    staging = tmp_path / "staging"
    path = job_yaml(data, tmp_path / "spec" / "unused", "to-url", output_dir=url,
                    runtime={"staging_dir": str(staging)})
    result = CliRunner().invoke(main, ["run", str(path), "--until", "verify", "--quiet"])
    assert result.exit_code == 0, result.output
    bucket = tmp_path / "bucket" / "job"
    markers = {p.stem for p in (bucket / "_complete").glob("*.json")}
    assert markers == {"shards", "subset", "train", "transforms", "features", "index", "store", "verify"}
    features = json.loads((bucket / "_complete" / "features.json").read_text())["files"]
    assert len(features) == 6 and all((bucket / rel).stat().st_size == size
                                      for rel, (size, _) in features.items())
    assert (bucket / "manifest" / "manifest.sqlite").is_file()
    assert json.loads((bucket / "summary.json").read_text())["status"] == "done"
    assert verify_ok(url)["keys"] == 2400  # read back through the markers
    result = CliRunner().invoke(main, ["status", url])
    assert result.exit_code == 0 and "uploaded and marked complete: features, index" in result.output

    # another machine: no staging folder; resume starts from the upload and redoes nothing
    before = done_units(staging)
    shutil.rmtree(staging)
    result = CliRunner().invoke(main, ["resume", url, "--quiet"])
    assert result.exit_code == 0, result.output
    after = done_units(staging)
    assert {k: after[k] for k in before} == before
    assert ("evaluate", "evaluate") in after and (bucket / "_complete" / "evaluate.json").is_file()


TWO_NODE_SCRIPT = """
import json, os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray.cluster_utils import Cluster
from pipeline.validate import load_job
from pipeline.layout import JobLayout
from pipeline.runtime.job import run_job
from pipeline.runtime.manifest import Manifest

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    # One idle worker per node before the job: a node still starting its first worker must not
    # be outrun by the other node's warm one (six small shards finish in seconds).
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
    ready = ray.remote(lambda: ray.get_runtime_context().get_node_id())
    assert sorted(ray.get([ready.options(scheduling_strategy=On(n, soft=False)).remote()
                           for n in nodes])) == sorted(nodes)
    summary = run_job(load_job(sys.argv[1]), "verify", address=cluster.address, progress=False)
    manifest = Manifest(JobLayout(summary["output_dir"]).manifest)
    per_unit = {u["unit"]: u["node"] for u in manifest.units("features")}
    print(json.dumps({"nodes": nodes, "features": per_unit, "status": summary["status"]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_two_node_cluster_spreads_shards_over_both_nodes(data, tmp_path):
    path = job_yaml(data, tmp_path / "job", "two-nodes")
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODE_SCRIPT)
    code, out, err = run_script([str(script), str(path)], loopback_env(), 420, cwd=ROOT)
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "done" and len(result["nodes"]) == 2
    assert len(result["features"]) == 6
    assert set(result["features"].values()) == set(result["nodes"])  # both nodes took shards
    assert verify_ok(tmp_path / "job")["keys"] == 2400


@pytest.mark.slow
def test_jobs_api_submission_to_a_local_head_runs_to_completion(data, tmp_path, monkeypatch):
    path = job_yaml(data, tmp_path / "job", "submitted", runtime={"max_retries": 1})
    with token_file() as token, ray_head(token) as url:
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        result = CliRunner().invoke(main, ["submit", str(path), "--address", url, "--until", "verify"])
        assert result.exit_code == 0, result.output
        job_id = result.stdout.strip().splitlines()[0]
        assert job_id.startswith("knn-defense-submitted-")
        deadline, state = time.time() + 420, None
        while time.time() < deadline:
            result = CliRunner().invoke(main, ["status", job_id, "--address", url])
            assert result.exit_code == 0, result.output
            state = json.loads(result.output)["status"]
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(3)
        logs = CliRunner().invoke(main, ["logs", job_id, "--address", url]).output
        assert state == "SUCCEEDED", logs[-3000:]
        assert "job submitted: done" in logs
        # a wrong token is refused with one line
        monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
        result = CliRunner().invoke(main, ["status", job_id, "--address", url])
        assert result.exit_code == 2 and "rejected" in result.output
    assert verify_ok(tmp_path / "job")["keys"] == 2400
