"""A job folder at an fsspec URL (s3://, gs://, file://, memory://, ...).

Object stores have no atomic rename, and FAISS and LevelDB want a local disk. So the job runs in
a local *staging* folder exactly as it would locally; after each stage finishes, the driver
uploads that stage's outputs and then writes the stage's completion marker
``_complete/<stage>.json`` (the files, their sizes and mtimes) last. A consumer reads only stages
that have a marker, and only the files the marker lists; a stage being re-uploaded loses its
marker first. The manifest, job.yaml and summary.json are uploaded whole (temp name, then move).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.layout import JobLayout
from pipeline.runtime.manifest import Manifest

# What each stage writes inside the job folder (folders or files). The import stage writes its
# shards outside the job folder; verify writes nothing but gets a marker (it passed).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "shards": ("shards.parquet", "shards"), "subset": ("subset",), "train": ("model",),
    "transforms": ("transforms",), "features": ("features",), "index": ("index",),
    "store": ("store",), "verify": (), "evaluate": ("eval",),
}
MARKERS = "_complete"
MANIFEST = "manifest/manifest.sqlite"


class IncompleteStage(FileNotFoundError):
    """A consumer asked for a stage whose upload has no completion marker."""


def _local_name(url: str) -> str:
    url = url.rstrip("/")
    return f"{posixpath.basename(url) or 'job'}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def default_staging(url: str) -> Path:
    """Where the job at ``url`` runs locally unless runtime.staging_dir says otherwise (run and
    resume on one machine share it, so a resume picks up units that were not uploaded yet)."""
    return Path(tempfile.gettempdir()) / "knn-defense-staging" / _local_name(url)


def default_cache(url: str) -> Path:
    """Where readers (status, verify, classify, serve) keep their copy: never the staging folder,
    which a running job owns."""
    return Path(tempfile.gettempdir()) / "knn-defense-cache" / _local_name(url)


def _stage_of(manifest_stage: str) -> str:
    """Manifest stages are named '<job stage>' or '<job stage>.<step>[.<layer>]'."""
    return manifest_stage.split(".", 1)[0]


class RemoteJob:
    def __init__(self, url: str, staging: str | os.PathLike):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.staging = Path(staging)

    def _remote(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def _marker_path(self, stage: str) -> str:
        return self._remote(f"{MARKERS}/{stage}.json")

    # --- what is where ----------------------------------------------------------------------

    def local_files(self, stage: str) -> dict[str, list[int]]:
        """{relative path: [size, mtime_ns]} of the stage's outputs in the staging folder."""
        out = {}
        for item in STAGE_OUTPUTS[stage]:
            path = self.staging / item
            found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for f in found:
                if f.name.endswith(".tmp") or ".tmp." in f.name:  # a write in progress elsewhere
                    continue
                st = f.stat()
                out[f.relative_to(self.staging).as_posix()] = [st.st_size, st.st_mtime_ns]
        return out

    def marker(self, stage: str) -> dict | None:
        path = self._marker_path(stage)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def complete_stages(self) -> dict[str, dict]:
        """{stage: marker} of every stage with a completion marker."""
        out = {}
        for stage in STAGE_OUTPUTS:
            marker = self.marker(stage)
            if marker is not None:
                out[stage] = marker
        return out

    # --- writing ------------------------------------------------------------------------------

    def _put(self, local: str | os.PathLike, rel: str) -> None:
        remote = self._remote(rel)
        self.fs.makedirs(posixpath.dirname(remote), exist_ok=True)
        self.fs.put_file(str(local), remote)

    def _put_whole(self, data: bytes, rel: str) -> None:
        """One object written under a temp name and moved into place: readers never see half."""
        remote = self._remote(rel)
        tmp = f"{remote}.{uuid.uuid4().hex[:8]}.tmp"
        self.fs.makedirs(posixpath.dirname(remote), exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, remote)

    def upload_stage(self, stage: str) -> bool:
        """Upload a finished stage (files unchanged since its last marker are skipped), then its
        marker. Returns False when the marker already describes exactly these files."""
        files = self.local_files(stage)
        old = self.marker(stage)
        if old is not None and old["files"] == files:
            return False
        if old is not None:  # consumers stop reading the stage while it changes
            self.fs.rm(self._marker_path(stage))
        before = (old or {}).get("files", {})
        for rel, stat in files.items():
            if before.get(rel) != stat:
                self._put(self.staging / rel, rel)
        for rel in set(before) - set(files):  # outputs the new run no longer has
            if self.fs.exists(self._remote(rel)):
                self.fs.rm(self._remote(rel))
        marker = {"stage": stage, "files": files, "uploaded": time.time()}
        self._put_whole(json.dumps(marker, sort_keys=True).encode(), f"{MARKERS}/{stage}.json")
        return True

    def upload_state(self, manifest: Manifest | None = None) -> None:
        """job.yaml, summary.json and a consistent snapshot of the manifest."""
        for rel in ("job.yaml", "summary.json"):
            path = self.staging / rel
            if path.is_file():
                self._put_whole(path.read_bytes(), rel)
        if manifest is not None:
            with tempfile.TemporaryDirectory() as tmp:
                snap = Path(tmp) / "manifest.sqlite"
                manifest.snapshot(snap)
                self._put_whole(snap.read_bytes(), MANIFEST)

    # --- reading -------------------------------------------------------------------------------

    def _get(self, rel: str, stat: list[int] | None = None) -> None:
        local = self.staging / rel
        if stat is not None and local.is_file():
            st = local.stat()
            if [st.st_size, st.st_mtime_ns] == stat:
                return  # already here
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + f".{uuid.uuid4().hex[:8]}.tmp")
        self.fs.get_file(self._remote(rel), str(tmp))
        os.replace(tmp, local)
        if stat is not None:  # same mtime as when uploaded: the next upload skips it
            os.utime(local, ns=(stat[1], stat[1]))

    def read_text(self, rel: str) -> str:
        return self.fs.cat_file(self._remote(rel)).decode()

    def has_job(self) -> bool:
        return self.fs.exists(self._remote("job.yaml"))

    def fetch_state(self) -> None:
        """job.yaml, summary.json and the manifest (what `status` needs)."""
        for rel in ("job.yaml", "summary.json", MANIFEST):
            if self.fs.exists(self._remote(rel)):
                self._get(rel)

    def fetch(self, stages: list[str] | None = None, required: list[str] = ()) -> list[str]:
        """Download the outputs of complete stages (those in ``stages``, default all) and the
        job's state into the staging folder; the manifest forgets units of stages without a
        marker, whose outputs were never uploaded. Raises IncompleteStage for a ``required``
        stage without a marker. Returns the stages fetched."""
        complete = self.complete_stages()
        missing = [s for s in required if s not in complete]
        if missing:
            raise IncompleteStage(f"{self.url}: stage(s) {missing} have no completion marker "
                                  f"({MARKERS}/<stage>.json): not finished or not uploaded yet")
        self.fetch_state()
        fetched = []
        for stage, marker in complete.items():
            if stages is not None and stage not in stages:
                continue
            for rel, stat in marker["files"].items():
                self._get(rel, stat)
            fetched.append(stage)
        manifest_path = JobLayout(self.staging).manifest
        if manifest_path.is_file():
            manifest = Manifest(manifest_path)
            try:
                manifest.reset_stages(lambda s: _stage_of(s) in complete)
            finally:
                manifest.close()
        return fetched


def local_job_dir(job_dir: str, required: list[str] = ()) -> Path:
    """A job folder to read: the path itself, or for a URL a local copy of its complete stages."""
    from pipeline.config import is_url

    if not is_url(job_dir):
        return Path(job_dir)
    remote = RemoteJob(job_dir, default_cache(job_dir))
    if not remote.has_job():
        raise FileNotFoundError(f"{job_dir}: not a job folder (no job.yaml)")
    remote.fetch(required=list(required))
    return remote.staging
