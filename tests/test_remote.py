"""Job folders at fsspec URLs: a stage's files are uploaded before its completion marker, readers
take only marked stages, a re-upload drops the marker first and skips unchanged files."""

import json

import fsspec
import pytest

from pipeline.runtime.manifest import Manifest
from pipeline.runtime.remote import IncompleteStage, RemoteJob, local_job_dir


def _stage_files(staging):
    (staging / "features").mkdir(parents=True)
    (staging / "features" / "00000.parquet").write_bytes(b"a" * 10)
    (staging / "features" / "00001.parquet").write_bytes(b"b" * 20)
    (staging / "features" / "00002.parquet.tmp").write_bytes(b"half")  # a write in progress
    (staging / "shards.parquet").write_bytes(b"table")
    (staging / "job.yaml").write_text("name: r\n")
    manifest = Manifest(staging / "manifest" / "manifest.sqlite")
    manifest.mark_running("shards", ["00000"], "fp")
    manifest.mark_done("shards", "00000")
    manifest.mark_running("features", ["00000", "00001"], "fp")
    manifest.mark_done("features", "00000")
    manifest.mark_running("index.populate", ["conv/00000"], "fp")
    manifest.mark_done("index.populate", "conv/00000")
    return manifest


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_upload_then_marker_and_readers_take_only_marked_stages(tmp_path, scheme):
    url = f"file://{tmp_path}/bucket/job" if scheme == "file" else f"memory://{tmp_path.name}/job"
    fs, root = fsspec.core.url_to_fs(url)
    remote = RemoteJob(url, tmp_path / "staging")
    manifest = _stage_files(remote.staging)

    assert remote.complete_stages() == {}
    assert remote.upload_stage("shards") and remote.upload_stage("features")
    remote.upload_state(manifest)
    assert set(remote.complete_stages()) == {"shards", "features"}
    marker = remote.marker("features")
    assert set(marker["files"]) == {"features/00000.parquet", "features/00001.parquet"}
    assert fs.cat_file(f"{root}/features/00001.parquet") == b"b" * 20
    assert not fs.exists(f"{root}/features/00002.parquet.tmp")
    assert not remote.upload_stage("features")  # nothing changed: nothing uploaded

    # a re-run rewrites one file and drops another: the marker follows, the stale object goes
    (remote.staging / "features" / "00001.parquet").unlink()
    (remote.staging / "features" / "00000.parquet").write_bytes(b"c" * 5)
    assert remote.upload_stage("features")
    assert set(remote.marker("features")["files"]) == {"features/00000.parquet"}
    assert not fs.exists(f"{root}/features/00001.parquet")
    assert fs.cat_file(f"{root}/features/00000.parquet") == b"c" * 5

    # a reader elsewhere: marked stages only, and a manifest that forgets the unmarked index
    other = RemoteJob(url, tmp_path / "elsewhere")
    assert sorted(other.fetch()) == ["features", "shards"]
    assert (other.staging / "features" / "00000.parquet").read_bytes() == b"c" * 5
    copy = Manifest(other.staging / "manifest" / "manifest.sqlite")
    assert copy.stage_names() == ["shards", "features"]
    copy.close()
    with pytest.raises(IncompleteStage, match=r"\['index'\] have no completion marker"):
        other.fetch(required=["features", "index"])
    manifest.close()


def test_a_stage_being_reuploaded_has_no_marker_while_its_files_change(tmp_path):
    url = f"file://{tmp_path}/bucket/job"
    remote = RemoteJob(url, tmp_path / "staging")
    _stage_files(remote.staging).close()
    remote.upload_stage("features")
    seen = []
    real_put = remote._put

    def watching_put(local, rel):  # what a reader would see in the middle of the upload
        seen.append(remote.marker("features"))
        real_put(local, rel)

    remote._put = watching_put
    (remote.staging / "features" / "00000.parquet").write_bytes(b"new")
    remote.upload_stage("features")
    assert seen == [None]
    assert json.loads((tmp_path / "bucket/job/_complete/features.json").read_text())["stage"] == "features"


def test_local_job_dir_passes_paths_through_and_refuses_unmarked_urls(tmp_path, monkeypatch):
    from pipeline.runtime import remote as remote_module

    monkeypatch.setattr(remote_module, "default_cache", lambda url: tmp_path / "cache")
    assert str(local_job_dir(str(tmp_path / "x"))) == str(tmp_path / "x")
    url = f"file://{tmp_path}/bucket/empty"
    with pytest.raises(FileNotFoundError, match="not a job folder"):
        local_job_dir(url)
    remote = RemoteJob(f"file://{tmp_path}/bucket/job", tmp_path / "staging")
    _stage_files(remote.staging).close()
    remote.upload_state()
    with pytest.raises(IncompleteStage, match="shards"):
        local_job_dir(f"file://{tmp_path}/bucket/job", required=["shards"])
