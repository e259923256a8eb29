"""Random noise of an attack's norm: the control every robustness evaluation should pass."""

from __future__ import annotations

import torch

from pipeline.attacks.gradient import fill_budget_step
from pipeline.attacks.projection import budget_eps


def random_noise(x: torch.Tensor, budget: float, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random direction per image (a normalised Gaussian), stepped as far as the
    budget allows inside the [0, 1] box (:func:`fill_budget_step`), so it has the norm an attack
    of ``budget`` would have."""
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return fill_budget_step(x, direction, budget_eps(x, budget))
