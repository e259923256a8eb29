"""The invariant: every database key is in Parquet, every index and the store exactly once,
and every key read from a shard is either written or skipped with a reason."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.data.subsets import selected_keys
from pipeline.features.extract import read_metadata
from pipeline.features.recipe import FeatureRecipe, RecipeMismatch, check_one_recipe
from pipeline.index.faiss_index import all_ids
from pipeline.jobfolder import load_layer_index
from pipeline.layout import JobLayout, read_json
from pipeline.store.softmax_store import SoftmaxStore


class VerifyFailed(RuntimeError):
    pass


def _check_same(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    uniq, counts = np.unique(got, return_counts=True)
    dups = int((counts > 1).sum())
    missing = np.setdiff1d(expected, uniq).size
    extra = np.setdiff1d(uniq, expected).size
    if dups or missing or extra:
        raise VerifyFailed(f"{name}: {dups} duplicated, {missing} missing, {extra} unexpected ids "
                           f"(of {expected.size})")


def verify_job(job_dir: str, shard_table: list[dict], layers: list[str], partitions: int,
               subset_manifest: str | None = None, subset_apply: str | None = None) -> dict:
    """Check the invariant for every shard; with a subset: selected keys = written + skipped."""
    layout = JobLayout(job_dir)
    expected_ids, all_keys, skipped, recipes = [], [], {}, {}
    for shard in shard_table:
        path = layout.features_file(shard["shard_index"])
        if not path.is_file():
            raise VerifyFailed(f"{path}: missing: shard {shard['shard_index']} ({shard['url']}) has "
                               "no feature file (see `knn-defense status`)")
        table = pq.read_table(path, columns=["key", "id"])
        meta = read_metadata(path)
        stats = meta["stats"]
        recipes[str(path)] = meta.get("recipe")
        keys = table.column("key").to_pylist()
        ids = table.column("id").to_numpy()
        skipped_keys = {k: reason for k, reason in stats.get("skipped_keys", [])}
        lost = sum(stats["skipped"].values())
        if len(skipped_keys) != lost or set(keys) & set(skipped_keys):
            raise VerifyFailed(f"{path}: skipped keys recorded ({len(skipped_keys)}) disagree with "
                               f"skip counts ({lost}) or overlap written keys")
        if subset_manifest is None or subset_apply == "index":
            if stats["read"] != shard["num_keys"] or len(keys) + lost != stats["read"]:
                raise VerifyFailed(f"{path}: read {stats['read']} keys (shard table says "
                                   f"{shard['num_keys']}) but wrote {len(keys)} + skipped {lost}")
        indexed = np.ones(len(ids), bool)
        if subset_manifest is not None:
            selected = selected_keys(subset_manifest, shard["shard_index"])
            accounted = set(keys) | set(skipped_keys) if subset_apply == "features" else None
            if subset_apply == "features" and accounted != selected:
                raise VerifyFailed(f"{path}: {len(selected - accounted)} selected keys neither written "
                                   f"nor skipped, {len(accounted - selected)} not selected")
            if subset_apply == "index":
                lost_selected = selected - set(keys) - set(skipped_keys)
                if lost_selected:
                    raise VerifyFailed(f"{path}: {len(lost_selected)} selected keys are not in the shard")
                indexed = np.fromiter((k in selected for k in keys), bool, len(keys))
            skipped_keys = {k: r for k, r in skipped_keys.items() if k in selected}
        for reason in skipped_keys.values():
            skipped[reason] = skipped.get(reason, 0) + 1
        expected_ids.append(ids[indexed])
        all_keys += keys
    try:  # one job's vectors must all come from one arithmetic (pipeline/features/recipe.py)
        recipe = check_one_recipe(recipes)
    except RecipeMismatch as err:
        raise VerifyFailed(str(err)) from None
    for layer in layers:
        info = layout.index_info(layer)
        recorded = read_json(info).get("recipe") if info.is_file() else None
        if recipe is not None and recorded is not None and recorded != recipe.as_dict():
            raise VerifyFailed(f"{info}: index built from features of recipe "
                               f"{FeatureRecipe.from_dict(recorded).id}, but the feature files "
                               f"are recipe {recipe.id}: re-run the index stage")
    expected = np.concatenate(expected_ids) if expected_ids else np.zeros(0, np.int64)
    _check_same("parquet", expected, np.unique(expected))
    if len(set(all_keys)) != len(all_keys):
        raise VerifyFailed(f"parquet: {len(all_keys) - len(set(all_keys))} duplicated sample keys")
    for layer in layers:
        _check_same(f"index {layer}", all_ids(load_layer_index(layout, layer)), expected)
    with SoftmaxStore(layout.store_dir, partitions) as store:
        _check_same("store", np.fromiter(store.iter_ids(), np.int64), expected)
    return {"keys": int(expected.size), "skipped": skipped, "layers": list(layers),
            "recipe": recipe.id if recipe else None,
            "partitions": partitions, "subset": subset_apply}


def verify_folder(job_dir: str) -> dict:
    """The invariant on a job folder as it is (a path, or a URL: its stages with completion
    markers), from its recorded spec and shard table; no Ray needed."""
    from pipeline.jobfolder import load_spec
    from pipeline.runtime.remote import local_job_dir

    root = local_job_dir(job_dir, required=["shards", "features", "index", "store"])
    spec = load_spec(root)
    layout = JobLayout(root)
    if not layout.shards_table.is_file():
        raise VerifyFailed(f"{layout.shards_table}: missing: the shards stage never finished")
    shards = pq.read_table(layout.shards_table).to_pylist()
    subset = spec.subset
    manifest = str(layout.subset_manifest) if subset is not None else None
    if manifest is not None and not layout.subset_manifest.is_file():
        raise VerifyFailed(f"{manifest}: missing: the subset stage never finished")
    try:
        return verify_job(str(root), shards, spec.features.layers, spec.store.partitions,
                          manifest, subset.apply if subset else None)
    except FileNotFoundError as err:  # an index or store part that was never written
        raise VerifyFailed(f"missing output: {err}") from None
