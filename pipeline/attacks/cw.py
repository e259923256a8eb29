"""Carlini-Wagner L2 (untargeted), then the paper's per-image normalised budget.

CW minimises the perturbation instead of working inside a budget, so the budget is imposed
afterwards: the smallest successful perturbation found for each image is projected exactly onto
{||x* - x|| <= budget * ||x||} ∩ [0, 1]. ``info`` says how often CW alone already fitted.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.gradient import batch_view
from pipeline.attacks.projection import project_minimal


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Z_y - max_{i != y} Z_i per row (negative = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: float, steps: int = 100,
          lr: float = 0.01, binary_steps: int = 5, c_init: float = 1.0, kappa: float = 0.0
          ) -> tuple[torch.Tensor, dict]:
    """Untargeted CW-L2: Adam on w with x* = (tanh(w) + 1) / 2 (the box for free), minimising
    ||x* - x||^2 + c * max(Z_y - max_{i != y} Z_i, -kappa), binary search on c per image.

    Returns ``(x_adv, info)``; ``x_adv`` is the smallest successful perturbation per image (or,
    where CW never succeeded, the iterate with the lowest margin) projected onto the budget.
    ``info``: ``success_rate`` (CW found any adversarial image), ``under_budget_rate`` (its
    minimal one already had normalised L2 <= budget, before projection), ``achieved_l2`` (mean
    normalised L2 after projection), and per-image ``min_normalised_l2`` (inf: none found)
    and final ``c``.
    """
    minimal = cw_l2_minimal(model, x, y, steps, lr, binary_steps, c_init, kappa)
    return project_cw(minimal, x, budget)


def project_cw(minimal: dict, x: torch.Tensor, budget: float) -> tuple[torch.Tensor, dict]:
    """:func:`cw_l2`'s result for ``budget`` from one :func:`cw_l2_minimal` run: CW does not
    depend on the budget, so a budget sweep runs it once and projects per budget."""
    x_out, info = project_minimal(minimal, x, budget)
    return x_out, {**info, "min_normalised_l2": minimal["min_normalised_l2"], "c": minimal["c"]}


def cw_l2_minimal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 100,
                  lr: float = 0.01, binary_steps: int = 5, c_init: float = 1.0,
                  kappa: float = 0.0) -> dict:
    """The CW search itself: ``x`` = per image the smallest successful perturbation found
    (else the lowest-margin iterate), ``min_normalised_l2`` (inf where none succeeded), ``c``."""
    view = batch_view(x)
    x = x.detach()
    n = len(x)
    # atanh(2x - 1) is infinite at 0 and 1; the clamp moves saturated pixels by ~1e-6 at most.
    w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    c = torch.full((n,), c_init, dtype=x.dtype, device=x.device)
    lo = torch.zeros_like(c)
    hi = torch.full_like(c, float("inf"))
    best_l2sq = torch.full_like(c, float("inf"))
    best_adv = x.clone()
    fallback_margin = torch.full_like(c, float("inf"))
    fallback = x.clone()
    for _ in range(binary_steps):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(steps):
            with torch.enable_grad():
                x_adv = (torch.tanh(w) + 1) / 2
                logits = model(x_adv)
                margin = logit_margin(logits, y)
                l2sq = (x_adv - x).flatten(1).pow(2).sum(1)
                # Summed over images: Adam is per-coordinate, so images do not interact.
                loss = (l2sq + c * margin.clamp_min(-kappa)).sum()
                (w.grad,) = torch.autograd.grad(loss, w)
            with torch.no_grad():
                # Record this iterate (the logits belong to it) before Adam moves w.
                ok = (margin < 0) & (margin <= -kappa)
                succeeded |= ok
                better = ok & (l2sq < best_l2sq)
                best_l2sq = torch.where(better, l2sq, best_l2sq)
                best_adv = torch.where(better.view(view), x_adv, best_adv)
                closer = margin < fallback_margin
                fallback_margin = torch.where(closer, margin, fallback_margin)
                fallback = torch.where(closer.view(view), x_adv, fallback)
            opt.step()
        # Binary search on c: shrink it where CW succeeded (smaller perturbations), grow it
        # where it failed (x10 until an upper bound is known).
        hi = torch.where(succeeded, torch.minimum(hi, c), hi)
        lo = torch.where(succeeded, lo, torch.maximum(lo, c))
        c = torch.where(torch.isfinite(hi), (lo + hi) / 2, c * 10)

    found = torch.isfinite(best_l2sq)
    chosen = torch.where(found.view(view), best_adv, fallback)
    x_norm = x.flatten(1).norm(dim=1).clamp_min(1e-12)
    min_normalised = torch.where(found, best_l2sq.sqrt() / x_norm, torch.full_like(c, float("inf")))
    return {"x": chosen.detach(), "min_normalised_l2": min_normalised, "c": c}
