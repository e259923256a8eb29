"""Ray processes that a test starts itself, on 127.0.0.1 with ports and a temp dir of their own
(other Ray instances may run on the machine at the same time), stopped by process id.

`ray stop` is not used: it stops every Ray process on the machine, not only this test's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

# The ports a head node listens on; each gets a free one (workers take random ports).
_HEAD_PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port",
               "node-manager-port", "object-manager-port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def loopback_env(**extra) -> dict:
    """The environment for a Ray process of a test: loopback only, this venv's python first."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **extra)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def run_script(args: list[str], env: dict, timeout: float, cwd=None) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of a Python process started in its own session (so its Ray
    processes are its children), its whole tree stopped afterwards even on a timeout."""
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop_process_tree(proc, grace=5)
    return proc.returncode, out, err


def stop_process_tree(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM ``proc`` (and let it stop its children), then SIGKILL whatever of its process
    tree is left, by pid."""
    try:
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = [proc.pid]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    kill_pids(tree)
    if proc.poll() is None:
        proc.wait(10)


def kill_pids(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def token_file():
    """A fresh Ray auth token in a file of its own (never ~/.ray/auth_token)."""
    folder = Path(tempfile.mkdtemp(prefix="ray-wt-token-"))
    path = folder / "auth_token"
    path.write_text(secrets.token_hex(32))
    try:
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def ray_head(token_path: Path, num_cpus: int = 2, timeout: float = 180.0):
    """`ray start --head --block` on 127.0.0.1 with token auth; yields the dashboard URL."""
    ports = dict(zip(_HEAD_PORTS, free_ports(len(_HEAD_PORTS)), strict=True))
    # short: Ray puts Unix sockets under it (108-byte path limit)
    temp_dir = tempfile.mkdtemp(prefix="ray-wt-", dir="/tmp")
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed below
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats",
           *(f"--{name}={port}" for name, port in ports.items())]
    env = loopback_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    env.pop("RAY_AUTH_TOKEN", None)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        headers = {"Authorization": f"Bearer {token_path.read_text().strip()}"}
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}: "
                                   f"{(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/api/version", headers=headers, timeout=5).ok:
                    break
            if time.time() > deadline:
                raise TimeoutError(f"no dashboard at {url} after {timeout:.0f}s")
            time.sleep(1)
        yield url
    finally:
        stop_process_tree(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
