"""The attack suite: one adversarial image set per (attack, budget[, attacked layer]).

Gray-box sets use the undefended target classifier's gradients, black-box sets the surrogate's;
white-box (defense-aware) sets use one layer's differentiable kNN features and an attack
database of (features, softmax) rows. Every set is checked independently afterwards: achieved
normalised L2 (mean, max) and the [0, 1] range, so an attack that wastes its budget shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from pipeline.attacks.cw import cw_l2_minimal
from pipeline.attacks.gradient import fgsm_l2, ifgsm_l2
from pipeline.attacks.knn_aware import (
    choose_targets,
    initial_neighbours,
    knn_min_norm,
    pgd_fs,
    pgd_pr,
    soft_knn_margin_attack,
)
from pipeline.attacks.pgd import pgd_l2
from pipeline.attacks.projection import normalised_l2, project_minimal
from pipeline.config import CONTROL_ATTACKS, HARD_LABEL_ATTACKS, WHITE_BOX_ATTACKS

ATTACK_NAMES = {"pgd": "PGD", "fgsm": "FGSM", "ifgsm": "I-FGSM", "cw": "CW-L2", "pgd_pr": "PGD-PR",
                "pgd_fs": "PGD-FS", "adaptive": "adaptive", "min_norm": "min-norm kNN",
                "noise": "random noise", "hsj": "HSJ"}
THREAT_NAMES = {"gray_box": "gray", "black_box": "black", "white_box": "white", "random": "",
                "hard_label": "hard-label"}


def attack_title(attack: str, threat: str) -> str:
    """Short column title: 'PGD gray', 'PGD-PR white', 'min-norm kNN k05 white' (tagged),
    'HSJ 1k hard-label' (the hard-label attack at 1,000 queries)."""
    name, _, tag = attack.partition(".")
    return " ".join(filter(None, (ATTACK_NAMES[name], tag, THREAT_NAMES[threat])))


@dataclass(frozen=True)
class AttackSet:
    """One adversarial set to craft: ``spec`` at ``budget`` (against ``layer`` if white-box)."""

    spec: object  # a config attack spec
    budget: float
    layer: str | None = None

    @property
    def attack(self) -> str:
        """The attack's name, with its tag if it has one ("min_norm.k05")."""
        return self.spec.label

    @property
    def threat(self) -> str:
        return self.spec.threat

    @property
    def label(self) -> str:
        at = f"[{self.layer}]" if self.layer else ""
        return f"{self.attack}-{self.threat}{at}@{self.budget:g}"

    @property
    def title(self) -> str:
        return attack_title(self.attack, self.threat)

    def fingerprint(self, *context) -> str:
        from pipeline.fingerprints import fingerprint

        params = self.spec.model_dump(exclude={"budget", "layers", "batch_size", "tag"})
        return fingerprint(params, self.budget, self.layer, context, length=12)


def plan_sets(attacks, layers: list[str]) -> list[AttackSet]:
    """Every adversarial set the suite makes, in config order (random noise and the hard-label
    attack are evaluated otherwise: draw by draw, and per classifier)."""
    sets = []
    for spec in attacks:
        if spec.name in CONTROL_ATTACKS + HARD_LABEL_ATTACKS:
            continue
        targets = (spec.layers or layers) if spec.name in WHITE_BOX_ATTACKS else [None]
        for budget in spec.budgets:
            sets.extend(AttackSet(spec, budget, layer) for layer in targets)
    return sets


@dataclass
class AttackDatabase:
    """The white-box attacker's database: per layer features [M, D], softmax [M, C], predicted
    labels [M] (web images carry no labels; the attacker uses the classifier's)."""

    features: dict[str, torch.Tensor]
    softmax: torch.Tensor
    labels: torch.Tensor
    from_defense: int = 0  # rows drawn from the defense database (the rest: outside it)


@dataclass
class AttackContext:
    """What the attacks may use. ``feature_fn(layer)`` gives a layer's differentiable kNN
    features; ``surrogate`` and ``attack_db`` are built on first use (they cost time)."""

    model: torch.nn.Module
    seed: int = 0
    feature_fn: object = None
    surrogate_builder: object = None
    attack_db_builder: object = None
    cbw_d: tuple[int, float] = (20, 3.0)
    _cache: dict = field(default_factory=dict)

    @property
    def surrogate(self) -> torch.nn.Module:
        if "surrogate" not in self._cache:
            if self.surrogate_builder is None:
                raise ValueError("black_box attacks need evaluate.surrogate")
            self._cache["surrogate"] = self.surrogate_builder().eval()
        return self._cache["surrogate"]

    @property
    def attack_db(self) -> AttackDatabase:
        if "attack_db" not in self._cache:
            if self.attack_db_builder is None:
                raise ValueError("white_box attacks need a kNN defense (a job) and its database")
            self._cache["attack_db"] = self.attack_db_builder()
        return self._cache["attack_db"]

    def source_model(self, threat: str) -> torch.nn.Module:
        return self.surrogate if threat == "black_box" else self.model


def craft(ctx: AttackContext, aset: AttackSet, x: torch.Tensor, y: torch.Tensor,
          progress=None) -> tuple[torch.Tensor, dict]:
    """Adversarial images for ``aset`` (in batches of the spec's ``batch_size``) and the
    attack's own statistics."""
    spec = aset.spec
    gen = torch.Generator().manual_seed(ctx.seed)
    out, extra = [], {}
    for start in range(0, len(x), spec.batch_size):
        xb, yb = x[start:start + spec.batch_size], y[start:start + spec.batch_size]
        adv, info = _craft_batch(ctx, aset, xb, yb, gen, start)
        out.append(adv)
        for key, value in info.items():
            extra.setdefault(key, []).append((value, len(xb)))
        if progress is not None:
            progress.update(len(xb))
    # batch statistics -> weighted means over the whole set
    stats = {key: float(sum(v * n for v, n in parts) / len(x)) for key, parts in extra.items()}
    return torch.cat(out), stats


def _craft_batch(ctx: AttackContext, aset: AttackSet, x, y, gen, start: int):
    spec, budget = aset.spec, aset.budget
    if spec.name == "min_norm":
        return _minimal(ctx, aset, x, start, "min_norm",
                        lambda: _knn_min_norm(ctx, aset, x, y))
    if spec.name in WHITE_BOX_ATTACKS:
        return _white_box(ctx, aset, x, y, gen), {}
    model = ctx.source_model(spec.threat)
    if spec.name == "pgd":
        return pgd_l2(model, x, y, budget, spec.steps, spec.step_size, spec.random_start, gen,
                      schedule=spec.schedule, restarts=spec.restarts), {}
    if spec.name == "fgsm":
        return fgsm_l2(model, x, y, budget, fill_budget=True), {}
    if spec.name == "ifgsm":
        return ifgsm_l2(model, x, y, budget, spec.steps), {}
    if spec.name == "cw":
        return _minimal(ctx, aset, x, start, "cw", lambda: cw_l2_minimal(
            model, x, y, spec.steps, spec.lr, spec.binary_steps, spec.c_init, spec.kappa))
    raise ValueError(f"unknown attack {spec.name!r}")


def _minimal(ctx: AttackContext, aset: AttackSet, x, start: int, prefix: str, search):
    """A minimum-norm attack (CW, min-norm kNN) does not depend on the budget: search once per
    batch (and layer), then project for each budget of a sweep."""
    key = (prefix, aset.threat, aset.layer, start,
           json.dumps(aset.spec.model_dump(exclude={"budget"}), sort_keys=True))
    if key not in ctx._cache:
        ctx._cache[key] = search()
    adv, info = project_minimal(ctx._cache[key], x, aset.budget)
    return adv, {f"{prefix}_success_rate": info["success_rate"],
                 f"{prefix}_under_budget_rate": info["under_budget_rate"]}


def _vote_weights(ctx: AttackContext, weighting: str) -> torch.Tensor | None:
    """Per-row CBW weights of the attack database's stored softmax (None for UW), computed once
    per context: every batch of every white-box set votes over the same database."""
    if weighting == "uw":
        return None
    key = ("vote_weights", weighting)
    if key not in ctx._cache:
        from pipeline.weighting import neighbour_weights

        ctx._cache[key] = torch.as_tensor(
            neighbour_weights(ctx.attack_db.softmax.numpy(), weighting, *ctx.cbw_d),
            dtype=torch.float32)
    return ctx._cache[key]


def _knn_min_norm(ctx: AttackContext, aset: AttackSet, x, y) -> dict:
    spec, db = aset.spec, ctx.attack_db
    return knn_min_norm(ctx.feature_fn(aset.layer), x, y, db.features[aset.layer], db.labels,
                        db.softmax, spec.k, loss=spec.loss, m=spec.m, targets=spec.targets,
                        steps=spec.steps, step_size=spec.step_size, gamma=spec.gamma,
                        temperature=spec.temperature, kappa=spec.kappa,
                        db_weights=_vote_weights(ctx, spec.weighting))


def _white_box(ctx: AttackContext, aset: AttackSet, x, y, gen) -> torch.Tensor:
    spec, db = aset.spec, ctx.attack_db
    feature_fn = ctx.feature_fn(aset.layer)
    feats = db.features[aset.layer]
    if spec.name == "pgd_pr":
        neigh_feats, neigh_softmax, _ = initial_neighbours(feature_fn, x, feats, db.softmax, spec.k)
        return pgd_pr(ctx.model, feature_fn, x, y, neigh_feats, neigh_softmax, aset.budget,
                      spec.steps, spec.gamma, spec.step_size)
    if spec.name == "pgd_fs":
        with torch.no_grad():
            query_feats = feature_fn(x)
        _, targets = choose_targets(feats, db.labels, query_feats, y, spec.m, gen, spec.target)
        return pgd_fs(feature_fn, x, targets, aset.budget, spec.steps, spec.step_size)
    # adaptive: attack the configured vote's weights (CBW weights of the stored softmax)
    return soft_knn_margin_attack(feature_fn, x, y, feats, db.softmax, aset.budget, spec.steps,
                                  spec.k, spec.temperature, spec.candidates, spec.step_size,
                                  _vote_weights(ctx, spec.weighting), spec.random_start, gen)


def set_statistics(x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ctx: AttackContext,
                   aset: AttackSet) -> dict:
    """Independent checks of a finished set: the budget it used, the box, and how often it
    fools the undefended target (and, for black-box sets, the surrogate: the transfer rate)."""
    achieved = normalised_l2(x_adv, x).numpy()
    with torch.inference_mode():
        clean_ok = predict_labels(ctx.model, x) == y
        target_fooled = predict_labels(ctx.model, x_adv) != y
    stats = {"achieved_l2_mean": float(achieved.mean()), "achieved_l2_max": float(achieved.max()),
             "budget_used": float(achieved.mean() / aset.budget),
             "pixels_in_range": bool(((x_adv >= 0) & (x_adv <= 1)).all()),
             "within_budget": bool((achieved <= aset.budget * (1 + 1e-4)).all()),
             "undefended_error_rate": float(target_fooled.float().mean())}
    if aset.threat == "black_box":
        with torch.inference_mode():
            surrogate_fooled = predict_labels(ctx.surrogate, x_adv) != y
        base = surrogate_fooled & clean_ok
        stats["surrogate_error_rate"] = float(surrogate_fooled.float().mean())
        # of the images the target got right and the surrogate's attack fooled the surrogate on,
        # the fraction that also fool the target
        stats["transfer_rate"] = float((target_fooled & base).sum() / max(int(base.sum()), 1))
    return stats


def predict_labels(model, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The classifier's labels for images ``x`` in [0, 1], in batches (call under inference_mode)."""
    return torch.cat([model(x[s:s + batch]).argmax(1) for s in range(0, len(x), batch)])
