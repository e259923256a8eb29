"""Defense-aware (white-box) attacks on the kNN defense.

From the paper (Dubey et al., Sec. 5.3):
- PGD-PR: PGD on a differentiable surrogate of the kNN vote over the query's *initial* K
  neighbours (a fixed set), with softmax weights over negative feature distances.
- PGD-FS: PGD pulling the image's features towards features of attack-database images of
  another (target) class.

Beyond the paper, two attacks in the style of Sitawarin & Wagner's attacks on kNN classifiers
("On the Robustness of Deep K-Nearest Neighbors", 2019; "Minimum-Norm Adversarial Examples on
KNN and KNN-Based Models", 2020):
- :func:`soft_knn_margin_attack` (inside a budget) re-finds the neighbours at every step,
  relaxes the neighbour *set* with a sigmoid around the k-th distance (so other-class images
  just outside it pull), optimises a margin rather than a cross-entropy, and keeps the best
  iterate under the real (hard) vote;
- :func:`knn_min_norm` (no budget) searches the smallest perturbation that fools the vote
  (descending the soft vote margin, or pulling the features towards guide samples of another
  class) under an adaptive norm bound (FMN), so one run gives the whole accuracy-vs-budget
  curve (:func:`pipeline.attacks.projection.project_minimal`).

Every budgeted attack takes images in [0, 1] and a per-image normalised L2 budget and returns
images inside {||x* - x|| <= budget * ||x||} ∩ [0, 1], enforced by the exact projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.gradient import batch_view, l2_unit
from pipeline.attacks.projection import budget_eps, normalised_l2, project_l2_box
from pipeline.features.backbones import pool

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def make_feature_fn(model: nn.Module, layer: str, pca_mean: np.ndarray | torch.Tensor,
                    pca_components: np.ndarray | torch.Tensor, pooling: str = "avg") -> FeatureFn:
    """Differentiable kNN features: PCA(pool(pre-ReLU tap)) = (pooled - mean) @ components.T,
    in torch so gradients reach the pixels. ``model`` must have ``forward_taps`` (SmallResNet)."""
    mean = torch.as_tensor(pca_mean, dtype=torch.float32)
    comps = torch.as_tensor(pca_components, dtype=torch.float32)

    def feature_fn(x: torch.Tensor) -> torch.Tensor:
        _, taps = model.forward_taps(x, [layer])
        return (pool(taps[layer], pooling) - mean.to(x.device)) @ comps.to(x.device).T

    return feature_fn


def feature_fn_for(defended, layer: str | None = None) -> FeatureFn:
    """The differentiable features of a ``DefendedClassifier``'s layer: its pooling (average or
    R-MAC) and PCA (whitened if so fitted), before storage rounding/quantisation."""
    layer = layer or defended.layer
    stack = defended.transforms[layer]

    def feature_fn(x: torch.Tensor) -> torch.Tensor:
        _, taps = defended.model.forward_taps(x, [layer])
        return stack.project_torch(stack.pool(taps[layer]))

    return feature_fn


def nearest(features: torch.Tensor, db_feats: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [N, k] of the k nearest database rows (exact Euclidean; the DB is small here)."""
    k = min(k, len(db_feats))
    return torch.cdist(features, db_feats).topk(k, dim=1, largest=False).indices


def soft_knn_scores(features: torch.Tensor, db_features: torch.Tensor, db_softmax: torch.Tensor,
                    gamma: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable kNN vote [N, C] over a fixed neighbour set.

    features [N, D]; db_features [N, K, D] (each query's neighbours) or [K, D] (shared);
    db_softmax [N, K, C] or [K, C]; optional per-neighbour CBW weights [N, K] or [K].
    Neighbour k gets attention softmax_k(-d_k / (gamma * mean_j d_j)) * w_k (renormalised), with
    d_k the squared Euclidean feature distance. Dividing by the mean distance (held constant
    for the gradient) makes gamma scale-free: raw distances depend on the layer and the PCA, and
    gamma = 0.05 on them would give a hard argmin on one layer and a uniform vote on another.
    Scores sum to 1 because each neighbour's softmax does.
    """
    n = len(features)
    if db_features.dim() == 2:
        db_features = db_features.expand(n, -1, -1)
    if db_softmax.dim() == 2:
        db_softmax = db_softmax.expand(n, -1, -1)
    d = (features[:, None, :] - db_features).pow(2).sum(-1)  # [N, K]
    scale = d.mean(1, keepdim=True).detach().clamp_min(1e-12)
    logits = -d / (scale * gamma)
    if weights is not None:
        # softmax(logits + log w) = softmax(logits) * w renormalised, without underflow; a
        # zero weight must remove the neighbour even when 1/gamma makes logits huge.
        w = weights.expand(n, -1)
        logits = (logits + w.clamp_min(1e-30).log()).masked_fill(w <= 0, -1e30)
    attention = logits.softmax(dim=1)
    return torch.einsum("nk,nkc->nc", attention, db_softmax)


def hard_knn_scores(db_softmax: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The defense's vote [N, C] = sum_k w_k s_k (normalised) over neighbours [N, K, C]."""
    w = torch.ones(db_softmax.shape[:2], dtype=db_softmax.dtype, device=db_softmax.device)
    if weights is not None:
        w = w * weights
    scores = torch.einsum("nk,nkc->nc", w, db_softmax)
    return scores / scores.sum(1, keepdim=True).clamp_min(1e-12)


def score_margin(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{c != y} score_c - score_y per row (positive = the vote is wrong)."""
    true = scores.gather(1, y[:, None]).squeeze(1)
    other = scores.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - true


def initial_neighbours(feature_fn: FeatureFn, x: torch.Tensor, db_feats: torch.Tensor,
                       db_softmax: torch.Tensor, k: int = 50,
                       db_weights: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The clean query's K nearest DB rows: (features [N,K,D], softmax [N,K,C], weights [N,K]
    or None), i.e. PGD-PR's fixed neighbour set when the DB fits in memory."""
    with torch.no_grad():
        idx = nearest(feature_fn(x), db_feats, k)
    return db_feats[idx], db_softmax[idx], None if db_weights is None else db_weights[idx]


def _check_eval(model: nn.Module | None) -> None:
    # BatchNorm in training mode makes each image's features depend on the rest of the batch.
    if model is not None and model.training:
        raise ValueError("put the model in eval mode before attacking it")


def pgd_pr(model: nn.Module | None, feature_fn: FeatureFn, x: torch.Tensor, y: torch.Tensor,
           neighbour_feats: torch.Tensor, neighbour_softmax: torch.Tensor, budget: float,
           steps: int = 10, gamma: float = 0.05, step_size: float | None = None,
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """PGD-PR: L2 PGD maximising -log p_y of :func:`soft_knn_scores` over the query's initial
    K neighbours (``neighbour_feats`` [N, K, D], ``neighbour_softmax`` [N, K, C]; see
    :func:`initial_neighbours`), which stay fixed while the image moves.

    ``model`` is the network inside ``feature_fn``; it is only checked to be in eval mode.
    Steps are ``step_size * eps`` (default 2.5 / steps, as :func:`pgd_l2`).
    """
    _check_eval(model)
    eps = budget_eps(x, budget)
    alpha = (step_size if step_size is not None else 2.5 / steps) * eps
    view = batch_view(x)
    x_adv = x.detach().clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            scores = soft_knn_scores(feature_fn(x_adv), neighbour_feats, neighbour_softmax, gamma,
                                     weights)
            loss = -scores.gather(1, y[:, None]).clamp_min(1e-12).log().sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project_l2_box(x_adv.detach() + alpha.view(view) * l2_unit(grad), x, eps)
    return x_adv.detach()


def choose_targets(attack_db_feats: torch.Tensor, attack_db_labels: torch.Tensor,
                   query_feats: torch.Tensor, y: torch.Tensor, m: int,
                   generator: torch.Generator | None = None, strategy: str = "nearest",
                   exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD-FS targets: per query a class != y and the features [N, m, D] of its m attack-DB
    images nearest to the query.

    ``strategy="nearest"``: the class of the nearest attack-DB image with another label (the
    easiest class to reach). ``"random"``: a uniformly random other class present in the attack
    DB, drawn with ``generator``. ``exclude`` [N, j]: classes not to pick either (the next
    nearest class after those).
    """
    labels = attack_db_labels.to(y.device)
    d = torch.cdist(query_feats, attack_db_feats)  # [N, M]
    if strategy == "nearest":
        banned = labels[None, :] == y[:, None]
        if exclude is not None:
            banned |= (labels[None, :, None] == exclude[:, None, :]).any(-1)
        if banned.all(1).any():
            raise ValueError("the attack database has no class left to target for some queries")
        target = labels[d.masked_fill(banned, float("inf")).argmin(1)]
    elif strategy == "random":
        classes = labels.unique()
        draw = torch.rand(len(y), len(classes), generator=generator).to(d.device)
        draw = draw.masked_fill(classes[None, :] == y[:, None], -1.0)
        target = classes[draw.argmax(1)]
    else:
        raise ValueError(f"unknown strategy {strategy!r}; use nearest or random")
    if (target == y).any():
        raise ValueError("the attack database needs at least one class besides each query's")
    in_target = labels[None, :] == target[:, None]
    short = in_target.sum(1) < m
    if short.any():
        raise ValueError(f"attack database has fewer than m={m} images of target class(es) "
                         f"{sorted(set(target[short].tolist()))}")
    idx = d.masked_fill(~in_target, float("inf")).topk(m, dim=1, largest=False).indices
    return target, attack_db_feats[idx]


def pgd_fs(feature_fn: FeatureFn, x: torch.Tensor, target_feats: torch.Tensor, budget: float,
           steps: int = 10, step_size: float | None = None) -> torch.Tensor:
    """PGD-FS: L2 PGD minimising mean_m ||f(x*) - t_m||^2 towards ``target_feats`` [N, M, D]
    (see :func:`choose_targets`). Returns the iterate with the smallest distance per image, as
    fixed-length normalised steps can overshoot the minimum near the end."""
    eps = budget_eps(x, budget)
    alpha = (step_size if step_size is not None else 2.5 / steps) * eps
    view = batch_view(x)
    x_adv = x.detach().clone()
    best, best_loss = x_adv.clone(), torch.full((len(x),), float("inf"), device=x.device)
    for i in range(steps + 1):
        x_adv.requires_grad_(i < steps)
        with torch.enable_grad():
            loss = (feature_fn(x_adv)[:, None, :] - target_feats).pow(2).sum(-1).mean(1)
            grad = torch.autograd.grad(loss.sum(), x_adv)[0] if i < steps else None
        with torch.no_grad():
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best = torch.where(better.view(view), x_adv, best)
        if grad is not None:
            x_adv = project_l2_box(x_adv.detach() - alpha.view(view) * l2_unit(grad), x, eps)
    return best.detach()


def soft_threshold_scores(features: torch.Tensor, cand_feats: torch.Tensor,
                          cand_softmax: torch.Tensor, k: int, temperature: float,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable kNN vote [N, C] with a *soft neighbour set* (Sitawarin & Wagner, 2019).

    cand_feats [N, J, D] / cand_softmax [N, J, C] are each query's J > k nearest candidates.
    Candidate j belongs to the neighbour set with soft membership
    sigmoid((r - d_j) / (temperature * mean_i d_i)), r halfway between the k-th and (k+1)-th
    squared distances (held constant), so the gradient pushes true-class neighbours out of the
    ball *and* pulls other-class candidates just outside it in; a softmax over the current K
    only re-weights neighbours that are often all of the true class (a masked gradient).
    The mean distance again makes ``temperature`` scale-free.
    """
    d = (features[:, None, :] - cand_feats).pow(2).sum(-1)  # [N, J]
    ds = d.detach().sort(dim=1).values
    r = (ds[:, k - 1] + ds[:, min(k, ds.shape[1] - 1)]) / 2
    scale = ds.mean(1).clamp_min(1e-12)
    member = torch.sigmoid((r[:, None] - d) / (temperature * scale[:, None]))
    if weights is not None:
        member = member * weights
    scores = torch.einsum("nj,njc->nc", member, cand_softmax)
    return scores / member.sum(1, keepdim=True).clamp_min(1e-12)


def soft_knn_margin_attack(feature_fn: FeatureFn, x: torch.Tensor, y: torch.Tensor,
                           db_feats: torch.Tensor, db_softmax: torch.Tensor, budget: float,
                           steps: int = 50, k: int = 50, temperature: float = 1.0,
                           candidates: int | None = None, step_size: float | None = None,
                           db_weights: torch.Tensor | None = None, random_start: bool = False,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Adaptive attack on the kNN vote, in the style of Sitawarin & Wagner's kNN attacks.

    At every step: re-find the ``candidates`` (default 4k) nearest (attack-)database rows of the
    current features (``db_feats`` [M, D], ``db_softmax`` [M, C], optional CBW weights
    ``db_weights`` [M]), form the soft-neighbour-set vote (:func:`soft_threshold_scores`) and
    ascend the margin max_{c != y} score_c - score_y. Unlike PGD-PR it tracks the neighbour set
    the defense will really use, sees the other-class images just outside it, and its margin
    does not saturate once p_y is small.

    The step starts at ``step_size * eps`` (default 5 / steps: large exploratory moves) and
    decays with a cosine schedule to ~0, so late steps refine. The result is, per image, the
    iterate (the starting point included) with the largest *hard* K-NN vote margin, ties
    broken by the soft margin: never less adversarial for the real vote than where it began.
    """
    eps = budget_eps(x, budget)
    alpha0 = (step_size if step_size is not None else 5.0 / steps) * eps
    n_cand = min(max(candidates or 4 * k, k + 1), len(db_feats))
    k = min(k, len(db_feats))
    view = batch_view(x)
    x_adv = x.detach().clone()
    if random_start:
        noise = l2_unit(torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device))
        radius = torch.rand(len(x), generator=generator, dtype=x.dtype).to(x.device) * eps
        x_adv = project_l2_box(x + noise * radius.view(view), x, eps)
    best = x_adv.clone()
    best_hard = torch.full((len(x),), float("-inf"), device=x.device)
    best_soft = best_hard.clone()
    for i in range(steps + 1):
        x_adv.requires_grad_(i < steps)
        with torch.enable_grad():
            feats = feature_fn(x_adv)
            idx = nearest(feats.detach(), db_feats, n_cand)  # sorted: the first k are the kNN
            w = None if db_weights is None else db_weights[idx]
            soft = score_margin(soft_threshold_scores(feats, db_feats[idx], db_softmax[idx], k,
                                                      temperature, w), y)
            grad = torch.autograd.grad(soft.sum(), x_adv)[0] if i < steps else None
        with torch.no_grad():
            hard = score_margin(hard_knn_scores(db_softmax[idx[:, :k]],
                                                None if w is None else w[:, :k]), y)
            better = (hard > best_hard) | ((hard == best_hard) & (soft > best_soft))
            best_hard = torch.where(better, hard, best_hard)
            best_soft = torch.where(better, soft, best_soft)
            best = torch.where(better.view(view), x_adv, best)
        if grad is not None:
            alpha = alpha0 * 0.5 * (1 + math.cos(math.pi * i / steps))
            x_adv = project_l2_box(x_adv.detach() + alpha.view(view) * l2_unit(grad), x, eps)
    return best.detach()


def guide_radius(guide_feats: torch.Tensor, db_feats: torch.Tensor, k: int,
                 chunk: int = 4096) -> torch.Tensor:
    """Squared distance [N, m] from each guide (``guide_feats`` [N, m, D], rows of ``db_feats``)
    to its k-th nearest database row, itself included: a point that close to a guide is about
    as surrounded by the guide's neighbours as the guide is. In chunks: N * m rows x M."""
    flat = guide_feats.reshape(-1, guide_feats.shape[-1])
    k = min(k, len(db_feats))
    radius = torch.cat([torch.cdist(part, db_feats).topk(k, dim=1, largest=False).values[:, -1]
                        for part in flat.split(chunk)])
    return radius.pow(2).view(guide_feats.shape[:2])


def knn_min_norm(feature_fn: FeatureFn, x: torch.Tensor, y: torch.Tensor, db_feats: torch.Tensor,
                 db_labels: torch.Tensor, db_softmax: torch.Tensor, k: int = 50, *,
                 loss: str = "margin", m: int | None = None, targets: int = 1, steps: int = 100,
                 step_size: float = 0.1, gamma: float = 0.05, temperature: float = 0.1,
                 kappa: float = 0.0, db_weights: torch.Tensor | None = None,
                 line_steps: int = 10) -> dict:
    """Minimum-norm attack on the kNN vote, searched with adaptive norm constraints (FMN,
    Pintor et al., 2021), in the style of Sitawarin & Wagner's kNN attacks (2019/2020).

    ``loss="guides"`` (Sitawarin & Wagner's guide samples): per image and target class (the
    ``targets`` other classes whose nearest database row is nearest), the guides are the ``m``
    (default ``k``) target-class rows nearest to the clean features, each with its radius eta_j
    (:func:`guide_radius`); the loss is the pull mean_j tau * softplus((d_j / eta_j - 1) / tau),
    d_j the squared feature distance to guide j: a hinge, linear far from the guides and ~0
    inside their neighbourhoods. ``loss="margin"``: minus the soft-neighbour-set vote margin
    (:func:`soft_margin_loss`, temperature ``temperature``), neighbours re-found every step:
    any other class, and aligned with the vote itself (stronger on Fashion-MNIST, docs/evaluation.md).

    Each step descends the loss by ``step_size * ||x||`` (cosine-decayed) and projects exactly
    onto {||x* - x|| <= eps} ∩ [0, 1]; eps is unbounded until the image first fools the vote,
    then shrinks by (1 - gamma) from the best norm at every success and grows by (1 + gamma)
    at every failure (gamma cosine-decayed), so the iterates walk along the decision boundary
    towards x. Pixel space, not CW's tanh space: saturated pixels (a black background) can
    still move. Success is judged by the hard vote: over the K nearest database rows (CBW
    ``db_weights`` [M] if given) the best other class's score o beats y's score t by
    (o - t) / (o + t) > ``kappa`` (a margin makes the result survive a different database,
    e.g. the full defense database when the attacker holds a sample of it). The smallest
    success is then pulled back towards ``x`` as far as it stays adversarial
    (:func:`shrink_towards`).

    Returns ``x`` (per image the smallest adversarial image found, else the last iterate of
    the first search), ``min_normalised_l2`` (inf where none was found) and ``target`` (the
    guides' class that gave it; -1 where none or with the margin loss).
    """
    view = batch_view(x)
    x = x.detach()
    k = min(k, len(db_feats))

    def is_adversarial_features(feats: torch.Tensor) -> torch.Tensor:
        idx = nearest(feats, db_feats, k)
        weights = None if db_weights is None else db_weights[idx]
        scores = hard_knn_scores(db_softmax[idx], weights)
        true = scores.gather(1, y[:, None]).squeeze(1)
        margin = score_margin(scores, y)  # best other - true
        # Relative to the two scores: the same kappa means the same thing for a confident
        # 10-class classifier and a diffuse 1000-class one.
        return margin > kappa * (margin + 2 * true)

    if loss not in ("margin", "guides"):
        raise ValueError(f"unknown loss {loss!r}; use margin or guides")
    with torch.no_grad():
        clean_feats = feature_fn(x)
    best, best_norm, fallback = x.clone(), torch.full((len(x),), float("inf")), None
    reached = torch.full((len(x),), -1, dtype=torch.long)
    tried = torch.empty((len(x), 0), dtype=torch.long)  # guide classes already searched
    for _ in range(1 if loss == "margin" else targets):
        if loss == "margin":
            target = torch.full_like(y, -1)
            loss_fn = soft_margin_loss(db_feats, db_softmax, y, k, temperature, db_weights)
        else:
            with torch.no_grad():
                target, guides = choose_targets(db_feats, db_labels, clean_feats, y, m or k,
                                                exclude=tried)
                eta = guide_radius(guides, db_feats, k).clamp_min(1e-12)  # [N, m]
            tried = torch.cat([tried, target[:, None]], 1)
            loss_fn = guide_pull(guides, eta, temperature)
        adv, norm, last = _fmn(feature_fn, x, loss_fn, is_adversarial_features, steps, step_size,
                               gamma)
        better = norm < best_norm
        best_norm = torch.where(better, norm, best_norm)
        best = torch.where(better.view(view), adv, best)
        reached = torch.where(better, target, reached)
        fallback = last if fallback is None else fallback
    found = torch.isfinite(best_norm)
    best = shrink_towards(x, best, found,
                          lambda images: is_adversarial_features(feature_fn(images)), line_steps)
    min_normalised = torch.where(found, normalised_l2(best, x), torch.full_like(best_norm, float("inf")))
    return {"x": torch.where(found.view(view), best, fallback).detach(),
            "min_normalised_l2": min_normalised, "target": reached}


def soft_margin_loss(db_feats, db_softmax, y, k: int, temperature: float, db_weights=None):
    """Per-image loss -margin of the soft-neighbour-set vote over the 4k nearest candidates
    (:func:`soft_threshold_scores`), re-found at every call."""
    def loss(feats: torch.Tensor) -> torch.Tensor:
        idx = nearest(feats.detach(), db_feats, min(4 * k, len(db_feats)))
        w = None if db_weights is None else db_weights[idx]
        return -score_margin(soft_threshold_scores(feats, db_feats[idx], db_softmax[idx], k,
                                                   temperature, w), y)
    return loss


def guide_pull(guides: torch.Tensor, eta: torch.Tensor, temperature: float):
    """Per-image loss mean_j tau * softplus((d_j / eta_j - 1) / tau) towards ``guides``."""
    def loss(feats: torch.Tensor) -> torch.Tensor:
        d = (feats[:, None, :] - guides).pow(2).sum(-1)
        return (temperature * F.softplus((d / eta - 1) / temperature)).mean(1)
    return loss


def _fmn(feature_fn: FeatureFn, x: torch.Tensor, loss_fn, is_adversarial_features, steps: int,
         step_size: float, gamma: float):
    """FMN-style minimum-norm search descending ``loss_fn(features)`` (per image): (smallest
    adversarial image, its L2 norm (inf: none), last iterate) per image."""
    view = batch_view(x)
    n = len(x)
    x_norm = x.flatten(1).norm(dim=1)
    x_adv = x.clone()
    eps = torch.full((n,), float("inf"), device=x.device)
    best, best_norm = x.clone(), torch.full((n,), float("inf"), device=x.device)
    for i in range(steps):
        decay = 0.5 * (1 + math.cos(math.pi * i / steps))
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            feats = feature_fn(x_adv)
            (grad,) = torch.autograd.grad(loss_fn(feats).sum(), x_adv)
        with torch.no_grad():
            # This iterate's vote (its features), recorded before the step moves it.
            adv = is_adversarial_features(feats)
            norm = (x_adv - x).flatten(1).norm(dim=1)
            better = adv & (norm < best_norm)
            best_norm = torch.where(better, norm, best_norm)
            best = torch.where(better.view(view), x_adv, best)
            eps = torch.where(adv, torch.minimum(eps, norm) * (1 - gamma * decay),
                              eps * (1 + gamma * decay))  # inf stays inf until a first success
            step = x_adv - (step_size * decay * x_norm).view(view) * l2_unit(grad)
            x_adv = project_l2_box(step, x, eps.nan_to_num(posinf=float(x.numel())))
    return best, best_norm, x_adv.detach()


def shrink_towards(x: torch.Tensor, x_adv: torch.Tensor, found: torch.Tensor,
                   is_adversarial: Callable[[torch.Tensor], torch.Tensor],
                   steps: int = 10) -> torch.Tensor:
    """Bisect t in [0, 1] per image for the smallest x + t (x_adv - x) that is still
    adversarial (the segment stays in the box): the optimiser's iterates overshoot the
    decision boundary by its step size, a line search along the found direction does not."""
    view = batch_view(x)
    lo, hi = torch.zeros(len(x), device=x.device), torch.ones(len(x), device=x.device)
    with torch.no_grad():
        for _ in range(steps):
            mid = (lo + hi) / 2
            ok = is_adversarial(x + mid.view(view) * (x_adv - x)) & found
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return x + hi.view(view) * (x_adv - x)
