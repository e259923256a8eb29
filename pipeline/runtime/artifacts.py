"""Loading a finished job folder's parts, refusing folders whose recorded hashes disagree."""

from __future__ import annotations

import os

import yaml

from pipeline.config import parse_job
from pipeline.features.backbones import file_sha256, load_model
from pipeline.features.stack import load_stack, stack_hash
from pipeline.index.faiss_index import load_index
from pipeline.layout import JobLayout, read_json
from pipeline.store.softmax_store import SoftmaxStore


class InconsistentJob(RuntimeError):
    pass


def load_spec(job_dir: str | os.PathLike):
    layout = JobLayout(job_dir)
    if not layout.job_yaml.is_file():
        raise FileNotFoundError(f"{job_dir}: not a job folder (no job.yaml); run `knn-defense run` first")
    raw = yaml.safe_load(layout.job_yaml.read_text())
    raw.pop("code_version", None)
    return parse_job(raw, str(layout.job_yaml))


def check_hashes(layout: JobLayout, layers) -> dict:
    """Recompute and cross-check the hashes recorded by each stage; returns model info."""
    model_info = read_json(layout.model_info, "run the train stage")
    model_info["path"] = str(layout.root / model_info["path"])  # relative inside the job folder
    actual = file_sha256(model_info["path"])
    if actual != model_info["sha256"]:
        raise InconsistentJob(f"{model_info['path']}: weights changed since the job ran "
                              f"(sha256 {actual[:12]} != recorded {model_info['sha256'][:12]})")
    transforms = read_json(layout.transforms_info, "run the transforms stage")
    if transforms["weights_sha256"] != actual:
        raise InconsistentJob(f"{layout.transforms_info}: fitted with other weights; re-run the job")
    store_info = read_json(layout.store_info, "run the store stage")
    if store_info["weights_sha256"] != actual:
        raise InconsistentJob(f"{layout.store_info}: softmax store built with other weights")
    for layer in layers:
        sha = stack_hash(layout.transform_dir(layer))
        if sha != transforms["files"][layer]:
            raise InconsistentJob(f"{layout.transform_dir(layer)}: changed since the job ran")
        info = read_json(layout.index_info(layer), "run the index stage")
        if info["transform_sha256"] != sha or info["weights_sha256"] != actual:
            raise InconsistentJob(f"{layout.index_info(layer)}: index built from other features")
    return model_info


def load_defense_parts(job_dir: str | os.PathLike, layers=None) -> dict:
    """Everything DefendedClassifier needs, from a job folder."""
    spec = load_spec(job_dir)
    layout = JobLayout(job_dir)
    layers = list(layers or spec.features.layers)
    model_info = check_hashes(layout, layers)
    model = load_model(spec.model, model_info["path"])
    transforms = {name: load_stack(layout.transform_dir(name)) for name in layers}
    indexes = {name: load_index(layout.merged_index(name), spec.index.nprobe) for name in layers}
    store = SoftmaxStore(layout.store_dir, spec.store.partitions)
    return {"spec": spec, "model": model, "transforms": transforms, "indexes": indexes, "store": store}
