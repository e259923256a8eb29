"""Ray decides devices: a unit uses cuda:0 when Ray assigned it a GPU and the CPU otherwise,
even on a node whose GPUs are visible; a unit given no GPU never probes CUDA and sees none
(CUDA_VISIBLE_DEVICES=""). The Ray test declares a fake GPU (`ray.init(num_gpus=1)`) and sets
KNN_DEFENSE_FAKE_CUDA=1 in the workers, so it runs on a CPU-only machine."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import devices
from pipeline.devices import task_device
from tests.ray_procs import loopback_env, run_script

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(("gpu_ids", "cuda", "expected"), [
    (None, True, "cuda:0"),   # not under Ray: the first visible GPU
    (None, False, "cpu"),
    ([], True, "cpu"),        # Ray gave none: a visible GPU would be unaccounted for
    ([], False, "cpu"),
    (["0"], True, "cuda:0"),
    (["3"], True, "cuda:0"),  # Ray makes the assigned GPU the only visible one: ordinal 0
    ([1, 2], True, "cuda:0"),
])
def test_task_device(gpu_ids, cuda, expected):
    assert task_device(gpu_ids, cuda) == expected


def test_a_gpu_assigned_where_torch_sees_none_is_an_error():
    with pytest.raises(RuntimeError, match=r"assigned GPU\(s\) \['0'\]"):
        task_device(["0"], False)


def test_a_unit_given_no_gpu_never_probes_cuda_and_sees_no_gpu(monkeypatch):
    """The runner's wrapper, with Ray's answers stubbed: no CUDA probe (it would initialise
    CUDA in the worker), GPUs hidden during the unit, environment and device restored after."""
    import ray

    from pipeline.runtime import ray_runner

    def no_probe():
        raise AssertionError("a unit given no GPU probed CUDA")

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(devices, "cuda_available", no_probe)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # a worker that inherited the node's GPUs
    seen = ray_runner._call(lambda: (devices.current_device(), os.environ["CUDA_VISIBLE_DEVICES"]), (), {})
    assert seen == (("cpu", ""), "node")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert devices._current is None


PROBE_SCRIPT = r"""
import json, os, sys

import ray

from pipeline.runtime.manifest import Manifest
from pipeline.runtime.ray_runner import Unit, ray_session, run_units


def probe():
    import os

    import ray

    from pipeline.devices import current_device, current_gpu_share

    return {"device": current_device(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "share": current_gpu_share()}


def visible():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


out = {}
with ray_session(num_cpus=2, num_gpus=1, env_vars={"KNN_DEFENSE_FAKE_CUDA": "1"}):
    manifest = Manifest(os.path.join(sys.argv[1], "manifest.sqlite"))
    for actors in (False, True):
        for gpus in (1, 0.5, 0):
            report = run_units(manifest, f"probe-{actors}-{gpus}", [Unit("u", probe)], "fp",
                               num_gpus=gpus, actors=actors, progress=False, collect=True)
            out[f"{'actor' if actors else 'task'} num_gpus={gpus}"] = report.results["u"]
    # Ray itself, without the runner's wrapper: the workers' RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1
    # (ray_runner.WORKER_ENV) hides the node's GPUs from a task given none; without it Ray 2.60
    # leaves the inherited CUDA_VISIBLE_DEVICES
    bare = ray.remote(num_gpus=0)(visible)
    out["bare"] = ray.get(bare.remote())
    out["bare, override off"] = ray.get(bare.options(
        runtime_env={"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}}).remote())
    manifest.close()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_ray_assigns_the_device_of_tasks_and_actors(tmp_path):
    # a GPU node's environment: every worker inherits both GPUs unless Ray narrows it
    env = loopback_env(CUDA_VISIBLE_DEVICES="0,1")
    env.pop("KNN_DEFENSE_FAKE_CUDA", None)  # only the workers pretend (runtime_env)
    code, out, err = run_script(["-c", PROBE_SCRIPT, str(tmp_path)], env, 240, cwd=ROOT)
    assert code == 0, err[-3000:]
    seen = json.loads(out.strip().splitlines()[-1])
    for kind in ("task", "actor"):
        assert seen[f"{kind} num_gpus=1"] == {"device": "cuda:0", "gpu_ids": ["0"], "visible": "0",
                                              "share": 1.0}
        # half a GPU: the same device, and memory-sized choices keep to half of it
        assert seen[f"{kind} num_gpus=0.5"] == {"device": "cuda:0", "gpu_ids": ["0"],
                                                "visible": "0", "share": 0.5}
        assert seen[f"{kind} num_gpus=0"] == {"device": "cpu", "gpu_ids": [], "visible": "",
                                              "share": 1.0}
    assert seen["bare"] == ""
    assert seen["bare, override off"] == "0,1"
