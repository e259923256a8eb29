"""The invariant: every database key is in Parquet, every index and the store exactly once,
and every key read from a shard is either written or skipped with a reason.

Checked unit by unit, so no process holds N of anything (docs/reliability.md):

- one task per feature shard (:func:`check_feature_shard`): its skipped keys against its skip
  counts, its read count against the shard table, its subset, its ids (its own shard's, once
  each) and its index parts; it returns its recipe and a digest (count, sum of mixed ids) of the
  ids the indexes and the store must hold for it, and spills its keys' 64-bit hashes, sorted,
  to ``verify/keys/<shard>.npy``;
- one task per hash bucket (:func:`check_key_bucket`): the keys whose hash falls in its range,
  read from every shard's spill file by a binary search, checked once across all shards;
- one task per index file (merged, or index shard) and per store partition
  (:func:`digest_index_file`, :func:`digest_store_partition`): per-shard digests of the ids they
  hold, read a chunk at a time (inverted lists memory-mapped; LevelDB iterated);
- the driver (:func:`verify_job`) compares digests shard by shard in O(shards) memory; a shard
  whose digests differ gets a diagnosis task (:func:`diagnose_shard`) that names the ids.

The task functions are plain functions of paths (no Ray here): the job's verify stage runs them
as Ray tasks (``pipeline.runtime.job.stage_verify``), `knn-defense verify` in-process below
``IN_PROCESS_MAX_KEYS`` keys and on a local Ray (or ``--address``) above.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.data.subsets import selected_keys
from pipeline.features.extract import read_metadata
from pipeline.features.recipe import FeatureRecipe, RecipeMismatch, check_one_recipe
from pipeline.ids import ROW_BITS, split_ids
from pipeline.index.faiss_index import has_ondisk_lists, iter_id_chunks
from pipeline.jobfolder import database_shards, read_generations, removed_ids
from pipeline.layout import JobLayout, read_json
from pipeline.runtime.ray_runner import Unit
from pipeline.store.softmax_store import SoftmaxStore, partition_dir

# Keys one duplicate-check bucket holds (16 bytes each: hash and id): the number of buckets is
# ceil(N / BUCKET_KEYS), so a bucket task's memory does not depend on N.
BUCKET_KEYS = 1 << 22
# `knn-defense verify JOB_DIR` runs the units in its own process up to this many keys (about
# 20 s at 1M keys on 2 cores); above, as tasks on a local Ray (or --address).
IN_PROCESS_MAX_KEYS = 5_000_000
CHUNK = 1 << 16  # ids read at a time from an index list or a store partition
DIAGNOSED = 3  # shards whose mismatch is diagnosed id by id (the first ones found)
KEY_DTYPE = np.dtype([("hash", "<u8"), ("id", "<i8")])


class VerifyFailed(RuntimeError):
    pass


# --- digests and hashes -------------------------------------------------------------------------

def mix_ids(ids: np.ndarray) -> np.ndarray:
    """splitmix64 of each id: a digest sums these (mod 2^64), so two id multisets of one shard
    with the same count and sum are equal unless ~2^-64 bad luck; order does not matter."""
    z = np.asarray(ids, np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def id_digest(ids: np.ndarray) -> tuple[int, int]:
    return len(ids), int(mix_ids(ids).sum(dtype=np.uint64))


def key_hashes(keys: list[str]) -> np.ndarray:
    """64-bit blake2b of each sample key."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little")
                        for k in keys), np.uint64, len(keys))


def bucket_of(hashes: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket of each key hash: a hash range, so a shard's sorted hashes hold each bucket as
    one slice."""
    return ((hashes >> np.uint64(32)) * np.uint64(num_buckets)) >> np.uint64(32)


def _bucket_start(bucket: int, num_buckets: int) -> int:
    """Smallest hash in ``bucket`` (2^64 for bucket == num_buckets)."""
    return -(-(bucket << 32) // num_buckets) << 32


def _describe(i: int) -> str:
    shard, row = split_ids(np.int64(i))
    return f"id {int(i)} = shard {int(shard)} row {int(row)}"


def _key_at(features_file: Path, row: int) -> str | None:
    try:
        col = pq.read_table(features_file, columns=["key"]).column("key")
        return col[row].as_py() if row < len(col) else None
    except (OSError, ValueError):
        return None


# --- per feature shard --------------------------------------------------------------------------

def _read_shard(job_dir: str, shard_index: int, url: str, num_keys: int,
                subset_manifest: str | None, subset_apply: str | None) -> dict:
    """One feature shard's keys and ids, checked on their own; ``indexed``: the rows the
    indexes and the store hold (all, or the subset's when it applies at the index)."""
    path = JobLayout(job_dir).features_file(shard_index)
    if not path.is_file():
        raise VerifyFailed(f"{path}: missing: shard {shard_index} ({url}) has "
                           "no feature file (see `knn-defense status`)")
    table = pq.read_table(path, columns=["key", "id"])
    meta = read_metadata(path)
    stats = meta["stats"]
    keys = table.column("key").to_pylist()
    ids = table.column("id").to_numpy()
    del table
    skipped_keys = {k: reason for k, reason in stats.get("skipped_keys", [])}
    lost = sum(stats["skipped"].values())
    if len(skipped_keys) != lost or not skipped_keys.keys().isdisjoint(keys):
        raise VerifyFailed(f"{path}: skipped keys recorded ({len(skipped_keys)}) disagree with "
                           f"skip counts ({lost}) or overlap written keys")
    if subset_manifest is None or subset_apply == "index":
        if stats["read"] != num_keys or len(keys) + lost != stats["read"]:
            raise VerifyFailed(f"{path}: read {stats['read']} keys (shard table says "
                               f"{num_keys}) but wrote {len(keys)} + skipped {lost}")
    shards, _ = split_ids(ids)
    if len(ids) and (shards != shard_index).any():
        wrong = int(ids[np.flatnonzero(shards != shard_index)[0]])
        raise VerifyFailed(f"{path}: holds {int((shards != shard_index).sum())} ids of another "
                           f"shard (e.g. {_describe(wrong)}): re-extract shard {shard_index}")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise VerifyFailed(f"{path}: {int((counts > 1).sum())} ids repeat (e.g. "
                           f"{_describe(int(uniq[counts > 1][0]))}): re-extract shard {shard_index}")
    del uniq, counts
    # removed images (pipeline/runtime/living.py) stay in their feature file, marked in
    # removed/removed.parquet: no index file or store partition may hold them
    indexed = ~np.isin(ids, removed_ids(JobLayout(job_dir), shard_index))
    if subset_manifest is not None:
        selected = selected_keys(subset_manifest, shard_index)
        if subset_apply == "features":
            accounted = set(keys) | set(skipped_keys)
            if accounted != selected:
                raise VerifyFailed(f"{path}: {len(selected - accounted)} selected keys neither "
                                   f"written nor skipped, {len(accounted - selected)} not selected")
        if subset_apply == "index":
            lost_selected = selected - set(keys) - set(skipped_keys)
            if lost_selected:
                raise VerifyFailed(f"{path}: {len(lost_selected)} selected keys are not in the shard")
            indexed &= np.fromiter((k in selected for k in keys), bool, len(keys))
        skipped_keys = {k: r for k, r in skipped_keys.items() if k in selected}
    return {"path": path, "keys": keys, "ids": ids, "indexed": indexed, "meta": meta,
            "skipped_keys": skipped_keys}


def _compare(what: str, got: np.ndarray, expected: np.ndarray, features_file: Path,
             remedy: str) -> None:
    """Raise naming the first missing / unexpected / repeated id when ``got`` != ``expected``
    (both one shard's ids)."""
    uniq, counts = np.unique(got, return_counts=True)
    dups = uniq[counts > 1]
    missing = np.setdiff1d(expected, uniq)
    extra = np.setdiff1d(uniq, expected)
    if not (len(dups) or len(missing) or len(extra)):
        return
    if len(missing):
        i, kind = int(missing[0]), "missing"
    elif len(extra):
        i, kind = int(extra[0]), "unexpected"
    else:
        i, kind = int(dups[0]), "repeated"
    key = _key_at(features_file, int(split_ids(np.int64(i))[1]))
    raise VerifyFailed(f"{what}: {len(missing)} missing, {len(extra)} unexpected, {len(dups)} "
                       f"duplicated ids of {len(expected)} in {features_file} (e.g. {kind} "
                       f"{_describe(i)}{f', key {key!r}' if key is not None else ''}): {remedy}")


def check_feature_shard(job_dir: str, shard_index: int, url: str, num_keys: int, keys_dir: str,
                        layers: list[str] = (), subset_manifest: str | None = None,
                        subset_apply: str | None = None) -> dict:
    """One task per feature shard: the shard's own checks, its index parts (where they are
    kept) id by id; spills its keys' hashes (sorted, with their ids) to
    ``keys_dir/<shard>.npy`` for the bucket tasks. Returns counts, the recipe, and the digest
    of the ids the indexes and the store must hold for this shard."""
    layout = JobLayout(job_dir)
    shard = _read_shard(job_dir, shard_index, url, num_keys, subset_manifest, subset_apply)
    keys, ids, path = shard["keys"], shard["ids"], shard["path"]
    if keys:
        spill = np.empty(len(keys), KEY_DTYPE)
        spill["hash"] = key_hashes(keys)
        spill["id"] = ids
        spill.sort(order="hash", kind="stable")
        out = Path(keys_dir) / f"{shard_index:05d}.npy"
        tmp = out.with_name(out.name + ".tmp.npy")
        np.save(tmp, spill)
        os.replace(tmp, out)
        del spill
    expected = ids[shard["indexed"]]
    for layer in layers:
        part = layout.index_part(layer, shard_index)
        if part.is_file():  # populate's output, where kept: checked id by id
            got = np.concatenate([c.copy() for c in iter_id_chunks(part)] or [np.zeros(0, np.int64)])
            _compare(f"index {layer}: part {part}", got, expected, path,
                     f"re-run the index populate step for shard {shard_index}, then merge")
    skipped: dict[str, int] = {}
    for reason in shard["skipped_keys"].values():
        skipped[reason] = skipped.get(reason, 0) + 1
    count, total = id_digest(expected)
    return {"shard_index": shard_index, "file": str(path), "written": len(keys), "indexed": count,
            "digest": str(total), "skipped": skipped, "recipe": shard["meta"].get("recipe")}


# --- duplicate keys across shards ---------------------------------------------------------------

def check_key_bucket(keys_dir: str, bucket: int, num_buckets: int, features_dir: str) -> dict:
    """One task per hash bucket: every key whose hash is in the bucket's range, from every
    shard's spill file (a binary search in each, memory-mapped), must be there once. Equal
    hashes are confirmed on the keys themselves before failing."""
    lo, hi = _bucket_start(bucket, num_buckets), _bucket_start(bucket + 1, num_buckets)
    parts = []
    with os.scandir(keys_dir) as entries:
        for entry in entries:
            if not entry.name.endswith(".npy") or ".tmp" in entry.name:
                continue
            spilled = np.load(entry.path, mmap_mode="r")
            hashes = spilled["hash"]
            start = int(np.searchsorted(hashes, np.uint64(lo), side="left"))
            stop = len(hashes) if hi >= 1 << 64 else int(np.searchsorted(hashes, np.uint64(hi), side="left"))
            if stop > start:
                parts.append(np.array(spilled[start:stop]))
            del spilled, hashes
    got = np.concatenate(parts) if parts else np.zeros(0, KEY_DTYPE)
    del parts
    got.sort(order="hash")
    repeated = np.flatnonzero(got["hash"][1:] == got["hash"][:-1])
    duplicates = []
    for j in repeated:
        a, b = int(got["id"][j]), int(got["id"][j + 1])
        files = [Path(features_dir) / f"{int(split_ids(np.int64(i))[0]):05d}.parquet" for i in (a, b)]
        key_a = _key_at(files[0], int(split_ids(np.int64(a))[1]))
        key_b = _key_at(files[1], int(split_ids(np.int64(b))[1]))
        if key_a is not None and key_a == key_b:  # not a hash collision of two keys
            duplicates.append((key_a, files, a, b))
            if len(duplicates) > 3:
                break
    if duplicates:
        key, (f1, f2), a, b = duplicates[0]
        more = f" and {len(repeated) - 1} more repeated key hash(es) in this bucket" if len(repeated) > 1 else ""
        raise VerifyFailed(f"parquet: sample key {key!r} is in {f1} ({_describe(a)}) and {f2} "
                           f"({_describe(b)}){more}: a key must be in one input shard once; "
                           "remove the repeated samples from the input shards and re-run the job "
                           "into a new output_dir")
    return {"bucket": bucket, "keys": len(got)}


# --- indexes and the store ----------------------------------------------------------------------

def _add_digests(chunks: Iterable[np.ndarray], num_shards: int) -> dict:
    """Per-shard (count, sum of mixed ids) of the ids in ``chunks``; ids of no shard in the
    table are counted apart, with the first one kept to name it."""
    counts = np.zeros(num_shards, np.int64)
    sums = np.zeros(num_shards, np.uint64)
    foreign, first_foreign = 0, None
    for chunk in chunks:
        chunk = np.asarray(chunk, np.int64)
        shards = chunk >> ROW_BITS
        ok = (chunk >= 0) & (shards < num_shards)
        if not ok.all():
            foreign += int((~ok).sum())
            first_foreign = int(chunk[~ok][0]) if first_foreign is None else first_foreign
            chunk, shards = chunk[ok], shards[ok]
        np.add.at(counts, shards, 1)
        np.add.at(sums, shards, mix_ids(chunk))
    return {"counts": counts, "sums": sums, "foreign": foreign, "first_foreign": first_foreign}


def _save_digests(out_path: str, digests: dict) -> dict:
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, counts=digests["counts"], sums=digests["sums"])
    os.replace(tmp, out)
    return {"ids": int(digests["counts"].sum()) + digests["foreign"], "foreign": digests["foreign"],
            "first_foreign": digests["first_foreign"], "digests": str(out)}


def _live_ids(index_path: str, job_dir: str | None):
    """An index file's ids a chunk at a time, less the tombstones of read-only on-disk lists
    (removed ids they still hold, which every search skips)."""
    gone = removed_ids(JobLayout(job_dir)) if job_dir and has_ondisk_lists(index_path) else None
    for chunk in iter_id_chunks(index_path, CHUNK):
        yield chunk if gone is None or not len(gone) else chunk[~np.isin(chunk, gone)]


def digest_index_file(index_path: str, out_path: str, num_shards: int,
                      job_dir: str | None = None) -> dict:
    """One task per index file (a merged index, an index shard or an added generation's):
    per-shard digests of its live ids, read one inverted list (chunk) at a time from the
    mapped file, saved to ``out_path``."""
    return _save_digests(out_path, _add_digests(_live_ids(index_path, job_dir), num_shards))


def digest_store_partition(store_dir: str, partition_index: int, num_partitions: int,
                           out_path: str, num_shards: int) -> dict:
    """One task per store partition (LevelDB allows one opener): per-shard digests of its ids."""
    with SoftmaxStore(store_dir, num_partitions, only=[partition_index]) as store:
        return _save_digests(out_path, _add_digests(store.iter_id_chunks(partition_index, CHUNK),
                                                    num_shards))


def diagnose_shard(job_dir: str, shard: dict, target: dict, subset_manifest: str | None,
                   subset_apply: str | None) -> dict:
    """One shard's ids in one index file or store partition, compared id by id with the ids it
    must hold: raises VerifyFailed naming them (a digest said they differ). Memory: one shard."""
    s = shard["shard_index"]
    want = _read_shard(job_dir, s, shard["url"], shard["num_keys"], subset_manifest, subset_apply)
    expected = want["ids"][want["indexed"]]
    lo, hi = s << ROW_BITS, (s + 1) << ROW_BITS
    if target["kind"] == "store":
        with SoftmaxStore(target["store_dir"], target["partitions"], only=[target["partition"]]) as store:
            chunks = [c for c in store.iter_id_chunks(target["partition"], CHUNK, lo, hi)]
    else:
        chunks = [c[(c >= lo) & (c < hi)] for c in _live_ids(target["path"], job_dir)]
    got = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    _compare(target["what"], got, expected, want["path"], target["remedy"])
    raise VerifyFailed(f"{target['what']}: the ids of shard {s} ({want['path']}) differ from "
                       f"the feature file's: {target['remedy']}")


# --- the driver -------------------------------------------------------------------------------

RunStage = Callable[[str, list[Unit]], Iterable[tuple[str, dict]]]


def run_in_process(stage: str, units: Iterable[Unit]) -> Iterator[tuple[str, dict]]:
    """Run units one after another in this process (each unit's memory is bounded, so this is
    bounded too; only slower than tasks)."""
    for unit in units:
        yield unit.name, unit.fn(*unit.args, **unit.kwargs)


def _index_files(layout: JobLayout, layer: str) -> list[tuple[str, Path, int | None]]:
    """(name, file, partition or None) of a layer's index: merged, or one file per shard."""
    info_path = layout.index_info(layer)
    if not info_path.is_file():
        raise VerifyFailed(f"{info_path}: missing: the index stage never finished for layer {layer}")
    info = read_json(info_path)
    added = [(f"gen-{g['generation']:03d}", layout.generation_index(layer, g["generation"]), None)
             for g in read_generations(layout)["added"]]
    if info.get("layout", "merged") == "merged":
        return [("merged", layout.merged_index(layer), None)] + added
    return [(f"shard-{p:03d}", layout.index_shard(layer, p), p) for p in range(info["shards"])] + added


def verify_job(job_dir: str, shard_table: list[dict], layers: list[str], partitions: int,
               subset_manifest: str | None = None, subset_apply: str | None = None, *,
               run_stage: RunStage = run_in_process, bucket_keys: int = BUCKET_KEYS,
               work_dir: str | os.PathLike | None = None) -> dict:
    """Check the invariant (with a subset: selected keys = written + skipped), as units run by
    ``run_stage(stage, units)`` (default: in this process), which yields (unit, result). The
    driver keeps O(shards): per-shard expected digests, compared with each index file's and
    store partition's. Spill files go to ``work_dir`` (default JOB/verify/), removed at the end."""
    layout = JobLayout(job_dir)
    # scratch files of this run only (a verify running at the same time has its own)
    work = Path(work_dir) if work_dir is not None else layout.root / "verify" / f"run-{time.time_ns()}"
    shutil.rmtree(work, ignore_errors=True)
    keys_dir, digest_dir = work / "keys", work / "digests"
    keys_dir.mkdir(parents=True)
    digest_dir.mkdir()
    num_shards = max((s["shard_index"] for s in shard_table), default=-1) + 1
    by_index = {s["shard_index"]: s for s in shard_table} if num_shards else {}
    try:
        # 1. feature shards
        units = [Unit(f"{s['shard_index']:05d}", check_feature_shard,
                      (str(layout.root), s["shard_index"], s["url"], s["num_keys"], str(keys_dir),
                       list(layers), subset_manifest, subset_apply)) for s in shard_table]
        exp_counts = np.zeros(num_shards, np.int64)
        exp_sums = np.zeros(num_shards, np.uint64)
        skipped: dict[str, int] = {}
        written = 0
        first = None  # (file, recipe dict): every other shard's recipe is compared with it
        for _, r in run_stage("verify.shards", units):
            i = r["shard_index"]
            exp_counts[i], exp_sums[i] = r["indexed"], np.uint64(int(r["digest"]))
            written += r["written"]
            for reason, n in r["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
            if r["recipe"] is not None:
                if first is None:
                    first = (r["file"], r["recipe"])
                else:
                    try:  # one job's vectors must all come from one arithmetic (features/recipe.py)
                        check_one_recipe({first[0]: first[1], r["file"]: r["recipe"]})
                    except RecipeMismatch as err:
                        raise VerifyFailed(str(err)) from None
        del units
        recipe = FeatureRecipe.from_dict(first[1]) if first else None
        for layer in layers:
            info = layout.index_info(layer)
            recorded = read_json(info).get("recipe") if info.is_file() else None
            if recipe is not None and recorded is not None and recorded != recipe.as_dict():
                raise VerifyFailed(f"{info}: index built from features of recipe "
                                   f"{FeatureRecipe.from_dict(recorded).id}, but the feature files "
                                   f"are recipe {recipe.id}: re-run the index stage")
        # 2. duplicate keys across shards, one hash range per task
        buckets = max(1, math.ceil(written / max(1, bucket_keys)))
        for _ in run_stage("verify.keys", [Unit(f"{b:05d}", check_key_bucket,
                                                (str(keys_dir), b, buckets, str(layout.features_dir)))
                                           for b in range(buckets)]):
            pass
        shutil.rmtree(keys_dir, ignore_errors=True)
        # 3. each index file and store partition: per-shard digests, compared here
        targets = []
        for layer in layers:
            files = _index_files(layout, layer)
            targets += [{"kind": "index", "stage": f"verify.index.{layer}", "name": name,
                         "path": str(path), "partition": p, "partitions": len(files),
                         "what": f"index {layer}: {path}",
                         "remedy": "re-run the index stage (populate, then merge)"}
                        for name, path, p in files]
        stores = [("", layout.store_dir, range(partitions))] + [
            (f"gen-{g['generation']:03d}/", layout.generation_store(g["generation"]),
             sorted({s % partitions for s in g["shard_indexes"]}))
            for g in read_generations(layout)["added"]]
        targets += [{"kind": "store", "stage": "verify.store", "name": f"{prefix}part-{p:03d}",
                     "store_dir": str(store_dir), "partition": p, "partitions": partitions,
                     "what": f"store: {partition_dir(store_dir, p)}",
                     "remedy": "re-run the store stage"}
                    for prefix, store_dir, wanted in stores for p in wanted]
        for t in targets:
            if t["kind"] == "index" and not Path(t["path"]).is_file():
                raise VerifyFailed(f"{t['path']}: missing: the index stage never finished "
                                   "(see `knn-defense status`)")
            if t["kind"] == "store" and not partition_dir(t["store_dir"], t["partition"]).is_dir():
                raise VerifyFailed(f"{partition_dir(t['store_dir'], t['partition'])}: store "
                                   "partition missing; run the store stage")
        mismatched = []
        for stage in dict.fromkeys(t["stage"] for t in targets):
            group = [t for t in targets if t["stage"] == stage]
            units = [Unit(t["name"], digest_index_file,
                          (t["path"], str(digest_dir / f"{stage}-{t['name'].replace('/', '-')}.npz"),
                           num_shards, str(layout.root)))
                     if t["kind"] == "index" else
                     Unit(t["name"], digest_store_partition,
                          (t["store_dir"], t["partition"], t["partitions"],
                           str(digest_dir / f"{stage}-{t['name'].replace('/', '-')}.npz"),
                           num_shards))
                     for t in group]
            results = dict(run_stage(stage, units))
            counts = np.zeros(num_shards, np.int64)
            sums = np.zeros(num_shards, np.uint64)
            owner = {}  # shard -> the target its ids must be in
            for t in group:
                r = results[t["name"]]
                if r["foreign"]:
                    raise VerifyFailed(f"{t['what']}: {r['foreign']} ids of no shard in the shard "
                                       f"table (e.g. {_describe(r['first_foreign'])}): {t['remedy']}")
                with np.load(r["digests"]) as d:
                    c, sm = d["counts"], d["sums"]
                if t["partition"] is not None:  # sharded: each shard's ids in its partition only
                    home = np.arange(num_shards) % t["partitions"] == t["partition"]
                    stray = np.flatnonzero((c > 0) & ~home)
                    if len(stray):
                        s = int(stray[0])
                        raise VerifyFailed(f"{t['what']}: holds {int(c[s])} ids of shard {s}, whose "
                                           f"ids belong in index shard {s % t['partitions']}: "
                                           f"{t['remedy']}")
                    for s in np.flatnonzero(home):
                        owner[int(s)] = t
                counts += c
                sums += sm
            bad = np.flatnonzero((counts != exp_counts) | (sums != exp_sums))
            for s in bad[:DIAGNOSED]:
                mismatched.append((int(s), owner.get(int(s), group[0])))
        # 4. name what differs: one diagnosis task per mismatching shard (the first few)
        if mismatched:
            units = [Unit(f"{t['stage']}/{t['name']}/{s:05d}", diagnose_shard,
                          (str(layout.root), by_index[s], t, subset_manifest, subset_apply))
                     for s, t in mismatched[:DIAGNOSED]]
            for _ in run_stage("verify.diagnose", units):
                pass
            raise VerifyFailed(f"{mismatched[0][1]['what']}: shard {mismatched[0][0]}'s ids differ "
                               f"from its feature file's: {mismatched[0][1]['remedy']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if work_dir is None:
            with contextlib.suppress(OSError):
                work.parent.rmdir()  # JOB/verify/, unless another run's scratch is there
    return {"keys": int(exp_counts.sum()), "skipped": skipped, "layers": list(layers),
            "recipe": recipe.id if recipe else None,
            "partitions": partitions, "subset": subset_apply}


def verify_folder(job_dir: str, mode: str = "auto", address: str | None = None,
                  progress: bool = False) -> dict:
    """The invariant on a job folder as it is (a path, or a URL: its stages with completion
    markers), from its recorded spec and shard table. ``mode``: ``local`` runs the units one
    after another in this process; ``ray`` as tasks on a local Ray (or ``address``); ``auto``:
    local up to IN_PROCESS_MAX_KEYS keys (or when Ray is not asked for), else Ray."""
    from pipeline.jobfolder import load_spec
    from pipeline.runtime.remote import local_job_dir

    root = local_job_dir(job_dir, required=["shards", "features", "index", "store"])
    from pipeline.runtime.living import apply_pending_deletions

    apply_pending_deletions(JobLayout(root))  # a removal's deletions a serve could not apply
    spec = load_spec(root)
    layout = JobLayout(root)
    if not layout.shards_table.is_file():
        raise VerifyFailed(f"{layout.shards_table}: missing: the shards stage never finished")
    shards = database_shards(layout)  # the job's shard table and any added generations'
    subset = spec.subset
    manifest = str(layout.subset_manifest) if subset is not None else None
    if manifest is not None and not layout.subset_manifest.is_file():
        raise VerifyFailed(f"{manifest}: missing: the subset stage never finished")
    if mode == "auto":
        total = sum(s["num_keys"] for s in shards)
        mode = "ray" if address is not None or total > IN_PROCESS_MAX_KEYS else "local"
    args = (str(root), shards, spec.features.layers, spec.store.partitions, manifest,
            subset.apply if subset else None)
    try:
        if mode == "local":
            return verify_job(*args)
        return _verify_on_ray(args, address, progress)
    except FileNotFoundError as err:  # an index or store part that was never written
        raise VerifyFailed(f"missing output: {err}") from None


def _verify_on_ray(args: tuple, address: str | None, progress: bool) -> dict:
    """verify_job's units as Ray tasks (one CPU each), recorded in a scratch manifest (the job's
    own is left as it is)."""
    import tempfile

    from pipeline.runtime.manifest import Manifest
    from pipeline.runtime.ray_runner import StageFailed, ray_session, run_units

    with tempfile.TemporaryDirectory(prefix="knn-verify-") as tmp, ray_session(address):
        manifest = Manifest(Path(tmp) / "verify.sqlite")
        fp = f"verify-{time.time_ns()}"

        def run_stage(stage, units):
            try:
                run_units(manifest, stage, units, fp, progress=progress, desc=stage, max_retries=1)
            except StageFailed as err:
                first = err.report.failures[0][1] if err.report and err.report.failures else str(err)
                last = first.splitlines()[-1]
                raise VerifyFailed(last.partition("VerifyFailed: ")[2] or last) from None
            return manifest.unit_counts(stage, fp)

        try:
            return verify_job(*args, run_stage=run_stage)
        finally:
            manifest.close()
