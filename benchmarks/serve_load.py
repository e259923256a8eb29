"""Bounded loopback load test of the HTTP query service (``POST /classify``).

What is measured: ``--requests`` POST /classify requests (default 2,000; ``--quick`` 100), each a
multipart body with one PNG image (Fashion-MNIST test images, 28x28 grey; the server converts
and resizes them to its model's input), sent by ``--concurrency`` (default 16) concurrent
``httpx.AsyncClient`` workers over 127.0.0.1, the whole run bounded by ``--total-timeout``
seconds (unsent or unfinished requests then count as errors). Reported: latency p50/p90/p99/
mean/max (ms, per request, client side, from send to parsed response), requests/s (completed
requests / wall time of the load phase), errors (non-200 status, bad body, transport error or
timeout; must be 0), and the server's micro-batcher counters over the load phase (batches run,
requests and images run, mean requests per batch) from ``GET /info``'s ``batching`` field (and
``app.state.batcher.stats()`` in-process). One untimed warm-up request precedes the load.

Server under test:

* default: an in-process ``uvicorn`` server on 127.0.0.1 with a free port (port 0), in a
  background thread, serving ``create_app(defense)`` for a small DefendedClassifier built here
  as tests/test_serve.py's fixture does, only larger: a random-init SmallResNet (widths
  32/64/128, blocks 2/2/2), layer conv_4_2, PCA-64, an exact ``IndexIDMap2(IndexFlatL2)`` over
  ``--db-size`` Fashion-MNIST train images (default 10,000; quick 2,000; ids from ``make_ids``
  over 10 shards), a 2-partition float16 LevelDB store, K=50, CBW-D. The client runs in the same
  process (it shares the GIL and the 2 cores with the server: latencies are upper bounds).
* ``--job DIR``: ``knn-defense serve --job DIR --port <free port>`` as a subprocess (loopback),
  stopped with SIGTERM at the end.

Only 127.0.0.1 is used. Writes benchmarks/results/serve_load.json (quick: serve_load_quick.json)
and prints it. CLI: ``python benchmarks/serve_load.py [--quick] [--job DIR] [--requests N]
[--concurrency C] [--total-timeout S] [--batch-window-ms MS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from pipeline.config import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_ENV  # noqa: E402
from pipeline.data.fashion_mnist import encode_image, load_split  # noqa: E402

HOST = "127.0.0.1"
LAYER = "conv_4_2"


def build_defense(db_size: int, source_dir: str, workdir: Path):
    """A small DefendedClassifier over real Fashion-MNIST train images (random-init model)."""
    import faiss
    import torch

    from pipeline.defense.classifier import DefendedClassifier
    from pipeline.features.backbones import SmallResNet, images_to_tensor
    from pipeline.features.extract import forward_features
    from pipeline.features.stack import LayerTransform
    from pipeline.features.transforms import fit_pca
    from pipeline.ids import make_ids, partition
    from pipeline.store.softmax_store import SoftmaxStore, write_partition

    torch.manual_seed(0)
    model = SmallResNet().eval()
    train, _ = load_split(source_dir, "train")
    images = train[:db_size, :, :, None]
    pooled, softmax = [], []
    for s in range(0, len(images), 512):
        p, sm = forward_features(model, images_to_tensor(images[s:s + 512]), [LAYER])
        pooled.append(p[LAYER])
        softmax.append(sm)
    pooled, softmax = np.concatenate(pooled), np.concatenate(softmax)
    transform = LayerTransform("avg", fit_pca(pooled, 64))
    shards = 10
    per = -(-len(images) // shards)
    ids = np.concatenate([make_ids(s, np.arange(min(per, len(images) - s * per)))
                          for s in range(shards) if s * per < len(images)])
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(transform.dim))
    index.add_with_ids(transform.query_vectors(pooled), ids)
    parts = partition(ids, 2)
    for p in range(2):
        write_partition(workdir, p, iter([(ids[parts == p], softmax[parts == p])]))
    store = SoftmaxStore(workdir, 2)
    defense = DefendedClassifier(model, {LAYER: transform}, {LAYER: index}, store, layer=LAYER,
                                 weighting="cbw_d", k=50, batch_size=256)
    info = {"model": "SmallResNet(32,64,128; 2,2,2) random init", "layer": LAYER, "pca_dim": 64,
            "index": "IndexIDMap2(IndexFlatL2) exact", "database_images": int(len(ids)),
            "store": "LevelDB float16, 2 partitions", "k": 50, "weighting": "cbw_d"}
    return defense, info


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class InProcessServer:
    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        assert host == HOST, host
        return f"http://{HOST}:{port}"

    def stop(self) -> bool:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        return not self.thread.is_alive()


class JobServer:
    def __init__(self, job_dir: str, batch_window_ms: float):
        self.job_dir, self.window = job_dir, batch_window_ms
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> str:
        port = free_port()
        exe = Path(sys.executable).with_name("knn-defense")
        cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]) + [
            "serve", "--job", self.job_dir, "--host", HOST, "--port", str(port),
            "--batch-window-ms", str(self.window)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        base = f"http://{HOST}:{port}"
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=base, timeout=5, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"knn-defense serve exited with {self.proc.returncode}")
                try:
                    if client.get("/healthz").status_code == 200:
                        return base
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"server on {base} not healthy after {timeout} s")

    def stop(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return True
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return True


async def load(base: str, pngs: list[bytes], requests: int, concurrency: int,
               total_timeout: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    statuses: dict[int, int] = {}
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def post(client, i: int):
        files = [("images", (f"q{i}.png", pngs[i % len(pngs)], "image/png"))]
        return await client.post("/classify", files=files)

    async def worker(client):
        nonlocal next_i
        while next_i < requests:
            i = next_i
            next_i += 1
            t = time.perf_counter()
            try:
                r = await post(client, i)
                body = r.json() if r.status_code == 200 else None
                elapsed = time.perf_counter() - t
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                elif len(body.get("results", [])) != 1:
                    errors.append(f"bad body: {str(body)[:200]}")
                else:
                    latencies.append(elapsed)
            except Exception as exn:  # transport errors, timeouts
                errors.append(f"{type(exn).__name__}: {exn}"[:200])

    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits,
                                 trust_env=False) as client:
        r = await post(client, 0)  # warm-up, untimed
        r.raise_for_status()
        before = (await client.get("/info")).json()["batching"]
        t = time.perf_counter()
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=total_timeout)
        timed_out = bool(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t
        after = (await client.get("/info")).json()["batching"]
    missing = requests - len(latencies) - len(errors)
    if missing > 0:
        errors += [f"not completed within --total-timeout {total_timeout} s"] * missing
    lat = np.asarray(latencies) * 1000
    batching = {k: after[k] - before[k] for k in after}
    if batching.get("batches_run"):
        batching["mean_requests_per_batch"] = round(batching["requests_run"]
                                                    / batching["batches_run"], 2)
    pct = (lambda p: round(float(np.percentile(lat, p)), 1)) if len(lat) else (lambda p: None)
    return {"requests": requests, "completed_ok": len(latencies), "errors": len(errors),
            "error_samples": sorted(set(errors))[:5], "status_counts": statuses,
            "timed_out": timed_out, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2) if wall else None,
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99),
                           "mean": round(float(lat.mean()), 1) if len(lat) else None,
                           "max": round(float(lat.max()), 1) if len(lat) else None},
            "batcher": batching}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (100 requests)")
    ap.add_argument("--job", help="serve this finished job folder with `knn-defense serve` "
                                  "(subprocess) instead of the in-process default")
    ap.add_argument("--requests", type=int, help="default 2000; quick 100")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--total-timeout", type=float, help="seconds (default 600; quick 60)")
    ap.add_argument("--db-size", type=int, help="in-process database images (default 10000; "
                                                "quick 2000)")
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--fashion-dir", default=os.environ.get(FASHION_MNIST_ENV,
                                                            DEFAULT_FASHION_MNIST_DIR))
    ap.add_argument("--out", help="result JSON path")
    args = ap.parse_args()
    q = args.quick
    requests = args.requests or (100 if q else 2000)
    total_timeout = args.total_timeout or (60.0 if q else 600.0)
    db_size = args.db_size or (2000 if q else 10_000)
    out_path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / ("serve_load_quick.json" if q else "serve_load.json"))
    started = time.perf_counter()
    test, _ = load_split(args.fashion_dir, "test")
    pngs = [encode_image(im, "png") for im in test[:500]]
    workdir = Path(tempfile.mkdtemp(prefix="knn-serve-load-", dir="/tmp"))
    server, defense, app, stopped = None, None, None, None
    try:
        if args.job:
            server = JobServer(args.job, args.batch_window_ms)
            target = {"job": str(Path(args.job).resolve()), "server": "knn-defense serve "
                      "subprocess"}
        else:
            from pipeline.serve.app import create_app

            t = time.perf_counter()
            defense, target = build_defense(db_size, args.fashion_dir, workdir / "store")
            target["build_s"] = round(time.perf_counter() - t, 2)
            target["server"] = "uvicorn in a background thread of this process"
            app = create_app(defense, batch_window_ms=args.batch_window_ms)
            server = InProcessServer(app)
        base = server.start()
        result = asyncio.run(load(base, pngs, requests, args.concurrency, total_timeout))
        if app is not None:
            result["batcher_in_process_totals"] = app.state.batcher.stats()
    finally:
        if server is not None:
            stopped = server.stop()
        if defense is not None:
            defense.store.close()
        shutil.rmtree(workdir, ignore_errors=True)
    doc = {
        "benchmark": "serve load (loopback)", "mode": "quick" if q else "full",
        "measures": "client-side latency and throughput of POST /classify (one PNG per request) "
                    "at fixed concurrency over 127.0.0.1, errors, and the micro-batcher's "
                    "batches vs requests",
        "config": {"requests": requests, "concurrency": args.concurrency,
                   "total_timeout_s": total_timeout, "batch_window_ms": args.batch_window_ms,
                   "images": "Fashion-MNIST test[:500] PNG, 28x28 grey, cycled",
                   "host": HOST, "client": f"httpx {httpx.__version__} AsyncClient"},
        "target": target,
        "result": result,
        "errors_ok": result["errors"] == 0,
        "server_stopped": stopped,
        "total_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
