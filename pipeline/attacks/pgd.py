"""L2 PGD (Madry et al.) under the paper's per-image normalised budget, pixels in [0, 1]."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.projection import budget_eps, project_l2_box


def _unit(g: torch.Tensor) -> torch.Tensor:
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / n.view(-1, *([1] * (g.dim() - 1)))


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: float, steps: int = 10,
           step_size: float | None = None, random_start: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted L2 PGD maximising cross-entropy of the true label ``y``.

    Each step moves ``step_size * eps`` along the normalised gradient (default 2.5 / steps,
    Madry et al.'s choice) then projects exactly onto the budget ball ∩ [0, 1].
    """
    eps = budget_eps(x, budget)
    alpha = (step_size if step_size is not None else 2.5 / steps) * eps
    view = (-1,) + (1,) * (x.dim() - 1)
    x_adv = x.clone()
    if random_start:
        noise = _unit(torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device))
        radius = torch.rand(len(x), generator=generator, dtype=x.dtype).to(x.device) * eps
        x_adv = project_l2_box(x + noise * radius.view(view), x, eps)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project_l2_box(x_adv.detach() + alpha.view(view) * _unit(grad), x, eps)
    return x_adv.detach()
