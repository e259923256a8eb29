"""Which device a piece of work runs on: decided once per task, by whoever scheduled it.

A leaf module (no torch, no Ray import at module level), so stages read the decision without
importing the runtime. Under Ray, the runtime sets the device of each task from the GPUs Ray
assigned it (``ray.get_gpu_ids()``) with :func:`set_current_device`; outside Ray (tests, the CLI's
local commands, notebooks) :func:`current_device` falls back to the first visible GPU, if any.

``KNN_DEFENSE_FAKE_CUDA=1`` makes :func:`cuda_available` answer True without touching CUDA: the
only way a test on a CPU machine can check what a Ray worker *would* decide (a monkeypatch in
the test process does not reach the workers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

FAKE_CUDA_ENV = "KNN_DEFENSE_FAKE_CUDA"

_current: str | None = None
_gpu_share: float = 1.0


def cuda_available() -> bool:
    """Whether torch can use a GPU here (or ``KNN_DEFENSE_FAKE_CUDA=1`` says to pretend so)."""
    if os.environ.get(FAKE_CUDA_ENV) == "1":
        return True
    import torch

    return torch.cuda.is_available()


def task_device(gpu_ids: Sequence | None, cuda_is_available: bool) -> str:
    """The device a task uses: ``"cuda:0"`` when it was assigned GPUs (Ray makes the assigned
    ones the only visible ones, so the first is ordinal 0) and CUDA works, ``"cpu"`` when it was
    assigned none, even if a GPU is visible (using it would be unaccounted for). ``gpu_ids=None``
    means no scheduler decided (not under Ray): use a GPU if there is one."""
    if gpu_ids is None:
        return "cuda:0" if cuda_is_available else "cpu"
    if len(gpu_ids) == 0:
        return "cpu"
    if not cuda_is_available:
        raise RuntimeError(f"Ray assigned GPU(s) {list(gpu_ids)} to this task but torch sees no "
                           "CUDA device: check the node's driver and the torch build (CUDA 13)")
    return "cuda:0"


def set_current_device(device: str | None, gpu_share: float = 1.0) -> None:
    """Set by the runtime around each task (None: undecided, :func:`current_device` probes).
    ``gpu_share``: the fraction of the GPU the task was given (Ray's ``num_gpus`` below 1), so
    memory-sized choices (the auto batch size) leave the rest to the tasks it shares with."""
    global _current, _gpu_share
    _current, _gpu_share = device, gpu_share


def current_device() -> str:
    """The device decided for the work running in this process now."""
    if _current is not None:
        return _current
    return task_device(None, cuda_available())


def current_gpu_share() -> float:
    """The fraction of the current GPU this work may use (1.0 unless the runtime said less)."""
    return _gpu_share
