"""A living database: add shards, remove images and compact, without a rebuild.

Every change is one numbered **generation** of the database. ``generation.json`` (written last,
atomically) says what the database is: the job's own build (generation 0), each added generation
still in its own index files (``index/<layer>/gen-NNN.faiss``) and store (``store/gen-NNN/``),
and the removals. Readers (the query side, verify, ``serve``) go by it alone, so a change that
crashed half-way is invisible until it is re-run and finishes.

- **add**: the new shards get new shard indexes (ids are never reused) and go through the job's
  own frozen pipeline: scan, features with the trained weights, transforms and recipe, the
  trained index (populate), the store. Cost O(new shards): their lists go into a generation
  index searched beside the older ones (FAISS IndexShards), never into a rewrite of the big one.
  The job's stages, fingerprints and shard table are untouched, so ``knn-defense run`` on the
  job runs nothing afterwards.
- **remove**: a journaled change. Keys are resolved to ids one feature file at a time; each
  index file then loses them in one batched ``remove_ids`` (one pass over the lists for the
  whole batch: FAISS issue 1021 measured 400 ms per single-id call on 300M vectors), except
  read-only on-disk lists, which keep them as tombstones that every search skips (a FAISS
  IDSelector) until ``compact`` rewrites them; the store deletes them; feature files are not
  rewritten: ``removed/removed.parquet`` marks their rows. A crash leaves a journal; running
  the same command again finishes it, each step applied once.
- **compact**: folds every added generation into the base index files and store partitions,
  and rewrites on-disk lists without their tombstones.

Ray runs the per-shard work of ``add`` (the job's own task bodies); the rest is O(changed
shards) I/O in this process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError, is_url
from pipeline.jobfolder import (
    database_shards,
    load_spec,
    pending_store_deletions,
    read_generations,
    read_journal,
    record_applied,
    removed_ids,
    tombstones,
)
from pipeline.layout import JobLayout, read_json, write_json

# Test hook: SIGKILL this process right after the journal records this step (a crash at a
# fixed point, not after a sleep).
KILL_AFTER_STEP = "KNN_DEFENSE_KILL_AFTER_STEP"
BUILD_STAGES = ["shards", "subset", "train", "transforms", "features", "index", "store"]


class Journal:
    """The steps of one change, one JSON line each, fsync'd: a step recorded is never redone."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "journal.jsonl"

    def entries(self) -> list[dict]:
        return read_journal(self.path)

    def done(self) -> dict[str, dict]:
        return {e["step"]: e for e in self.entries()}

    def record(self, step: str, **info) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "at": time.time(), **info}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(KILL_AFTER_STEP) == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def run(self, step: str, fn) -> dict:
        """``fn()`` (returning a dict) unless the step is already recorded; its recorded info."""
        done = self.done()
        if step in done:
            return done[step]
        info = fn() or {}
        self.record(step, **info)
        return {"step": step, **info}


def _local_layout(job_dir, require_finished: bool = True) -> JobLayout:
    if is_url(str(job_dir)):
        raise ConfigError(f"{job_dir}: add, remove and compact change a job folder in place; "
                          "run them where the folder is (a local path)")
    layout = JobLayout(job_dir)
    if not require_finished:  # the runner, between the store and evaluate stages
        return layout
    if not layout.summary.is_file() or read_json(layout.summary).get("status") != "done":
        raise ConfigError(f"{layout.root}: not a finished job (summary.json says it is not "
                          "done): run or resume the job first")
    return layout


def _pending(layout: JobLayout, kind: str) -> Path | None:
    """The change folder of an unfinished change (its journal has no ``finished`` step). An
    unfinished ``add`` that never published its generation is abandoned when another kind of
    change starts: nothing reads its files, and the next add overwrites them."""
    for folder in sorted((layout.root / "changes").glob("*-*")):
        done = Journal(folder).done()
        if "finished" not in done and not (folder / "abandoned.json").is_file():
            if folder.name.endswith("-add") and kind != "add" and "generation" not in done:
                write_json(folder / "abandoned.json", {"by": kind, "at": time.time()})
                continue
            if folder.name.split("-", 1)[1] != kind:
                raise ConfigError(f"{folder}: an unfinished {folder.name.split('-', 1)[1]} "
                                  "change: run that command again to finish it first")
            return folder
    return None


def _write_generations(layout: JobLayout, gens: dict) -> None:
    write_json(layout.generation, gens)  # atomic: readers see the old database or the new one


@contextlib.contextmanager
def _job_run(layout: JobLayout, address: str | None, progress: bool):
    """A JobRun over the finished job with its state (weights, transforms, recipe, index
    plans) restored by its own stage functions, which find every unit done."""
    from pipeline.runtime.job import STAGE_FUNCS, JobRun
    from pipeline.runtime.manifest import Manifest
    from pipeline.runtime.ray_runner import cluster_shape, ray_session

    spec = load_spec(layout.root).model_copy(update={"output_dir": str(layout.root)})
    with ray_session(address or spec.runtime.address, spec.runtime.num_cpus):
        manifest = Manifest(layout.manifest)
        try:
            run = JobRun(spec, layout, manifest, progress, cluster_shape())
            for stage in BUILD_STAGES:
                STAGE_FUNCS[stage](run)
            yield run
        finally:
            manifest.close()


def _start_or_resume(layout: JobLayout, kind: str, same, describe, new_plan) -> tuple[Path, dict]:
    """The change folder and plan of an unfinished ``kind`` change (it must be ``same`` as the
    one asked for: one change at a time), or of a new one numbered as the next generation."""
    folder = _pending(layout, kind)
    if folder is not None:
        plan = read_json(folder / "plan.json")
        if not same(plan):
            raise ConfigError(f"{folder}: an unfinished {kind} of {describe(plan)}: run that "
                              "again to finish it first")
        return folder, plan
    generation = read_generations(layout)["generation"] + 1
    folder = layout.change_dir(kind, generation)
    plan = {"generation": generation, **new_plan()}
    write_json(folder / "plan.json", plan)
    return folder, plan


# --- add -------------------------------------------------------------------------------------


def canonical_url(url: str) -> str:
    """A shard's one name: local paths absolute and resolved (``./x.tar`` and ``/abs/x.tar``
    are one shard, and the job folder can be read from any directory)."""
    return url if is_url(url) else os.path.realpath(url)


def _add_plan(layout: JobLayout, urls: list[str]) -> dict:
    """New shard indexes for ``urls``; refuses a shard already in the database, naming it."""
    from pipeline.ids import MAX_SHARDS

    known = {canonical_url(s["url"]): s for s in database_shards(layout)}
    for u in urls:
        if u in known:
            raise ConfigError(f"add: {u} is already in the database (shard "
                              f"{known[u]['shard_index']}, generation {known[u]['generation']}); "
                              "a shard is added once")
    if len(set(urls)) != len(urls):
        raise ConfigError("add: a shard is listed twice")
    first = max(s["shard_index"] for s in known.values()) + 1
    if first + len(urls) > MAX_SHARDS:
        raise ConfigError(f"add: {first + len(urls)} shards exceed the id scheme's {MAX_SHARDS}")
    return {"urls": urls, "shard_indexes": list(range(first, first + len(urls)))}


def add_shards(job_dir, shard_urls: list[str], *, address: str | None = None,
               progress: bool = True) -> dict:
    """Add ``shard_urls`` to a finished job's database as a new generation; returns its
    record. Refuses a shard already in the database, naming it."""
    from pipeline.data.shards import expand_shards
    from pipeline.fingerprints import fingerprint
    from pipeline.index.faiss_index import merge_parts
    from pipeline.runtime import tasks
    from pipeline.runtime.ray_runner import Unit

    layout = _local_layout(job_dir)
    if load_spec(layout.root).subset is not None:
        raise ConfigError(f"{layout.root}: a subset job's database is the subset's selection; "
                          "add shards to the full job, then build the subset again")
    apply_pending_deletions(layout)
    missing: list[str] = []
    urls = [canonical_url(u) for u in expand_shards(list(shard_urls), missing)]
    if missing or not urls:
        raise ConfigError(f"add: {', '.join(missing) or ' '.join(shard_urls)}: no such shard")
    folder, plan = _start_or_resume(
        layout, "add", lambda plan: plan["urls"] == urls,
        lambda plan: f"{plan['urls'][0]} ... ({len(plan['urls'])} shards)",
        lambda: _add_plan(layout, urls))
    generation = plan["generation"]
    journal = Journal(folder)
    rows = [{"shard_index": i, "url": u} for i, u in zip(plan["shard_indexes"], urls, strict=True)]
    tag = f"add.{generation:03d}"
    with _job_run(layout, address, progress) as run:
        journal.run("session", dict)  # Ray up, the job's state restored (timing only)
        layers = run.spec.features.layers
        fp = fingerprint(run.state["features_fp"], generation)

        def scan():
            run.run(f"{tag}.shards", [Unit(f"{r['shard_index']:05d}", tasks.scan_task,
                                           (r["url"], str(layout.offsets_file(r["shard_index"]))))
                                      for r in rows], fp, "shards", desc="scan added shards")
            counts = dict(run.manifest.unit_counts(f"{tag}.shards", fp))
            table = [{**r, "num_keys": counts[f"{r['shard_index']:05d}"]["num_keys"],
                      "num_samples": counts[f"{r['shard_index']:05d}"]["num_samples"],
                      "generation": generation} for r in rows]
            path = layout.generation_shards(generation)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(table), path.with_name(path.name + ".tmp"))
            os.replace(path.with_name(path.name + ".tmp"), path)
            return {"keys": sum(t["num_keys"] for t in table)}

        journal.run("scan", scan)
        from pipeline.runtime.job import features_units, populate_units, store_units

        def features():
            run.run(f"{tag}.features", features_units(run, rows), fp, "features",
                    desc="features (added shards)", samples_key="written")
            return {"written": sum(c.get("written", 0) for _, c in
                                   run.manifest.unit_counts(f"{tag}.features", fp))}

        written = journal.run("features", features)["written"]

        def index():
            run.run(f"{tag}.populate", populate_units(run, layers, rows), fp, "index",
                    desc="index populate (added shards)")
            for layer in layers:
                merge_parts(layout.trained_index(layer),
                            [layout.index_part(layer, r["shard_index"]) for r in rows],
                            layout.generation_index(layer, generation))
            return {}

        journal.run("index", index)

        def store():
            run.run(f"{tag}.store", store_units(run, rows, layout.generation_store(generation)),
                    fp, "store", desc="store (added shards)")
            return {"written": sum(c.get("written", 0) for _, c in
                                   run.manifest.unit_counts(f"{tag}.store", fp))}

        journal.run("store", store)

    def publish():
        gens = read_generations(layout)
        if gens["generation"] >= generation:  # published before a crash cut the journal line
            return {}
        gens["added"].append({"generation": generation, "shard_indexes": plan["shard_indexes"],
                              "urls": urls, "images": written, "at": time.time()})
        gens["generation"] = generation
        _write_generations(layout, gens)
        return {}

    journal.run("generation", publish)
    journal.record("finished")
    return {"generation": generation, "shards": len(urls), "images": written,
            "shard_indexes": plan["shard_indexes"]}


# --- remove ----------------------------------------------------------------------------------


def _keys_from_file(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"remove --keys {path}: no such file")
    keys = [line.strip() for line in path.read_text().splitlines()]
    return list(dict.fromkeys(k for k in keys if k))


def _resolve(layout: JobLayout, keys: list[str]) -> tuple[pa.Table, list[str]]:
    """(id, key, shard) of the listed keys found in the database's feature files, one file at a
    time (memory: one shard's keys + the list), and the keys not found."""
    wanted = set(keys)
    value_set = pa.array(list(wanted), pa.string())
    found = {"id": [], "key": [], "shard": []}
    for shard in database_shards(layout):
        path = layout.features_file(shard["shard_index"])
        table = pq.read_table(path, columns=["key", "id"])
        mask = pc.is_in(table.column("key"), value_set)
        hits = table.filter(mask)
        found["id"] += hits.column("id").to_pylist()
        found["key"] += hits.column("key").to_pylist()
        found["shard"] += [shard["shard_index"]] * hits.num_rows
    unknown = sorted(wanted - set(found["key"]))
    return pa.table({"id": pa.array(found["id"], pa.int64()), "key": found["key"],
                     "shard": pa.array(found["shard"], pa.int64())}), unknown


def index_files(layout: JobLayout, layer: str, shards) -> list[Path]:
    """The index files of a layer that may hold ids of ``shards``: the merged index or its
    shards, the added generations' files, and those shards' populate parts."""
    info = read_json(layout.index_info(layer))
    base = ([layout.merged_index(layer)] if info.get("layout", "merged") == "merged" else
            [layout.index_shard(layer, p) for p in range(info["shards"])])
    gens = [layout.generation_index(layer, g["generation"])
            for g in read_generations(layout)["added"]]
    parts = [layout.index_part(layer, s) for s in sorted(set(shards))]
    return [p for p in base + gens + parts if p.is_file()]


def remove_keys(job_dir, keys_file, require_finished: bool = True) -> dict:
    """Remove the listed keys from every index and the store (journaled, resumable,
    idempotent); returns the report (removed, already removed, unknown keys)."""
    from pipeline.ids import partition_of_shard
    from pipeline.index.faiss_index import has_ondisk_lists, remove_ids_from_file
    from pipeline.store.softmax_store import StoreLocked, delete_ids

    layout = _local_layout(job_dir, require_finished)
    apply_pending_deletions(layout)
    keys = _keys_from_file(keys_file)
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    folder, plan = _start_or_resume(
        layout, "remove", lambda plan: plan["keys_sha256"] == digest,
        lambda plan: f"another key list ({plan['keys_file']})",
        lambda: {"keys_file": str(keys_file), "keys_sha256": digest})
    journal = Journal(folder)
    spec = load_spec(layout.root)
    generation = plan["generation"]

    def resolve():
        table, unknown = _resolve(layout, keys)
        gone = removed_ids(layout)
        already = np.isin(table.column("id").to_numpy(), gone)
        pq.write_table(table.filter(pa.array(~already)), folder / "ids.parquet")
        return {"keys": len(keys), "found": table.num_rows - int(already.sum()),
                "already_removed": int(already.sum()), "unknown": len(unknown),
                "unknown_keys": unknown[:100]}

    resolved = journal.run("resolve", resolve)
    ids = pq.read_table(folder / "ids.parquet")
    id_array = ids.column("id").to_numpy().astype(np.int64)
    shards = ids.column("shard").to_numpy()
    tombstoned = 0
    for layer in spec.features.layers:
        for path in index_files(layout, layer, shards.tolist()):
            rel = str(path.relative_to(layout.root))
            if has_ondisk_lists(path):  # read-only lists: tombstones until compact
                journal.run(f"index:{rel}", lambda: {"tombstones": int(len(id_array))})
                tombstoned += 1
            else:
                journal.run(f"index:{rel}", lambda p=path: {"removed": remove_ids_from_file(p, id_array)})
    added = {s: g["generation"] for g in read_generations(layout)["added"] for s in g["shard_indexes"]}
    parts = spec.store.partitions
    groups: dict[tuple[Path, int], list[int]] = {}
    for i, s in zip(id_array.tolist(), shards.tolist(), strict=True):
        store_dir = layout.generation_store(added[s]) if s in added else layout.store_dir
        groups.setdefault((store_dir, partition_of_shard(s, parts)), []).append(i)
    # the removed table before the store deletes: it is what on-disk lists' tombstones come from,
    # so no reader can find an id whose softmax is already gone
    def table():
        old = pq.read_table(layout.removed_table) if layout.removed_table.is_file() else None
        new = ids.append_column("removal", pa.array([generation] * ids.num_rows, pa.int64()))
        merged = pa.concat_tables([old, new]) if old is not None else new
        # a repeat of this step after a crash must not add the rows twice
        merged = merged.group_by(["id", "key", "shard"]).aggregate([("removal", "min")]) \
            .rename_columns(["id", "key", "shard", "removal"])
        layout.removed_dir.mkdir(parents=True, exist_ok=True)
        tmp = layout.removed_table.with_name("removed.parquet.tmp")
        pq.write_table(merged.sort_by("id"), tmp)
        os.replace(tmp, layout.removed_table)
        return {"rows": merged.num_rows}

    journal.run("table", table)

    deferred = 0

    def delete(store_dir, p, members):
        try:
            return {"deleted": delete_ids(store_dir, p, np.asarray(members))}
        except StoreLocked:  # a running serve owns it: it applies these on its next reload
            return {"deferred": len(members)}

    for (store_dir, p), members in sorted(groups.items()):
        rel = str(store_dir.relative_to(layout.root))
        info = journal.run(f"store:{rel}/part-{p:03d}",
                           lambda d=store_dir, p=p, m=members: delete(d, p, m))
        deferred += info.get("deferred", 0)

    def publish():
        gens = read_generations(layout)
        if gens["generation"] >= generation:  # published before a crash cut the journal line
            return {}
        gens["removals"].append({"generation": generation, "removed": resolved["found"],
                                 "unknown": resolved["unknown"], "keys_file": plan["keys_file"],
                                 "at": time.time()})
        gens["generation"] = generation
        _write_generations(layout, gens)
        return {}

    journal.run("generation", publish)
    journal.record("finished")
    report = {k: resolved[k] for k in ("keys", "found", "already_removed", "unknown", "unknown_keys")}
    report.update(generation=generation, tombstoned_files=tombstoned, journal=str(journal.path),
                  store_deferred=deferred)
    write_json(folder / "report.json", report)
    return report


def apply_pending_deletions(layout: JobLayout, delete=None) -> int:
    """Store deletions a removal deferred because a serve held the store, applied now where
    the store is free (idempotent); returns how many ids were deleted. ``delete(store_dir,
    partition, ids)``: how (default: open the partition; the serve that holds it passes its
    own handles)."""
    from pipeline.store.softmax_store import StoreLocked, delete_ids

    done = 0
    for change, step, store_dir, p, ids in pending_store_deletions(layout):
        try:
            done += (delete or delete_ids)(store_dir, p, ids)
        except StoreLocked:
            continue
        record_applied(change, step)
    return done


# --- compact ---------------------------------------------------------------------------------


def compact(job_dir) -> dict:
    """Fold every added generation into the base index files and store partitions, and
    rewrite on-disk lists without their tombstones (journaled, resumable)."""
    from pipeline.ids import partition_of_shard
    from pipeline.index.faiss_index import has_ondisk_lists, merge_parts, remove_ids_from_file
    from pipeline.store.softmax_store import SoftmaxStore, StoreLocked, copy_partition

    layout = _local_layout(job_dir)
    spec = load_spec(layout.root)
    try:  # compact writes the base store: refuse before any work while something holds it
        SoftmaxStore(layout.store_dir, spec.store.partitions).close()
    except StoreLocked as err:
        raise ConfigError(f"compact: {err}") from None
    apply_pending_deletions(layout)
    if pending_store_deletions(layout):
        raise ConfigError(f"{layout.root}: store deletions of a removal wait for the process "
                          "that holds the store (a running serve): stop it, then compact")
    gens = read_generations(layout)
    if _pending(layout, "compact") is None and not gens["added"] \
            and tombstones(layout, spec.features.layers) is None:
        return {"generation": gens["generation"], "folded": 0, "rewritten": 0}  # nothing to fold
    folder, plan = _start_or_resume(layout, "compact", lambda plan: True, str,
                                    lambda: {"added": [g["generation"] for g in gens["added"]]})
    journal = Journal(folder)
    generation = plan["generation"]
    added = [g for g in gens["added"] if g["generation"] in plan["added"]]
    shards = database_shards(layout)  # every shard: the compacted index holds them all
    gone = removed_ids(layout)
    parts = spec.store.partitions
    rewritten = 0
    for layer in spec.features.layers:
        info = read_json(layout.index_info(layer))
        merged = info.get("layout", "merged") == "merged"
        groups = {None: [s["shard_index"] for s in shards]} if merged else {
            p: [s["shard_index"] for s in shards if partition_of_shard(s["shard_index"], parts) == p]
            for p in range(info["shards"])}
        for p, members in groups.items():
            out = layout.merged_index(layer) if p is None else layout.index_shard(layer, p)
            ondisk = has_ondisk_lists(out)
            if not (added or (ondisk and tombstones(layout, [layer]) is not None)):
                continue
            rewritten += 1

            def fold(out=out, members=members, ondisk=ondisk, layer=layer):
                part_paths = [layout.index_part(layer, s) for s in members]
                for part in part_paths:  # parts lost their removed ids already; a repeat is a no-op
                    remove_ids_from_file(part, gone)
                tmp = out.with_name(out.stem + ".compact.faiss")
                n = merge_parts(layout.trained_index(layer), part_paths, tmp, ondisk)
                return {"ntotal": n, "tmp": str(tmp.relative_to(layout.root))}

            journal.run(f"index:{out.relative_to(layout.root)}", fold)
    for g in added:
        for p in sorted({partition_of_shard(s, parts) for s in g["shard_indexes"]}):
            journal.run(f"store:gen-{g['generation']:03d}/part-{p:03d}",
                        lambda g=g, p=p: {"copied": copy_partition(
                            layout.generation_store(g["generation"]), layout.store_dir, p)})

    def switch():
        # the folded files take the base files' place, then generation.json says so
        for entry in journal.entries():
            if entry["step"].startswith("index:") and "tmp" in entry:
                tmp, final = layout.root / entry["tmp"], layout.root / entry["step"][len("index:"):]
                if tmp.is_file():
                    data = tmp.with_suffix(".ivfdata")
                    if data.is_file():  # the index names its lists file: rename it there first
                        _point_lists_at(tmp, final.with_suffix(".ivfdata"))
                        os.replace(data, final.with_suffix(".ivfdata"))
                    os.replace(tmp, final)
        gens = read_generations(layout)
        gens["compacted"] = gens.get("compacted", []) + [
            g for g in gens["added"] if g["generation"] in plan["added"]]
        gens["added"] = [g for g in gens["added"] if g["generation"] not in plan["added"]]
        # the lists were re-merged from parts without every removal so far: no tombstones left
        gens["lists_clean_through"] = max([0] + [r["generation"] for r in gens["removals"]])
        gens["generation"] = generation
        _write_generations(layout, gens)
        return {}

    journal.run("switch", switch)

    def cleanup():
        import shutil

        for g in added:
            shutil.rmtree(layout.generation_store(g["generation"]), ignore_errors=True)
            for layer in spec.features.layers:
                layout.generation_index(layer, g["generation"]).unlink(missing_ok=True)
        return {}

    journal.run("cleanup", cleanup)
    journal.record("finished")
    return {"generation": generation, "folded": len(added), "rewritten": rewritten}


def _point_lists_at(index_path: Path, data_path: Path) -> None:
    """An on-disk index names its lists file: after moving both, rewrite that name."""
    import faiss

    from pipeline.index.faiss_index import _ivf

    index = faiss.read_index(str(index_path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    faiss.downcast_InvertedLists(_ivf(index).invlists).filename = str(data_path.resolve())
    faiss.write_index(index, str(index_path))
