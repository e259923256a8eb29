"""Jobs on a Ray cluster through the Ray Jobs API (the dashboard's HTTP port, 8265).

`submit` ships this package as the job's ``py_modules`` and a folder holding the job spec as its
``working_dir`` (torch, faiss and the other dependencies come from the cluster's image, see
cluster/), and runs ``python -m pipeline.cli run job.yaml --address auto`` as the job's driver on
the head node: the shipped package comes first on the driver's and workers' import path, so the
cluster runs exactly the code that was submitted. Every request carries the cluster's token.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

import pipeline
from pipeline.config import ConfigError, JobSpec, is_url
from pipeline.runtime.auth import auth_headers
from pipeline.runtime.ray_runner import WORKER_ENV

ADDRESS_ENV = "RAY_ADDRESS"
# Never shipped: bytecode caches (the cluster's Python compiles its own).
_EXCLUDES = ["__pycache__", "*.pyc"]


def is_jobs_address(address: str | None) -> bool:
    """A Jobs API (dashboard) address, as opposed to a Ray address for ray.init."""
    return bool(address) and address.startswith(("http://", "https://"))


def jobs_address(address: str | None) -> str:
    address = address or os.environ.get(ADDRESS_ENV)
    if not is_jobs_address(address):
        raise ConfigError("the Ray Jobs API needs the dashboard address: pass --address "
                          f"http://HEAD:8265 or set ${ADDRESS_ENV} to it"
                          + (f" (got {address!r})" if address else ""))
    return address


@contextlib.contextmanager
def jobs_api_errors(address: str):
    """Jobs API failures as one-line ConfigErrors: nobody there, token rejected, no such job."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except ConnectionError as err:
        raise ConfigError(f"{address}: no Ray dashboard answers there ({_first_line(err)})") from None
    except AuthenticationError as err:
        raise ConfigError(f"{address}: the cluster rejected the request: {_first_line(err)} "
                          "(is the token the cluster's? on the head: ray get-auth-token)") from None
    except RuntimeError as err:
        if "status code 404" in str(err):
            raise ConfigError(f"{address}: {_first_line(err)}") from None
        raise


def jobs_client(address: str | None, client_factory: Callable | None = None):
    """A JobSubmissionClient for ``address`` (or $RAY_ADDRESS) that sends the cluster's token."""
    if client_factory is None:
        from ray.job_submission import JobSubmissionClient as client_factory
    address = jobs_address(address)
    headers = auth_headers()
    with jobs_api_errors(address):
        return client_factory(address, headers=headers)


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def relative_paths(spec: JobSpec) -> list[str]:
    """Keys holding relative local paths: on the cluster they would resolve inside the job's
    temporary working directory, so a submitted spec must use absolute paths or URLs."""
    candidates = {"output_dir": spec.output_dir, "data.database": spec.data.database,
                  "data.queries": spec.data.queries, "model.weights": spec.model.weights,
                  "runtime.staging_dir": spec.runtime.staging_dir}
    if spec.data.fashion_mnist is not None:
        candidates["data.fashion_mnist.source_dir"] = spec.data.fashion_mnist.source_dir
        candidates["data.fashion_mnist.out_dir"] = spec.data.fashion_mnist.out_dir
    if spec.subset is not None:
        candidates["subset.vocabulary"] = spec.subset.vocabulary
    bad = []
    for key, value in candidates.items():
        for path in value if isinstance(value, list) else [value]:
            if path and path != "random" and not is_url(path) and not os.path.isabs(path):
                bad.append(f"{key} {path!r} is relative: a submitted job needs absolute paths or "
                           "URLs on storage the cluster sees")
                break
    return bad


def runtime_env(working_dir: str | os.PathLike) -> dict:
    return {"working_dir": str(working_dir),
            "py_modules": [str(Path(pipeline.__file__).parent)],
            "excludes": _EXCLUDES,
            "env_vars": dict(WORKER_ENV)}


def _entrypoint(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in ["python", "-m", "pipeline.cli", *command])


def submit(client, command: list[str], name: str, files: dict[str, str] | None = None,
           metadata: dict | None = None) -> str:
    """Submit ``python -m pipeline.cli <command>`` with ``files`` ({name: text}) in its working
    directory; returns the submission id."""
    with tempfile.TemporaryDirectory(prefix="knn-defense-submit-") as workdir:
        for filename, text in (files or {}).items():
            Path(workdir, filename).write_text(text)
        submission_id = f"knn-defense-{name}-{uuid.uuid4().hex[:8]}"
        return client.submit_job(entrypoint=_entrypoint(command), runtime_env=runtime_env(workdir),
                                 submission_id=submission_id,
                                 metadata={"knn_defense_job": name, **(metadata or {})})


def submit_run(client, spec: JobSpec, until: str | None = None) -> str:
    """Submit a validated job spec (written out resolved, overrides included)."""
    problems = relative_paths(spec)
    if problems:
        raise ConfigError.listing(f"job {spec.name}", problems)
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    command = ["run", "job.yaml", "--address", "auto", "--no-progress"]
    if until:
        command += ["--until", until]
    return submit(client, command, spec.name, {"job.yaml": text},
                  {"output_dir": str(spec.output_dir)})


def submit_resume(client, job_dir: str) -> str:
    """Submit `resume JOB_DIR` (a folder the cluster sees, or a URL)."""
    if not is_url(job_dir) and not os.path.isabs(job_dir):
        raise ConfigError(f"{job_dir}: a job folder resumed on a cluster must be an absolute path "
                          "or URL that the cluster sees")
    name = Path(job_dir.rstrip("/")).name or "job"
    return submit(client, ["resume", job_dir, "--address", "auto", "--no-progress"], name,
                  metadata={"output_dir": job_dir})


def job_status(client, job_id: str) -> dict:
    info = client.get_job_info(job_id)
    status = getattr(info.status, "value", str(info.status))
    return {"job_id": job_id, "status": status, "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time, "metadata": info.metadata or {}}


def follow_logs(client, job_id: str, write: Callable[[str], None]) -> None:
    """Stream a job's logs until it ends."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
