"""Experiments: the evaluation grid over attacks x databases x defenses, resumable by cell.

An experiment file names a job (whose pipeline builds the defense database; it is run first,
like make, by pipeline/runtime/experiment.py: building is the caller's step), optional extra databases (subsets of the job's database: IG-N-All / IG-N-Targeted
of several sizes, built by the same pipeline with the job's classifier), and an ``evaluate``
section with the job spec's own schema. A job's ``evaluate`` stage runs the same code on its
one database, so a demo job and an experiment share one code path:

    knn-defense evaluate experiments/fashion-mnist.yaml

Without a job, an experiment evaluates a pretrained classifier alone (no kNN), e.g. the
undefended EfficientNet-Lite0 on labelled ImageNet samples.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import yaml
from pydantic import Field, ValidationError, model_validator
from tqdm import tqdm

from pipeline.attacks.noise import random_noise
from pipeline.config import (
    CONTROL_ATTACKS,
    HARD_LABEL_ATTACKS,
    WHITE_BOX_ATTACKS,
    ConfigError,
    EvaluateSpec,
    ModelSpec,
    SubsetSpec,
    _problems,
    _Strict,
    read_spec_file,
)
from pipeline.evaluate.grid import (
    NONE,
    cell_rows,
    defense_list,
    predict_defenses,
    save_npz,
    wilson_interval,
    worst_case_rows,
)
from pipeline.evaluate.hard_label import hard_label_rows, run_hard_label, subsample_worst_case_rows
from pipeline.evaluate.report import headline_budget
from pipeline.evaluate.sanity import Outcome, sanity_checks
from pipeline.evaluate.suite import (
    AttackContext,
    AttackDatabase,
    craft,
    plan_sets,
    set_statistics,
)
from pipeline.features.backbones import decode_args, images_to_tensor
from pipeline.fingerprints import fingerprint

log = logging.getLogger(__name__)


# --- the experiment file ------------------------------------------------------------------------

class DatabaseVariant(_Strict):
    """Another database for the grid: the job's pipeline on a subset of its database."""

    label: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # default IG-<N>-<Kind>
    subset: SubsetSpec

    @property
    def name(self) -> str:
        return self.label or f"IG-{_short(self.subset.size)}-{self.subset.kind.capitalize()}"


class ExperimentSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str | None = None  # default runs/experiments/<name>
    job: str | None = None  # job YAML whose defense is evaluated (built first if needed)
    include_job_database: bool = True  # evaluate the job's own database too
    databases: list[DatabaseVariant] = []
    model: ModelSpec | None = None  # without a job: the (pretrained) classifier to attack
    queries: str | list[str] | None = None  # default: the job's data.queries
    max_image_pixels: Annotated[int, Field(gt=0)] = 89_478_485
    evaluate: EvaluateSpec = EvaluateSpec()

    @model_validator(mode="after")
    def _consistent(self):
        if self.output_dir is None:
            self.output_dir = f"runs/experiments/{self.name}"
        if (self.job is None) == (self.model is None):
            raise ValueError("give exactly one of `job` (a kNN defense to evaluate) or `model` "
                             "(an undefended classifier)")
        if self.job is None:
            if self.queries is None:
                raise ValueError("`queries` (labelled shards) is required without a job")
            if self.databases:
                raise ValueError("`databases` are subsets of a job's database: set `job`")
            white = [a.name for a in self.evaluate.attacks if a.name in WHITE_BOX_ATTACKS]
            if white:
                raise ValueError(f"white-box attacks {white} need a kNN defense: set `job`")
        names = [d.name for d in self.databases]
        if len(set(names)) != len(names):
            raise ValueError(f"database labels must be unique, got {names}")
        return self


def load_experiment(path: str | os.PathLike, overrides: dict | None = None) -> ExperimentSpec:
    """Read and validate an experiment file; relative paths in it are relative to the current
    directory, as in job files. Raises ConfigError (one line) before any work."""
    path = Path(path)
    raw = read_spec_file(path, "experiment file", overrides)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment must be a YAML mapping")
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError.listing(str(path), _problems(err)) from None
    if spec.job is not None and not Path(spec.job).is_file():
        raise ConfigError(f"{path}: job {spec.job!r} not found")
    if spec.queries is not None:
        from pipeline.data.shards import expand_shards

        try:
            if not expand_shards(spec.queries):
                raise FileNotFoundError(f"{spec.queries!r} matches no .tar shard")
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: queries: {err}") from None
    return spec


def is_experiment_file(path: str | os.PathLike) -> bool:
    """Experiment files have no `data` section (job files must)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "data" not in raw


def _short(n: int) -> str:
    for div, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


# --- the databases (built by pipeline/runtime/experiment.py through the job runner) ---------

def variant_job(job_spec, variant: DatabaseVariant, exp: ExperimentSpec, weights: str):
    """The job that builds ``variant``: the base job on a subset, with the base job's trained
    classifier (so every database is indexed by the same features)."""
    from pipeline.config import JobSpec

    raw = job_spec.model_dump(mode="json")
    raw["name"] = f"{job_spec.name}-{variant.name}"
    raw["output_dir"] = str(Path(exp.output_dir) / "databases" / variant.name)
    raw["subset"] = variant.subset.model_dump(mode="json")
    raw["model"]["weights"] = str(Path(weights).resolve())
    return JobSpec.model_validate(raw)


# --- evaluation ------------------------------------------------------------------------------

@dataclass
class Database:
    label: str
    size: int
    defense: object  # DefendedClassifier, or None: undefended classifier only
    fingerprint: str
    job_dir: str | None = None


def open_database(label: str, job_dir: str, **overrides) -> Database:
    from pipeline.defense.classifier import DefendedClassifier
    from pipeline.jobfolder import database_size
    from pipeline.layout import JobLayout, read_json

    defense = DefendedClassifier.from_job(job_dir, **overrides)
    layout = JobLayout(job_dir)
    store = read_json(layout.store_info)
    infos = [read_json(layout.index_info(layer)) for layer in defense.layers]
    # a changed database (knn-defense add / remove: pipeline/runtime/living.py) is another one
    changed = [defense.generation] if defense.generation else []
    fp = _hash(store, infos, str(Path(job_dir).resolve()), *changed)
    return Database(label, database_size(layout, int(store["count"])), defense, fp, job_dir)


def _hash(*parts) -> str:
    """Fingerprint in the names of saved sets and cells (12 hex digits)."""
    return fingerprint(*parts, length=12)


def _list_samples(urls: list[str]) -> tuple[list[str], list[int], dict]:
    """Keys and shard positions of every sample with an image (decode-free: tar headers and
    labels only), and the skip counts of that scan."""
    from collections import Counter

    from pipeline.data.shards import ShardStats, iter_samples

    keys, where, skipped = [], [], Counter()
    for u, url in enumerate(urls):
        stats = ShardStats()
        for sample in iter_samples(url, stats, decode=False, meta_exts=("cls",)):
            if sample.label is None:
                raise ValueError(f"{url}: sample {sample.key} has no label (.cls): evaluation "
                                 "needs a label for every query image")
            keys.append(sample.key)
            where.append(u)
        skipped.update(stats.skipped)
    return keys, where, dict(skipped)


def _decode_samples(urls: list[str], keys: set[str], decode: dict) -> tuple[dict, dict]:
    """{key: (image, label)} of ``keys``, read from the shards of ``urls`` only (passing
    other samples over unread), and the skip counts of those decoded."""
    from pipeline.data.shards import NoDecodableImage
    from pipeline.features.tensor_decode import load_images_like_database

    if not keys or not urls:
        return {}, {}
    try:
        got, images, labels, skipped = load_images_like_database(urls, only_keys=keys, **decode)
    except NoDecodableImage:
        return {}, {"corrupt_image": len(keys)}
    return {k: (images[i], int(labels[i])) for i, k in enumerate(got)}, skipped


class QuerySplit:
    """The query split as keys, decoded on demand: the fixed-seed query sample and the rest of
    the split (the white-box attacker may draw from it: images outside the query sample)."""

    def __init__(self, urls: list[str], keys: list[str], where: list[int], decode: dict):
        self.urls, self.keys, self.where, self.decode = urls, keys, where, decode

    def __len__(self) -> int:
        return len(self.keys)

    def draw(self, rng, n: int, pool: np.ndarray | None = None, sort: bool = True
             ) -> tuple[list[str], np.ndarray, np.ndarray, dict, np.ndarray]:
        """``n`` samples drawn uniformly (``rng.choice``) from positions ``pool`` (default
        all), decoded from only the shards holding them, in split order when ``sort``; a drawn
        image that does not decode is replaced by another draw. Returns keys, images, labels,
        skip counts, and the positions used."""
        from collections import Counter

        pool = np.arange(len(self.keys)) if pool is None else np.asarray(pool)
        n = min(n, len(pool))
        if n == len(pool) and sort:  # the whole pool, in order: no draw
            picked = pool.copy()
        else:
            picked = rng.choice(pool, n, replace=False)
            picked = np.sort(picked) if sort else picked
        done: dict[int, tuple] = {}
        skipped: Counter = Counter()
        remaining = np.setdiff1d(pool, picked)
        todo = picked
        while len(todo):
            shards = sorted({self.where[i] for i in todo})
            got, skips = _decode_samples([self.urls[u] for u in shards],
                                         {self.keys[i] for i in todo}, self.decode)
            skipped.update(skips)
            done.update({int(i): got[self.keys[i]] for i in todo if self.keys[i] in got})
            missing = n - len(done)
            if missing <= 0 or not len(remaining):
                break
            todo = rng.choice(remaining, min(missing, len(remaining)), replace=False)
            remaining = np.setdiff1d(remaining, todo)
        order = [i for i in (sorted(done) if sort else done)]
        if not order:
            from pipeline.data.shards import NoDecodableImage

            raise NoDecodableImage(f"no decodable image among {n} drawn from {len(self.urls)} shard(s)")
        images = np.stack([done[i][0] for i in order])
        labels = np.asarray([done[i][1] for i in order], np.int64)
        return [self.keys[i] for i in order], images, labels, dict(skipped), np.asarray(order)


def load_queries(query_urls: list[str], model, ev: EvaluateSpec, max_pixels: int,
                 decoder: str = "pil", exclude: set[str] | None = None):
    """(the fixed-seed query sample: keys, images uint8, labels, skip counts; the rest of the
    split as a :class:`QuerySplit` and the positions outside the sample). Only the sample is
    decoded (by ``decoder``, the database recipe's), from the shards holding it: the split is
    listed without decoding, ``num_queries`` positions drawn from it (the same positions as
    when the whole split was decoded, unless an image fails to decode; then another draw
    replaces it). ``exclude``: query keys taken out of the split before the draw (those with a
    near-duplicate in the database); the sample's ``excluded`` counts them."""
    keys, where, skipped = _list_samples(query_urls)
    excluded = 0
    if exclude:
        kept = [i for i, key in enumerate(keys) if key not in exclude]
        excluded = len(keys) - len(kept)
        keys, where = [keys[i] for i in kept], [where[i] for i in kept]
    if not keys:
        from pipeline.data.shards import NoDecodableImage

        raise NoDecodableImage(f"no decodable image in {len(query_urls)} shard(s)")
    split = QuerySplit(query_urls, keys, where,
                       dict(decoder=decoder, max_pixels=max_pixels, **decode_args(model)))
    rng = np.random.default_rng(ev.seed)
    n = len(keys) if ev.num_queries is None else min(ev.num_queries, len(keys))
    chosen_keys, images, labels, skips, chosen = split.draw(rng, n)
    for reason, count in skips.items():
        skipped[reason] = skipped.get(reason, 0) + count
    rest = np.setdiff1d(np.arange(len(keys)), chosen)
    return ({"keys": chosen_keys, "images": images, "labels": labels, "skipped": skipped,
             "excluded": excluded}, {"split": split, "positions": rest})


def _database_counts(layout, job) -> tuple[list, np.ndarray, str]:
    """Where the defense database's rows are counted: the subset manifest's row groups
    (its keys), or each feature shard's row count (Parquet metadata: nothing decoded)."""
    import pyarrow.parquet as pq

    if layout.subset_manifest.is_file() and job.subset is not None:
        meta = pq.ParquetFile(layout.subset_manifest).metadata
        return list(range(meta.num_row_groups)), np.asarray(
            [meta.row_group(g).num_rows for g in range(meta.num_row_groups)], np.int64), "subset"
    table = pq.read_table(layout.shards_table, columns=["shard_index"])
    shards = table.column("shard_index").to_pylist()
    return shards, np.asarray([pq.read_metadata(layout.features_file(i)).num_rows for i in shards],
                              np.int64), "features"


def database_sample_keys(layout, job, rng, n: int) -> dict[int, set[str]]:
    """``n`` defense-database keys drawn uniformly (positions over the per-unit counts, then
    (unit, row) pairs), as {shard_index: keys}: only the units holding them are read."""
    import pyarrow.parquet as pq

    units, counts, kind = _database_counts(layout, job)
    total = int(counts.sum())
    if n > total:
        raise ValueError(f"evaluate.attack_database: {n} defense-database images wanted, "
                         f"the database has {total}")
    positions = np.sort(rng.choice(total, n, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    unit_of = np.searchsorted(starts, positions, side="right") - 1
    by_shard: dict[int, set[str]] = {}
    subset = pq.ParquetFile(layout.subset_manifest) if kind == "subset" else None
    for u in np.unique(unit_of):
        rows = positions[unit_of == u] - starts[u]
        if subset is not None:
            group = subset.read_row_group(int(units[u]), columns=["key", "shard_index"])
            picked = group.take(rows)
            for key, shard in zip(picked.column("key").to_pylist(),
                                  picked.column("shard_index").to_pylist(), strict=True):
                by_shard.setdefault(int(shard), set()).add(key)
        else:
            col = pq.read_table(layout.features_file(units[u]), columns=["key"]).column("key")
            by_shard.setdefault(int(units[u]), set()).update(col.take(rows).to_pylist())
    return by_shard


def build_attack_database(defense, job_dir: str, spec_ad, rest: dict, layers: list[str],
                          batch: int = 512) -> AttackDatabase:
    """``size`` images: ``overlap`` of them from the defense database, the rest from query-split
    images outside the query sample; then their features per layer (the defense's own pooling
    and PCA) and softmax. The database images are (shard, row) pairs drawn uniformly from the
    per-shard row counts (the subset manifest's, or the feature files'), decoded from only the
    shards holding them; ``rest``: ``load_queries``'s (a QuerySplit and positions, decoded on
    demand), or decoded ``images``."""
    import pyarrow.parquet as pq

    from pipeline.jobfolder import load_spec
    from pipeline.layout import JobLayout

    rng = np.random.default_rng(spec_ad.seed)
    n_in = int(round(spec_ad.size * spec_ad.overlap))
    n_out = spec_ad.size - n_in
    outside = len(rest["images"]) if "images" in rest else len(rest["positions"])
    if n_out > outside:
        raise ValueError(f"evaluate.attack_database: {n_out} images outside the defense database "
                         f"wanted, only {outside} query-split images are outside the "
                         "query sample; raise overlap or lower size")
    layout = JobLayout(job_dir)
    job = load_spec(job_dir)
    by_shard = database_sample_keys(layout, job, rng, n_in)
    parts = []
    if by_shard:
        urls = dict(zip(*[pq.read_table(layout.shards_table, columns=[c]).column(c).to_pylist()
                          for c in ("shard_index", "url")], strict=True))
        wanted = set().union(*by_shard.values())
        decode = dict(decoder=defense.decoder, max_pixels=job.data.max_image_pixels,
                      **decode_args(defense.model))
        got, _ = _decode_samples([urls[s] for s in sorted(by_shard)], wanted, decode)
        if got:
            parts.append(np.stack([image for image, _ in got.values()]))
    if n_out and "images" in rest:
        parts.append(rest["images"][rng.choice(len(rest["images"]), n_out, replace=False)])
    elif n_out:
        parts.append(rest["split"].draw(rng, n_out, rest["positions"], sort=False)[1])
    x = images_to_tensor(np.concatenate(parts))
    feats = {layer: [] for layer in layers}
    probs = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            logits, taps = defense.model.forward_taps(x[s:s + batch], layers)
            probs.append(logits.softmax(1))
            for layer in layers:
                stack = defense.transforms[layer]
                feats[layer].append(stack.project_torch(stack.pool(taps[layer])))
    softmax = torch.cat(probs)
    return AttackDatabase({k: torch.cat(v) for k, v in feats.items()}, softmax, softmax.argmax(1),
                          from_defense=sum(len(k) for k in by_shard.values()))


def given_model(spec: ModelSpec, seed: int) -> tuple[torch.nn.Module, str]:
    """A classifier that is not trained here, in eval mode, and what identifies its weights:
    ``weights: random`` (a seeded init), a weights file, or the arch's pretrained weights."""
    from pipeline.features.backbones import build_model, file_sha256, load_model, pretrained_weights

    if spec.weights == "random":
        torch.manual_seed(seed)
        return build_model(spec).eval(), "random"
    weights = pretrained_weights(spec)  # the given file, else the packaged / cached one
    return load_model(spec, weights).eval(), file_sha256(weights)


def surrogate_builder(surrogate, train_urls: list[str] | None, cache_dir: Path, max_pixels: int,
                      seed: int = 0):
    """The black-box attacker's model: given / pretrained, or trained here on the database
    images (cached by content hash, like the train stage)."""
    def build():
        from pipeline.features.backbones import file_sha256, load_model

        spec = surrogate.model
        if not spec.trained_here:
            return given_model(spec, seed)[0]
        from pipeline.data.shards import load_images
        from pipeline.train.classifier import train_classifier, training_hash

        if not train_urls:
            raise ValueError("evaluate.surrogate is trained on the job's database: set `job`")
        digests = [file_sha256(u) if "://" not in u else u for u in train_urls]
        path = cache_dir / f"classifier-{training_hash(spec, surrogate.train, digests)}.pt"
        if not path.is_file():
            _, images, labels, _ = load_images(train_urls, spec.in_channels, None, max_pixels)
            train_classifier(spec, surrogate.train, images, labels, path)
        return load_model(spec, path)
    return build


def run_grid(out_dir: str | os.PathLike, ev: EvaluateSpec, queries: dict, ctx: AttackContext,
             databases: list[Database], layers: list[str], context_fp: str,
             progress: bool = True) -> dict:
    """Craft every adversarial set, evaluate every (database, set) cell, and aggregate rows.
    Sets and cells already on disk (same fingerprints) are loaded, not recomputed."""
    out = Path(out_dir)
    x = images_to_tensor(queries["images"])
    y = torch.as_tensor(queries["labels"], dtype=torch.long)
    labels = queries["labels"]
    sets = plan_sets(ev.attacks, layers)
    adversarial, set_stats, crafted = {}, [], 0
    bar = tqdm(total=len(sets) * len(x), desc="attacks", unit="img", disable=not progress)
    set_fps = {"clean": "clean"}  # condition -> fingerprint of the images its cells evaluate
    for aset in sets:
        set_fps[aset.label] = aset.fingerprint(context_fp)
        path = out / "sets" / f"{aset.label}-{set_fps[aset.label]}.npz"
        if path.is_file():
            with np.load(path) as saved:
                adversarial[aset.label] = torch.from_numpy(saved["x"])
                stats = json.loads(str(saved["stats"]))
            bar.update(len(x))
        else:
            t = time.time()
            bar.set_postfix_str(aset.label)
            x_adv, extra = craft(ctx, aset, x, y, bar)
            stats = {"condition": aset.label, "attack": aset.attack, "threat": aset.threat,
                     "target_layer": aset.layer or "", "budget": aset.budget,
                     **set_statistics(x_adv, x, y, ctx, aset), **extra,
                     "seconds": round(time.time() - t, 2)}
            save_npz(path, x=x_adv.numpy(), stats=json.dumps(stats))
            adversarial[aset.label] = x_adv
            crafted += 1
        set_stats.append(stats)
    bar.close()
    defenses = defense_list(layers, ev.weightings, ev.all_ks) if layers else [NONE]
    grid_fp = _hash(context_fp, defenses, ev.cbw_d.model_dump())
    rows, evaluated, hard_label, sanity, per_db = [], 0, {}, {}, {}
    specs_by_label = {s.label: s for s in sets}
    with torch.inference_mode():
        num_classes = int(ctx.model(x[:1]).shape[1])
    conditions = [({"condition": "clean", "attack": "clean", "threat": "-", "target_layer": "",
                    "budget": 0.0}, "clean", x)] + [
        ({k: s[k] for k in ("condition", "attack", "threat", "target_layer", "budget")},
         s["condition"], adversarial[s["condition"]]) for s in set_stats]
    for db in tqdm(databases, desc="databases", unit="db", disable=not progress or len(databases) < 2):
        db_fields = {"database": db.label, "db_size": db.size}
        db_defenses = defenses if db.defense is not None else [NONE]
        preds_by_cond = {}
        for cond, label, images in conditions:
            # the set's own fingerprint too: a re-crafted set (changed attack settings, same
            # label) must not reuse the predictions made on its predecessor
            path = out / "cells" / db.label / f"{label}-{set_fps[label]}-{grid_fp}-{db.fingerprint}.npz"
            if path.is_file():
                with np.load(path) as saved:
                    preds = saved["preds"]
            else:
                preds = predict_defenses(db.defense, ctx.model, images, db_defenses)
                save_npz(path, preds=preds, labels=labels)
                evaluated += 1
            preds_by_cond[label] = preds
            rows.extend(cell_rows(db_fields, {**cond, "attacks_in_worst_case": ""}, db_defenses,
                                  preds, labels))
        # A perturbation within a smaller budget is within every larger one too, so the worst
        # case at budget b is over every set of budget <= b (and never rises with b).
        by_budget = {b: [preds_by_cond[s["condition"]] for s in set_stats if s["budget"] <= b]
                     for b in sorted({s["budget"] for s in set_stats})}
        rows.extend(worst_case_rows(db_fields, preds_by_cond["clean"], by_budget, db_defenses, labels))
        outcomes = [Outcome(set_meta(s, specs_by_label.get(s["condition"])), db_defenses,
                            preds_by_cond[s["condition"]] == labels[None]) for s in set_stats]
        for spec in (a for a in ev.attacks if a.name in CONTROL_ATTACKS):
            for budget in spec.budgets:
                fraction, computed = noise_cell(out, db, spec, budget, x, ctx.model, db_defenses,
                                                labels, ev.seed, f"{context_fp}{grid_fp}", progress)
                evaluated += computed
                meta = {"condition": f"noise-random@{budget:g}", "attack": spec.label,
                        "name": "noise", "tag": spec.tag, "threat": "random",
                        "target_layer": "", "budget": budget, "draws": spec.draws}
                outcomes.append(Outcome(meta, db_defenses, fraction))
                rows.extend(fraction_rows(db_fields, meta, db_defenses, fraction))
        checked = [d for d in db_defenses if d == NONE or d[2] == ev.k]
        clean = Outcome({"condition": "clean", "attack": "clean", "name": "clean", "tag": None,
                         "threat": "-", "target_layer": "", "budget": 0.0}, db_defenses,
                        preds_by_cond["clean"] == labels[None])
        per_db[db.label] = (db, db_fields, db_defenses, preds_by_cond, outcomes, clean, checked)
    # The hard-label attack last (every cheaper cell is on disk first), on the grid's first
    # database only (the job's own, unless the experiment leaves it out): a forward pass and a
    # search per query.
    for spec in (a for a in ev.attacks if a.name in HARD_LABEL_ATTACKS):
        db, db_fields, db_defenses, preds_by_cond, outcomes, _, _ = per_db[databases[0].label]
        # what its answers depend on: the images, the classifiers (database, vote settings)
        # and the attack; not the other attackers' models or databases. batch_size too: the
        # batch runs in lockstep, so it changes the queries.
        set_fp = _hash(spec.model_dump(), queries["keys"], labels.tolist(), ev.seed,
                       ev.cbw_d.model_dump(), db.fingerprint)
        records = run_hard_label(out, spec, x, y, db, ctx.model, layers, ev, set_fp,
                                 num_classes, progress)
        hard_label[spec.label] = [{**r["stats"], "classifier": r["defense"][0],
                                   "weighting": r["defense"][1], "k": r["defense"][2],
                                   "budget": spec.budgets[0]} for r in records]
        rows.extend(hard_label_rows(records, spec, labels, db_fields))
        budget = spec.budgets[0]
        rows.extend(subsample_worst_case_rows(
            records, preds_by_cond["clean"],
            [preds_by_cond[s["condition"]] for s in set_stats if s["budget"] <= budget],
            db_defenses, labels, budget, db_fields))
        for qi, q in enumerate(spec.query_budgets):
            meta = {"condition": f"{spec.label}-hard_label@{budget:g}/{q}", "attack": spec.label,
                    "name": spec.name, "tag": spec.tag, "threat": "hard_label",
                    "target_layer": "", "budget": budget, "queries": q}
            outcomes.extend(Outcome(meta, [r["defense"]], r["correct"][qi][None], r["images"])
                            for r in records)
    for label, (_, _, _, _, outcomes, clean, checked) in per_db.items():
        sanity[label] = sanity_checks(outcomes, clean, checked, num_classes,
                                      headline_budget(ev, rows))
    return {"rows": rows, "attacks": set_stats, "sets_crafted": crafted, "cells_evaluated": evaluated,
            "num_queries": len(x), "hard_label": hard_label, "sanity": sanity}


def set_meta(stats: dict, aset) -> dict:
    """What the sanity checks know of a set: its statistics plus the spec's name, tag, steps
    and restarts."""
    spec = getattr(aset, "spec", None)
    return {**stats, "name": stats["attack"].split(".")[0], "tag": getattr(spec, "tag", None),
            "steps": getattr(spec, "steps", None), "restarts": getattr(spec, "restarts", 1)}


def noise_cell(out: Path, db, spec, budget: float, x: torch.Tensor, model, defenses: list[tuple],
               labels: np.ndarray, seed: int, context: str, progress: bool
               ) -> tuple[np.ndarray, bool]:
    """(Fraction of ``spec.draws`` random-noise draws each defense gets right, per image [D, N],
    whether it was computed now). The draws are regenerated from their seeds, never stored; the
    cell is written once."""
    fp = _hash(spec.model_dump(exclude={"batch_size", "budget"}), budget, seed, context,
               db.fingerprint)
    path = out / "cells" / db.label / f"noise-random@{budget:g}-{fp}.npz"
    if path.is_file():
        with np.load(path) as saved:
            return saved["fraction"], False
    correct = np.zeros((len(defenses), len(x)), dtype=np.int32)
    for draw in tqdm(range(spec.draws), desc=f"noise@{budget:g} ({db.label})", unit="draw",
                     disable=not progress):
        gen = torch.Generator().manual_seed(seed * 100_003 + draw)
        images = random_noise(x, budget, gen)
        correct += predict_defenses(db.defense, model, images, defenses) == labels[None]
    fraction = correct / spec.draws
    save_npz(path, fraction=fraction, draws=spec.draws)
    return fraction, True


def fraction_rows(db_fields: dict, meta: dict, defenses: list[tuple], fraction: np.ndarray) -> list[dict]:
    """Rows of a condition scored as a fraction per image (random noise): the accuracy is the
    mean over images and draws; its 95% interval is the Wilson interval over the images
    (draws of one image are not independent)."""
    rows = []
    n = fraction.shape[1]
    fields = {k: meta[k] for k in ("condition", "attack", "threat", "target_layer", "budget")}
    for i, (layer, rule, k) in enumerate(defenses):
        correct = float(fraction[i].sum())
        lo, hi = wilson_interval(round(correct), n)
        rows.append({**db_fields, **fields, "attacks_in_worst_case": "", "layer": layer,
                     "weighting": rule, "k": k, "n": n, "correct": round(correct, 3),
                     "accuracy": correct / n, "ci95_low": lo, "ci95_high": hi,
                     "draws": meta["draws"]})
    return rows


def _threads(ev: EvaluateSpec, default: int | None) -> None:
    n = ev.threads or default
    if n:
        torch.set_num_threads(n)


def _decontamination(job_dir, ev: EvaluateSpec) -> tuple[dict | None, set[str] | None]:
    """(what the report says about decontamination, the query keys to exclude). ``exclude``
    reads eval/decontaminate/duplicates.parquet (written by ``knn-defense decontaminate``) and
    refuses without it. ``remove``: the runner removed the duplicates from the database before
    the evaluate stage (pipeline/runtime/job.py), so nothing is excluded here; evaluate only
    reads the list, to say how many were found. It never removes anything itself."""
    if ev.decontaminate == "off":
        return None, None
    from pipeline.evaluate.decontaminate import read_duplicates

    found = read_duplicates(job_dir, ev.decontaminate)
    info = {"mode": ev.decontaminate, "duplicates_found": found["database_images"],
            "queries_with_duplicate": len(found["query_keys"])}
    return info, (found["query_keys"] if ev.decontaminate == "exclude" else None)


def _decontamination_note(info: dict | None) -> str | None:
    if info is None:
        return None
    found = (f"{info['duplicates_found']:,} database image(s) found as near-duplicates of "
             f"{info['queries_with_duplicate']:,} query image(s) (eval/decontaminate/)")
    if info["mode"] == "remove":
        return (f"Decontamination (remove): {found}, removed from the database before this "
                "evaluation (`knn-defense remove`; generation.json).")
    return (f"Decontamination (exclude): {info['queries_excluded']:,} query image(s) excluded "
            f"from the split before the sample was drawn; {found}.")


def evaluate_job(job_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 ev: EvaluateSpec | None = None, extra_databases: list[tuple[str, str]] = (),
                 include_job_database: bool = True, num_threads: int | None = None,
                 progress: bool = True, title: str | None = None) -> dict:
    """The grid for a finished job (its ``evaluate`` section unless ``ev``), plus any other
    finished job folders as extra databases; writes tables and plots into ``out_dir``
    (default: the job's eval/)."""
    from pipeline.attacks.knn_aware import feature_fn_for
    from pipeline.data.shards import expand_shards
    from pipeline.evaluate.report import write_report
    from pipeline.jobfolder import load_spec
    from pipeline.layout import JobLayout

    job = load_spec(job_dir)
    ev = ev or job.evaluate
    out_dir = Path(out_dir or JobLayout(job_dir).eval_dir)
    _threads(ev, num_threads)
    primary = open_database(job.name, str(job_dir))
    databases = ([primary] if include_job_database else []) + [
        open_database(label, path) for label, path in extra_databases]
    try:
        layers = list(job.features.layers)
        decontamination, exclude = _decontamination(job_dir, ev)
        queries, rest = load_queries(expand_shards(job.data.queries), primary.defense.model, ev,
                                     job.data.max_image_pixels,
                                     decoder=primary.defense.decoder, exclude=exclude)
        defense = primary.defense
        ctx = AttackContext(
            defense.model, ev.seed,
            feature_fn=lambda layer: feature_fn_for(defense, layer),
            surrogate_builder=None if ev.surrogate is None else surrogate_builder(
                ev.surrogate, expand_shards(job.data.database), out_dir / "surrogate",
                job.data.max_image_pixels, ev.seed),
            attack_db_builder=lambda: build_attack_database(defense, str(job_dir), ev.attack_database,
                                                            rest, layers),
            cbw_d=(ev.cbw_d.m, ev.cbw_d.p))
        context_fp = _hash(queries["keys"], queries["labels"].tolist(), primary.fingerprint,
                           ev.seed, ev.attack_database.model_dump(),
                           None if ev.surrogate is None else ev.surrogate.model_dump())
        result = run_grid(out_dir, ev, queries, ctx, databases, layers, context_fp, progress)
    finally:
        for db in {id(d): d for d in [primary, *databases]}.values():
            db.defense.close()
    result["query_skipped"] = queries["skipped"]
    if decontamination is not None:
        decontamination["queries_excluded"] = queries["excluded"]
    result["decontamination"] = decontamination
    result.update(write_report(out_dir, result["rows"], result["attacks"], ev,
                               title=title or job.name, sanity=result["sanity"],
                               hard_label=result["hard_label"],
                               note=_decontamination_note(decontamination)))
    if include_job_database and out_dir == JobLayout(job_dir).eval_dir:
        # the query side's default layer (serve, classify), from this evaluation
        from pipeline.defense.classifier import DEFAULT_WEIGHTING
        from pipeline.evaluate.layer_choice import record_default_layer
        from pipeline.evaluate.report import headline_budget

        result["default_layer"] = record_default_layer(
            JobLayout(job_dir).default_layer, result["rows"], database=primary.label,
            weighting=DEFAULT_WEIGHTING, k=ev.k, budget=headline_budget(ev, result["rows"]))
    return result


def evaluate_model(exp: ExperimentSpec, num_threads: int | None = None, progress: bool = True) -> dict:
    """The grid for a classifier without a kNN defense (attacks and transfer only)."""
    from pipeline.data.shards import expand_shards
    from pipeline.evaluate.report import write_report

    ev = exp.evaluate
    _threads(ev, num_threads)
    model, model_fp = given_model(exp.model, ev.seed)
    queries, _ = load_queries(expand_shards(exp.queries), model, ev, exp.max_image_pixels)
    out_dir = Path(exp.output_dir)
    ctx = AttackContext(model, ev.seed, surrogate_builder=None if ev.surrogate is None else
                        surrogate_builder(ev.surrogate, None, out_dir / "surrogate",
                                          exp.max_image_pixels, ev.seed))
    context_fp = _hash(queries["keys"], queries["labels"].tolist(), model_fp, ev.seed,
                       None if ev.surrogate is None else ev.surrogate.model_dump())
    db = Database("undefended", 0, None, _hash(model_fp))
    result = run_grid(out_dir, ev, queries, ctx, [db], [], context_fp, progress)
    result["query_skipped"] = queries["skipped"]
    result.update(write_report(out_dir, result["rows"], result["attacks"], ev, title=exp.name,
                               sanity=result["sanity"], hard_label=result["hard_label"]))
    return result
