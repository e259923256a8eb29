"""Scheduling overhead and driver memory of `run_units` (the runner every stage goes through).

overhead  = wall time of a stage of 1,000 trivial shards (each ~0.2 ms of numpy work) through
            run_units on a local Ray (retries, manifest records, bounded in-flight tasks)
            / the same 1,000 calls in one process; Ray's start-up is timed apart.
memory    = the driver's peak RSS (ru_maxrss) for stages of 10k and 100k trivial units, each
            in a fresh process: with backpressure (at most `max_in_flight` tasks submitted, units
            read lazily, records in SQLite) it must stay flat as the unit count grows 10x.

Writes benchmarks/results/scheduling.json.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERHEAD_UNITS = 1000
MEMORY_UNITS = (10_000, 100_000)
MAX_IN_FLIGHT = 256  # run_units' default


def trivial_shard(i: int) -> dict:
    """A fraction of a millisecond of work standing in for a shard."""
    import numpy as np

    x = np.arange(20_000, dtype=np.float64) + i
    return {"samples": 1, "checksum": float(np.sqrt(x).sum())}


def _units(n: int):
    from pipeline.runtime.ray_runner import Unit

    return (Unit(f"{i:07d}", trivial_shard, (i,)) for i in range(n))


def overhead(workdir: Path) -> dict:
    import ray

    from pipeline.runtime.manifest import Manifest
    from pipeline.runtime.ray_runner import ray_session, run_units

    t = time.perf_counter()
    for i in range(OVERHEAD_UNITS):
        trivial_shard(i)
    in_process = time.perf_counter() - t

    t = time.perf_counter()
    with ray_session(num_cpus=os.cpu_count()):
        ray.get([ray.remote(trivial_shard).remote(0) for _ in range(os.cpu_count())])  # warm workers
        startup = time.perf_counter() - t
        manifest = Manifest(workdir / "overhead.sqlite")
        t = time.perf_counter()
        report = run_units(manifest, "bench", _units(OVERHEAD_UNITS), "fp", total=OVERHEAD_UNITS,
                           progress=False, samples_key="samples")
        through_ray = time.perf_counter() - t
        manifest.close()
    assert report.done == OVERHEAD_UNITS
    return {"units": OVERHEAD_UNITS, "in_process_s": round(in_process, 3),
            "run_units_s": round(through_ray, 3), "ratio": round(through_ray / in_process, 1),
            "overhead_ms_per_unit": round(1000 * (through_ray - in_process) / OVERHEAD_UNITS, 2),
            "units_per_s": round(OVERHEAD_UNITS / through_ray), "ray_startup_s": round(startup, 1)}


def memory_child(n: int, workdir: str) -> None:
    """In a fresh process: one stage of ``n`` trivial units; prints the driver's peak RSS."""
    from pipeline.runtime.manifest import Manifest
    from pipeline.runtime.ray_runner import ray_session, run_units

    with ray_session(num_cpus=os.cpu_count()):
        manifest = Manifest(Path(workdir) / f"memory-{n}.sqlite")
        rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        report = run_units(manifest, "bench", _units(n), "fp", total=n, progress=False,
                           max_in_flight=MAX_IN_FLIGHT)
        seconds = time.perf_counter() - t
        manifest.close()
    print(json.dumps({"units": n, "done": report.done, "seconds": round(seconds, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "rss_after_ray_start_mb": round(rss_start / 1024, 1),
                      "manifest_mb": round(os.path.getsize(Path(workdir) / f"memory-{n}.sqlite") / 2**20, 1)}))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--memory-child":
        memory_child(int(sys.argv[2]), sys.argv[3])
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory() as tmp:
        result = {"benchmark": "scheduling", "cpus": os.cpu_count(), "python": platform.python_version(),
                  "max_in_flight": MAX_IN_FLIGHT, "overhead": overhead(Path(tmp)), "memory": []}
        print(json.dumps(result["overhead"]), flush=True)
        for n in MEMORY_UNITS:
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), tmp],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            result["memory"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(result["memory"][-1]), flush=True)
    small, big = result["memory"]
    result["peak_rss_growth_mb_10k_to_100k"] = round(big["peak_rss_mb"] - small["peak_rss_mb"], 1)
    out = ROOT / "benchmarks" / "results" / "scheduling.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
