"""cluster/: the launcher YAML, the KubeRay manifests and the image agree with pyproject's pins,
with each other, with the Ray the code runs on, and with what the ImageNet job specs ask for."""

import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.validate import load_job

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster"


def _pins() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["gpu"]
    return {Requirement(r).name: Requirement(r) for r in reqs}


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def _kuberay() -> dict:
    return {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text())}


def _installs(commands: list[str]) -> dict[str, str]:
    """package -> pinned version of every `pip install pkg==x` in shell commands."""
    return dict(re.findall(r"([A-Za-z0-9_-]+)==([0-9][0-9.]*)", " ".join(commands)))


def _ray_version_of_image(image: str) -> str:
    match = re.fullmatch(r"rayproject/ray:([0-9.]+)-py311-gpu", image)
    assert match, image
    return match.group(1)


def _gpu_faiss() -> Requirement:
    """The one faiss build of the gpu extra, pinned exactly (the cluster installs that version)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    faiss = [Requirement(r) for r in project["optional-dependencies"]["gpu"]
             if Requirement(r).name.startswith("faiss")]
    assert len(faiss) == 1 and faiss[0].name.startswith("faiss-gpu"), faiss
    assert str(faiss[0].specifier).startswith("=="), faiss[0]
    return faiss[0]


def test_launcher_and_image_pin_what_pyproject_pins():
    pins = _pins()
    faiss = _gpu_faiss()
    launcher = _launcher()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for installs in (_installs(launcher["setup_commands"]), _installs(dockerfile.splitlines())):
        for name in ("torch", "torchvision"):
            assert f"=={installs[name]}" == str(pins[name].specifier), name
        # exactly the gpu extra's faiss build, no other (each provides `faiss`: never two)
        assert {n: v for n, v in installs.items() if n.startswith("faiss")} == {
            faiss.name: str(faiss.specifier).removeprefix("==")}
    assert "knn-defense[gpu]" in " ".join(launcher["setup_commands"])
    assert "[gpu]" in dockerfile


def test_gpu_nodes_need_the_driver_of_torchs_cuda_13(tmp_path):
    """torch 2.14.1 is a CUDA 13.0 build: the image asks the NVIDIA container runtime for CUDA >= 13.0
    and the launcher's host check refuses a GPU node whose driver is older than 580."""
    assert version("torch").startswith("2.14.1")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r'^ENV NVIDIA_REQUIRE_CUDA="cuda>=13\.0"$', dockerfile, re.M)
    check = next(c for c in _launcher()["initialization_commands"] if "nvidia-smi" in c)

    def run(driver: str | None):
        bin_dir = tmp_path / (driver or "none")
        bin_dir.mkdir()
        if driver:
            smi = bin_dir / "nvidia-smi"
            smi.write_text(f"#!/bin/sh\necho {driver}\n")
            smi.chmod(0o755)
            path = f"{bin_dir}:/usr/bin:/bin"
        else:
            path = str(bin_dir)  # a node without a GPU (head, memory workers): nothing to check
        return subprocess.run(["/bin/bash", "-c", check], env={"PATH": path}, capture_output=True, text=True)

    assert run(None).returncode == 0
    assert run("580.95.05").returncode == 0 and run("590.12").returncode == 0
    old = run("575.57.08")
    assert old.returncode != 0 and "needs >= 580" in old.stderr


def test_one_ray_version_everywhere_and_it_is_the_one_installed():
    launcher = _launcher()
    kuberay = _kuberay()
    docker_ray = _ray_version_of_image(re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1))
    versions = {_ray_version_of_image(launcher["docker"]["image"]), kuberay["RayCluster"]["spec"]["rayVersion"],
                docker_ray}
    assert versions == {version("ray")}  # a driver must run the cluster's Ray version
    assert _pins()["ray"].specifier.contains(version("ray"))


def test_launcher_nodes_gpu_workers_and_token_auth():
    launcher = _launcher()
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}  # drivers only
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["node_config"]["InstanceType"].startswith("g5.") for t in gpu)
    for commands in (launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=" in start
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", launcher["head_start_ray_commands"][1]).group(1)
    assert launcher["file_mounts"][token_path] == "~/.ray/auth_token"
    assert "--dashboard-host=0.0.0.0" in launcher["head_start_ray_commands"][1]


def test_kuberay_cluster_and_job():
    kuberay = _kuberay()
    cluster, job = kuberay["RayCluster"], kuberay["RayJob"]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    containers = [head["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth-token"
    images = {c["image"] for c in containers}
    assert len(images) == 1
    gpu_groups = [g for g in cluster["spec"]["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups and gpu_groups[0]["maxReplicas"] >= 1
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert job["spec"]["entrypoint"].startswith("knn-defense run /jobs/")
    assert "--address auto" in job["spec"]["entrypoint"]
    spec_file = ROOT / "jobs" / Path(job["spec"]["entrypoint"].split()[2]).name
    assert spec_file.is_file()  # the configmap made from jobs/ holds it
    submitter = {e["name"]: e for e in job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert submitter["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in submitter


def _memory_bytes(quantity) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Gi|Mi)?", str(quantity)).groups()
    return float(number) * {"Gi": 2**30, "Mi": 2**20, None: 1}[unit]


def _node_shapes() -> dict[str, list[dict]]:
    launcher = [t["resources"] for t in _launcher()["available_node_types"].values()]
    kuberay = []
    for group in _kuberay()["RayCluster"]["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        kuberay.append({"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0)),
                        "memory": _memory_bytes(limits["memory"])})
    return {"launcher": launcher, "kuberay": kuberay}


@pytest.mark.parametrize("job", ["imagenet-ig-targeted", "imagenet-ig-all"])
def test_every_stage_of_the_imagenet_jobs_fits_a_node_type(job):
    spec = load_job(ROOT / "jobs" / f"{job}.yaml", check_inputs=False)
    requested = spec.runtime.resources.requested()
    assert {"features", "index", "store"} <= {stage for stage, _ in requested}
    assert spec.runtime.resources.features.num_gpus == 1
    for config, shapes in _node_shapes().items():
        for stage, res in requested:
            want = res.ray_options()
            assert any(want.get("num_cpus", 0) <= s.get("CPU", 0)
                       and want.get("num_gpus", 0) <= s.get("GPU", 0)
                       and want.get("memory", 0) <= s.get("memory", 0) for s in shapes), (config, stage)
