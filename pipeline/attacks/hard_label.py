"""Hard-label (decision-based) attack on a deployed classifier: foolbox 3's HopSkipJump L2
around any ``labels(images) -> labels`` function, with model queries counted per image.

Only the classifier's labels are used, so the same code attacks the undefended network and the
hard kNN vote over a job's real index and store: exactly what ``serve`` answers. The attack runs
a batch of images in lockstep (foolbox evaluates the whole batch at every query), so each call
is one query for every image of the batch; images it already broke keep being charged, which
over-counts their queries (the numbers are conservative).

Accuracy is read at each query budget q: an image counts as broken at q only if an adversarial
image found within its first q queries, rounded to 8-bit levels the way ``serve`` receives it,
is still misclassified and still within the per-image normalised budget.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.attacks.projection import normalised_l2


class _Exhausted(Exception):
    """Raised from inside foolbox when the largest query budget is spent."""


class _Tracker:
    """Counts queries and keeps each image's smallest adversarial input seen so far; snapshots
    it when the count reaches each query budget."""

    def __init__(self, labels_fn, x, y, budget, query_budgets, spent: int):
        self.labels_fn, self.x, self.y = labels_fn, x, y
        self.budget, self.query_budgets = budget, list(query_budgets)
        self.count = spent
        self.norm_x = x.flatten(1).norm(dim=1)
        self.best = x.clone()
        self.best_norm = torch.full((len(x),), math.inf)
        self.first_success = torch.full((len(x),), math.inf)  # query count, float
        self.snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.count >= self.query_budgets[-1]:
            raise _Exhausted
        images = images.detach().float()
        labels = torch.as_tensor(np.asarray(self.labels_fn(images)), dtype=torch.long)
        self.count += 1
        if len(images) == len(self.x):  # foolbox's lockstep batch: image i is row i
            norm = normalised_l2(images, self.x)
            adv = labels != self.y
            better = adv & (norm < self.best_norm)
            self.best_norm = torch.where(better, norm, self.best_norm)
            self.best[better] = images[better]
            new = adv & (norm <= self.budget) & torch.isinf(self.first_success)
            self.first_success[new] = float(self.count)
        for q in self.query_budgets:
            if self.count == q:
                self.snapshots[q] = (self.best.clone(), self.best_norm.clone())
        return labels

    def finish(self) -> None:
        for q in self.query_budgets:
            self.snapshots.setdefault(q, (self.best.clone(), self.best_norm.clone()))


def _foolbox_model(tracker: _Tracker, num_classes: int):
    import eagerpy as ep
    import foolbox as fb

    class LabelModel(fb.models.Model):
        """A foolbox model whose 'logits' are the one-hot of the classifier's label."""

        @property
        def bounds(self):
            return fb.types.Bounds(0.0, 1.0)

        def __call__(self, inputs):
            x, restore = ep.astensor_(inputs)
            labels = tracker(x.raw)
            return restore(ep.astensor(torch.nn.functional.one_hot(labels, num_classes).float()))

    return LabelModel()


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255) / 255


def _toward_zero_8bit(x8: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``z`` on the 8-bit grid, each pixel rounded towards the 8-bit image ``x8``: no pixel's
    change grows, so the perturbation's norm does not either."""
    delta = torch.trunc((z - x8) * 255 + 1e-4 * torch.sign(z - x8)) / 255
    return (x8 + delta).clamp(0, 1)


def starting_points(labels_fn, x, y, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, the nearest pool image the classifier labels otherwise (HopSkipJump
    starts from any adversarial point and walks it towards the image). Returns (starts, found);
    the pool's labels cost one query per pool image, charged to every attacked image."""
    pool_labels = torch.as_tensor(np.asarray(labels_fn(pool)), dtype=torch.long)
    dist = torch.cdist(x.flatten(1), pool.flatten(1))
    dist[pool_labels[None, :] == y[:, None]] = math.inf
    nearest = dist.argmin(1)
    found = torch.isfinite(dist.gather(1, nearest[:, None])[:, 0])
    return pool[nearest].clone(), found


MEMORY_BYTES = 4 * 2**30  # what one gradient estimate's probes may take


def max_batch(pixels: int, max_queries: int, initial_evals: int = 100) -> int:
    """Images per lockstep batch whose gradient estimate fits MEMORY_BYTES. foolbox draws a
    step's probes at once, as ~5 float32 tensors of [evals, batch, pixels], and the evals grow
    as initial * sqrt(step); the last step within ``max_queries`` bounds them (the steps' evals
    sum to ~2/3 * initial * steps^1.5). At 224 px and 10k queries that is 2 images a batch; at
    28 px, hundreds."""
    steps = max(1.0, (1.5 * max_queries / initial_evals) ** (2 / 3))
    evals = min(max_queries, initial_evals * math.sqrt(steps + 1))
    return max(1, int(MEMORY_BYTES // (5 * evals * pixels * 4)))


def hop_skip_jump(labels_fn, x: torch.Tensor, y: torch.Tensor, budget: float,
                  query_budgets: list[int], num_classes: int, *, pool: torch.Tensor | None = None,
                  initial_gradient_evals: int = 100, batch_size: int = 100, seed: int = 0,
                  progress=None) -> dict:
    """HopSkipJump L2 against ``labels_fn`` on images ``x`` in [0, 1] (8-bit levels).

    Returns per image: ``correct`` [Q, N] (still right at each query budget, 8-bit checked),
    ``achieved`` [Q, N] (normalised L2 of the counted adversarial image, nan where none),
    ``min_norm`` [N] (smallest normalised L2 of any adversarial input seen, inf if none),
    ``queries_to_success`` [N] (queries until the first in-budget adversarial input, inf if
    never; 0 for images misclassified when clean), ``attacked`` [N] (clean-correct and a start
    was found), the ``queries`` actually spent per attacked image (max over batches) and the
    ``adversarial`` images counted at the largest budget (the image itself where none)."""
    import foolbox as fb

    x = to_8bit(x.detach().float())
    y = y.long()
    query_budgets = sorted(query_budgets)
    batch_size = min(batch_size, max_batch(x[0].numel(), query_budgets[-1], initial_gradient_evals))
    n, nq = len(x), len(query_budgets)
    clean_ok = torch.as_tensor(np.asarray(labels_fn(x)), dtype=torch.long) == y
    pool = x if pool is None else to_8bit(pool.float())
    starts, found = starting_points(labels_fn, x, y, pool)
    attacked = clean_ok & found
    correct = np.zeros((nq, n), dtype=bool)
    correct[:, (clean_ok & ~found).numpy()] = True  # no point of another label: nothing to do
    achieved = np.full((nq, n), np.nan)
    min_norm = np.full(n, np.inf)
    to_success = np.where(clean_ok.numpy(), np.inf, 0.0)
    adversarial = x.clone()  # the counted 8-bit image at the largest budget (x where none)
    spent = 0
    idx_all = torch.nonzero(attacked)[:, 0]
    for b0 in range(0, len(idx_all), batch_size):
        idx = idx_all[b0:b0 + batch_size]
        xb, yb = x[idx], y[idx]
        # one query (the start's label) already spent on each image
        tracker = _Tracker(labels_fn, xb, yb, budget, query_budgets, spent=1)
        model = _foolbox_model(tracker, num_classes)
        attack = fb.attacks.HopSkipJumpAttack(
            steps=10**6, initial_gradient_eval_steps=initial_gradient_evals,
            max_gradient_eval_steps=10**4, gamma=1.0, constraint="l2")
        torch.manual_seed(seed + b0)
        try:
            attack.run(model, xb, fb.criteria.Misclassification(yb), starting_points=starts[idx])
        except _Exhausted:
            pass
        tracker.finish()
        spent = max(spent, tracker.count)
        # an image once broken stays broken: the attacker keeps the image it found
        broken_any, counted = torch.zeros(len(idx), dtype=torch.bool), xb.clone()
        for qi, q in enumerate(query_budgets):
            broken, image = _count_8bit(labels_fn, xb, yb, *tracker.snapshots[q], budget)
            newly = broken & ~broken_any
            counted[newly] = image[newly]
            broken_any |= broken
            correct[qi, idx.numpy()] = (~broken_any).numpy()
            achieved[qi, idx[broken_any].numpy()] = normalised_l2(
                counted[broken_any], xb[broken_any]).numpy()
        adversarial[idx] = counted
        min_norm[idx.numpy()] = tracker.best_norm.numpy()
        to_success[idx.numpy()] = tracker.first_success.numpy()
        if progress is not None:
            progress.update(len(idx))
    return {"correct": correct, "achieved": achieved, "min_norm": min_norm,
            "queries_to_success": to_success, "attacked": attacked.numpy(),
            "clean_correct": clean_ok.numpy(), "queries": spent, "query_budgets": query_budgets,
            "adversarial": adversarial.numpy()}


def _count_8bit(labels_fn, x, y, best, best_norm, budget) -> tuple[torch.Tensor, torch.Tensor]:
    """Which images' adversarial inputs survive 8-bit rounding within the budget. Up to four
    queries per image: the minimal perturbation, then 1.1x and 1.5x it, rounded to the nearest
    levels (each kept if it stays within the budget and adversarial), else the perturbation
    pushed out along its direction to the budget's sphere and rounded towards the image (its
    norm cannot grow): a minimal image sits on the decision boundary, where rounding alone
    flips about half of them back."""
    broken = torch.zeros(len(x), dtype=torch.bool)
    image = x.clone()
    usable = best_norm <= budget
    if not usable.any():
        return broken, image
    delta = best - x
    eps = budget * x.flatten(1).norm(dim=1)
    scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *[1] * (x.dim() - 1))
    pushed = _toward_zero_8bit(x, (x + delta * scale).clamp(0, 1))
    # the minimal image, then a little further out, before the budget's sphere
    stepped = [to_8bit((x + delta * f).clamp(0, 1)) for f in (1.0, 1.1, 1.5)]
    for cand in (*stepped, pushed):
        ok = usable & ~broken & (normalised_l2(cand, x) <= budget * (1 + 1e-6))
        if not ok.any():
            continue
        labels = torch.as_tensor(np.asarray(labels_fn(cand[ok])), dtype=torch.long)
        hit = torch.zeros_like(ok)
        hit[ok] = labels != y[ok]
        image[hit] = cand[hit]
        broken |= hit
    return broken, image
