"""FGSM and I-FGSM (Goodfellow et al.; Kurakin et al.) under the paper's per-image normalised
L2 budget ||x* - x||_2 / ||x||_2 <= budget, pixels kept in [0, 1].

Also the small helpers the other attack modules share (unit-norm directions, per-image views).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.attacks.pgd import pgd_l2
from pipeline.attacks.projection import budget_eps, project_l2_box


def batch_view(x: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-image [N] tensor over an image batch [N, ...]."""
    return (-1,) + (1,) * (x.dim() - 1)


def l2_unit(g: torch.Tensor) -> torch.Tensor:
    """Each image's direction scaled to unit L2 norm (a zero direction stays zero)."""
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / n.view(batch_view(g))


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE(model(x), y) / dx. The loss is summed, so each image gets its own gradient
    (a batch mean would shrink it by N, which the L2 normalisation hides anyway)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fill_budget_step(x: torch.Tensor, direction: torch.Tensor, eps: torch.Tensor,
                     iters: int = 50, max_scale: float = 1e6) -> torch.Tensor:
    """argmax of <direction, x* - x> over {||x* - x|| <= eps} ∩ [0, 1]^d.

    By the KKT conditions the maximiser is clip(x + s * direction, 0, 1) for the largest s with
    ||x* - x|| <= eps (the norm grows monotonically with s), found by bisection on log s. Unlike
    "step eps, then clip", this spends the whole budget on pixels that are not saturated.
    """
    view = batch_view(x)
    d = l2_unit(direction)
    eps = eps.view(-1)

    def norm_at(log_s: torch.Tensor) -> torch.Tensor:
        y = (x + log_s.exp().view(view) * d).clamp(0, 1)
        return (y - x).flatten(1).norm(dim=1)

    # s = eps is always feasible (clipping only shortens a step of length eps).
    lo = eps.clamp_min(1e-12).log()
    hi = lo + math.log(max_scale)
    top_ok = norm_at(hi) <= eps  # the whole clipped ray fits inside the ball
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = norm_at(mid) <= eps
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    s = torch.where(top_ok, hi, lo).exp()
    z = (x + s.view(view) * d).clamp(0, 1)
    return project_l2_box(z, x, eps)  # guards the last ulp of the bisection


def fgsm_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: float,
            fill_budget: bool = False) -> torch.Tensor:
    """One step of L2 length eps = budget * ||x|| along the normalised loss gradient, then the
    exact projection onto the budget ball ∩ [0, 1].

    ``fill_budget=True`` instead takes the best linear step inside the box (see
    :func:`fill_budget_step`): same direction, but saturated pixels do not waste budget.
    """
    eps = budget_eps(x, budget)
    grad = loss_gradient(model, x, y)
    if fill_budget:
        return fill_budget_step(x, grad, eps).detach()
    return project_l2_box(x + eps.view(batch_view(x)) * l2_unit(grad), x, eps).detach()


def ifgsm_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: float, steps: int = 10,
             step_size: float | None = None) -> torch.Tensor:
    """Iterative FGSM (Kurakin et al.'s basic iterative method) in L2: ``steps`` normalised
    gradient steps of ``step_size * eps`` each, projected after every step, no random start.

    The default step eps / steps is the usual I-FGSM choice (Dong et al.): the steps add up to
    exactly the budget. It is PGD without the random start and with a shorter step.
    """
    step = step_size if step_size is not None else 1.0 / steps
    return pgd_l2(model, x, y, budget, steps=steps, step_size=step, schedule="constant",
                  keep_best=False)
