"""Running an experiment file (``knn-defense evaluate EXP.yaml``): build the job and its database
variants through the job runner (Ray), like make, then evaluate them in this process with
pipeline/evaluate/experiment.py, which only reads finished job folders."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.evaluate.experiment import ExperimentSpec, evaluate_job, evaluate_model, variant_job
from pipeline.layout import JobLayout, read_json
from pipeline.runtime.job import run_job
from pipeline.runtime.ray_runner import ray_session
from pipeline.validate import load_job


def build_databases(exp: ExperimentSpec, address: str | None = None, num_cpus: int | None = None,
                    progress: bool = True) -> list[tuple[str, str]]:
    """Run the job (and each database variant) through ``verify``; [(label, job_dir)]."""
    job_spec = load_job(exp.job)
    out = []
    with ray_session(address or job_spec.runtime.address, num_cpus or job_spec.runtime.num_cpus):
        run_job(job_spec, until="verify", progress=progress, check_inputs=False)
        layout = JobLayout(job_spec.output_dir)
        weights = str(layout.root / read_json(layout.model_info)["path"])
        if exp.include_job_database:
            out.append((job_spec.name, job_spec.output_dir))
        for variant in exp.databases:
            spec = variant_job(job_spec, variant, exp, weights)
            run_job(spec, until="verify", progress=progress, check_inputs=False)
            out.append((variant.name, spec.output_dir))
    return out


def run_experiment(exp: ExperimentSpec, address: str | None = None, num_cpus: int | None = None,
                   progress: bool = True) -> dict:
    """Build what the experiment needs (Ray), then evaluate it here; writes the experiment's
    output_dir (experiment.yaml, sets/, cells/, results.csv, attacks.csv, tables.md, plots)."""
    out = Path(exp.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False))
    if exp.job is None:
        return evaluate_model(exp, num_cpus, progress)
    databases = build_databases(exp, address, num_cpus, progress)
    job_dir = databases[0][1] if exp.include_job_database else _job_dir(exp)
    extra = databases[1:] if exp.include_job_database else databases
    return evaluate_job(job_dir, out, exp.evaluate, extra, exp.include_job_database,
                        num_cpus or os.cpu_count(), progress, title=exp.name)


def _job_dir(exp: ExperimentSpec) -> str:
    return load_job(exp.job).output_dir
