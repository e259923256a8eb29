"""Loading a finished job folder's parts, refusing folders whose recorded hashes disagree.

The one reader of job folders (layer 3, above the stages whose files it opens): the query side,
the evaluation, the runtime and the CLI load specs, indexes and the store through it."""

from __future__ import annotations

import os

import numpy as np
import yaml

from pipeline.config import parse_job
from pipeline.features.backbones import file_sha256, load_model
from pipeline.features.recipe import check_one_recipe, query_recipe
from pipeline.features.stack import load_stack, stack_hash
from pipeline.index.faiss_index import load_index, shard_set
from pipeline.layout import JobLayout, read_json
from pipeline.store.softmax_store import SoftmaxStore


class InconsistentJob(RuntimeError):
    pass


def load_spec(job_dir: str | os.PathLike):
    layout = JobLayout(job_dir)
    if not layout.job_yaml.is_file():
        raise FileNotFoundError(f"{job_dir}: not a job folder (no job.yaml); run `knn-defense run` first")
    raw = yaml.safe_load(layout.job_yaml.read_text())
    raw.pop("code_version", None)
    return parse_job(raw, str(layout.job_yaml))


def check_hashes(layout: JobLayout, layers) -> dict:
    """Recompute and cross-check the hashes recorded by each stage; returns model info."""
    model_info = read_json(layout.model_info, "run the train stage")
    model_info["path"] = str(layout.root / model_info["path"])  # relative inside the job folder
    actual = file_sha256(model_info["path"])
    if actual != model_info["sha256"]:
        raise InconsistentJob(f"{model_info['path']}: weights changed since the job ran "
                              f"(sha256 {actual[:12]} != recorded {model_info['sha256'][:12]})")
    transforms = read_json(layout.transforms_info, "run the transforms stage")
    if transforms["weights_sha256"] != actual:
        raise InconsistentJob(f"{layout.transforms_info}: fitted with other weights; re-run the job")
    store_info = read_json(layout.store_info, "run the store stage")
    if store_info["weights_sha256"] != actual:
        raise InconsistentJob(f"{layout.store_info}: softmax store built with other weights")
    for layer in layers:
        sha = stack_hash(layout.transform_dir(layer))
        if sha != transforms["files"][layer]:
            raise InconsistentJob(f"{layout.transform_dir(layer)}: changed since the job ran")
        info = read_json(layout.index_info(layer), "run the index stage")
        if info["transform_sha256"] != sha or info["weights_sha256"] != actual:
            raise InconsistentJob(f"{layout.index_info(layer)}: index built from other features")
    return model_info


def load_defense_parts(job_dir: str | os.PathLike, layers=None, local_search: bool = True) -> dict:
    """Everything DefendedClassifier needs, from a job folder (without the indexes and the
    store when another process searches them)."""
    spec = load_spec(job_dir)
    layout = JobLayout(job_dir)
    layers = list(layers or spec.features.layers)
    model_info = check_hashes(layout, layers)
    recipe = database_recipe(layout, layers)
    model = load_model(spec.model, model_info["path"])
    if recipe["query"] is not None:  # run the database's arithmetic where this machine can
        model.feature_precision = recipe["query"]["precision"]
    transforms = {name: load_stack(layout.transform_dir(name)) for name in layers}
    parts = {"spec": spec, "model": model, "transforms": transforms, "recipe": recipe}
    if local_search:
        parts["indexes"] = {name: load_layer_index(layout, name) for name in layers}
        parts["store"] = open_store(layout, spec.store.partitions)
        parts["exclude"] = tombstones(layout, layers)
    return parts


# --- a living database: generations and removals (written by pipeline/runtime/living.py) ------


def read_generations(layout: JobLayout) -> dict:
    """generation.json: ``generation`` (the database's version: every add, remove or compact
    makes a new one), ``added`` (one entry per added generation still in its own index files
    and store: number, shard indexes, images) and ``removals``. A job never changed is
    generation 0 with nothing added."""
    if layout.generation.is_file():
        return read_json(layout.generation)
    return {"generation": 0, "added": [], "removals": [], "compacted": []}


def database_shards(layout: JobLayout) -> list[dict]:
    """Every shard of the database: the job's shard table (generation 0) and each added
    generation's, in shard-index order; rows carry their ``generation``."""
    import pyarrow.parquet as pq

    rows = [{**r, "generation": 0} for r in pq.read_table(layout.shards_table).to_pylist()]
    gens = read_generations(layout)
    for g in sorted(x["generation"] for x in gens["added"] + gens.get("compacted", [])):
        rows += pq.read_table(layout.generation_shards(g)).to_pylist()
    return rows


def database_size(layout: JobLayout, built: int) -> int:
    """Images the database holds now: the ``built`` ones, plus added, less removed."""
    gens = read_generations(layout)
    added = sum(g["images"] for g in gens["added"] + gens.get("compacted", []))
    return built + added - sum(r["removed"] for r in gens["removals"])


def removed_ids(layout: JobLayout, shard_index: int | None = None) -> np.ndarray:
    """Ids removed from the database (all, or one shard's), sorted."""
    import pyarrow.parquet as pq

    if not layout.removed_table.is_file():
        return np.zeros(0, np.int64)
    filters = None if shard_index is None else [("shard", "=", shard_index)]
    ids = pq.read_table(layout.removed_table, columns=["id"], filters=filters).column("id")
    return np.sort(ids.to_numpy().astype(np.int64))


def tombstones(layout: JobLayout, layers) -> np.ndarray | None:
    """Removed ids a search must skip: those still in read-only on-disk lists (every other
    index file had them removed for real). None when no layer needs any."""
    from pipeline.index.faiss_index import has_ondisk_lists

    ondisk = any(has_ondisk_lists(path) for layer in layers
                 for path in (layout.merged_index(layer), *layout.index_dir(layer).glob("shard-*.faiss")))
    if not ondisk or not layout.removed_table.is_file():
        return None
    import pyarrow.parquet as pq

    # removals up to the last compact are gone from the lists for real: no tombstones for them
    clean = read_generations(layout).get("lists_clean_through", 0)
    ids = pq.read_table(layout.removed_table, columns=["id"], filters=[("removal", ">", clean)])
    removed = np.sort(ids.column("id").to_numpy().astype(np.int64))
    return removed if len(removed) else None


def read_journal(path) -> list[dict]:
    """A change's journal records (pipeline/runtime/living.py), one JSON line each; a line a
    crash cut short is not a record."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def pending_store_deletions(layout: JobLayout) -> list[tuple]:
    """Store deletions that published removals deferred because another process (a serve) held
    the partition, not yet applied: (change folder, step, store dir, partition, ids)."""
    import pyarrow.parquet as pq

    waiting = []  # (change, its deferred steps)
    for change in sorted((layout.root / "changes").glob("*-remove")):
        steps = read_journal(change / "journal.jsonl")
        if not any(e["step"] == "generation" for e in steps):
            continue  # not published yet: readers may still find these ids
        applied = set(read_json(change / "applied.json")["steps"]) \
            if (change / "applied.json").is_file() else set()
        deferred = [e["step"] for e in steps if "deferred" in e and e["step"] not in applied]
        if deferred:
            waiting.append((change, deferred))
    if not waiting:  # the usual case (serve polls this): no spec or table read
        return []
    partitions = load_spec(layout.root).store.partitions
    store_of = {s: layout.generation_store(g["generation"])
                for g in read_generations(layout)["added"] for s in g["shard_indexes"]}
    pending = []
    for change, deferred in waiting:
        table = pq.read_table(change / "ids.parquet").to_pydict()
        ids, shards = np.asarray(table["id"], np.int64), table["shard"]
        homes = [(store_of.get(s, layout.store_dir), s % partitions) for s in shards]
        for step in deferred:  # "store:<store dir>/part-PPP"
            rel, _, part = step[len("store:"):].rpartition("/")
            where = (layout.root / rel, int(part[len("part-"):]))
            mine = np.asarray([h == where for h in homes], bool)
            pending.append((change, step, *where, ids[mine] if len(ids) else ids))
    return pending


def record_applied(change, step: str) -> None:
    """Mark a deferred store deletion applied (by whichever process held the store)."""
    from pathlib import Path

    from pipeline.layout import write_json

    path = Path(change) / "applied.json"
    steps = read_json(path)["steps"] if path.is_file() else []
    write_json(path, {"steps": sorted(set(steps) | {step})})


def open_store(layout: JobLayout, partitions: int, current=None):
    """The database's softmax store: the base store, and one per added generation. With
    ``current`` (the store this process has open), its open stores are reused and only new
    generations' are opened (LevelDB allows one opener: a reload cannot open them twice)."""
    from pipeline.store.softmax_store import StoreSet

    opened = {}
    if current is not None:
        for store in [getattr(current, "base", current)] + [
                st for st, _ in getattr(current, "generations", [])]:
            opened[str(store.store_dir)] = store
    base = opened.get(str(layout.store_dir)) or SoftmaxStore(layout.store_dir, partitions)
    added = read_generations(layout)["added"]
    if not added:
        return base
    generations, new = [], []
    try:
        for gen in added:
            path = layout.generation_store(gen["generation"])
            store = opened.get(str(path))
            if store is None:
                parts = sorted({s % partitions for s in gen["shard_indexes"]})
                store = SoftmaxStore(path, partitions, only=parts)
                new.append(store)
            generations.append((store, gen["shard_indexes"]))
    except BaseException:
        for store in new + ([] if current is not None else [base]):
            store.close()
        raise
    return StoreSet(base, generations)


def database_recipe(layout: JobLayout, layers, query_device: str = "cpu") -> dict:
    """{"database": the recipe index.json records (None for jobs built before recipes were),
    "query": the recipe this query path runs to match it on ``query_device``, "differs": what
    still differs ({} when the query path reproduces the database's arithmetic)}. Refuses
    layers whose indexes were built from features of different recipes."""
    recorded = {}
    for layer in layers:
        info = read_json(layout.index_info(layer), "run the index stage")
        recorded[str(layout.index_info(layer))] = info.get("recipe")
    database = check_one_recipe(recorded)
    if database is None:
        return {"database": None, "query": None, "differs": {}}
    query, differs = query_recipe(database, query_device)
    return {"database": database.as_dict(), "query": query.as_dict(),
            "differs": {k: list(v) for k, v in differs.items()}}


def load_layer_index(layout: JobLayout, layer: str, nprobe: int | None = None,
                     partitions: list[int] | None = None):
    """A layer's index: the merged one, or its shards searched as one (or only ``partitions``),
    searching ``nprobe`` lists (default: index.json's, tuned or as configured)."""
    info = read_json(layout.index_info(layer), "run the index stage")
    nprobe = nprobe or info.get("nprobe")
    if info.get("layout", "merged") == "merged":
        files = [layout.merged_index(layer)]
    else:
        wanted = range(info["shards"]) if partitions is None else partitions
        files = [layout.index_shard(layer, p) for p in wanted]
    if partitions is None:  # added generations, in their own files until compacted
        files += [layout.generation_index(layer, g["generation"])
                  for g in read_generations(layout)["added"]]
    return shard_set([load_index(path, nprobe) for path in files])


class KeyLookup:
    """id -> sample key through the shard table and the shard's Parquet file (ids are
    ``shard << 24 | row``); keeps the key columns of recently used shards."""

    def __init__(self, job_dir: str | os.PathLike, cache_shards: int = 64):
        import functools

        import pyarrow.parquet as pq

        layout = JobLayout(job_dir)

        @functools.lru_cache(maxsize=cache_shards)
        def shard_keys(shard_index: int) -> list[str]:
            path = layout.features_file(shard_index)
            return pq.read_table(path, columns=["key"]).column("key").to_pylist()

        self._shard_keys = shard_keys

    def __call__(self, ids) -> list:
        from pipeline.ids import NO_RESULT, split_ids

        flat = np.asarray(ids, np.int64).reshape(-1)
        shards, rows = split_ids(flat)
        return [None if i == NO_RESULT else self._shard_keys(int(s))[int(r)]
                for i, s, r in zip(flat.tolist(), shards.tolist(), rows.tolist(), strict=True)]


class ImageLookup:
    """id -> the database image's encoded bytes, by one ranged read of its shard: the id names
    (shard, row), the row's key comes from the feature file (:class:`KeyLookup`), the key's
    byte range from the shard's offsets file (``shards/offsets/``, written by the shards
    stage). Raises :class:`~pipeline.data.offsets.ImageNotFound` saying why an id has none."""

    def __init__(self, job_dir: str | os.PathLike, keys_of: KeyLookup | None = None,
                 cache_shards: int = 64):
        import functools

        from pipeline.data.offsets import ImageNotFound, read_offsets

        layout = JobLayout(job_dir)
        self._urls = {s["shard_index"]: s["url"] for s in database_shards(layout)}  # O(shards)
        self._removed = removed_ids(layout)
        self._keys_of = keys_of or KeyLookup(job_dir)

        @functools.lru_cache(maxsize=cache_shards)
        def offsets(shard_index: int):
            path = layout.offsets_file(shard_index)
            if not path.is_file():
                raise ImageNotFound(f"{path}: no offsets file for shard {shard_index} (a job "
                                    "folder from an older version): run `knn-defense run` on "
                                    "the job again to scan them")
            return read_offsets(path)

        self._offsets = offsets

    def __call__(self, image_id: int) -> bytes:
        from pipeline.data.offsets import ImageNotFound, read_range
        from pipeline.ids import split_ids

        shards, rows = split_ids(np.asarray([image_id], np.int64))
        shard = int(shards[0])
        if image_id < 0 or shard not in self._urls:
            raise ImageNotFound(f"id {image_id}: no shard {shard} in this database")
        at = int(np.searchsorted(self._removed, image_id))
        if at < len(self._removed) and self._removed[at] == image_id:
            raise ImageNotFound(f"id {image_id} was removed from this database")
        try:
            key = self._keys_of([image_id])[0]
        except (IndexError, FileNotFoundError):
            raise ImageNotFound(f"id {image_id}: shard {shard} has no row {int(rows[0])} in "
                                "the database") from None
        offset, size = self._offsets(shard).locate(key)
        return read_range(self._urls[shard], offset, size)


class QueryImages:
    """The job's query split (``data.queries``) by key, for browsing: every query shard's
    offsets scanned once, on first use (headers only), then one ranged read per image."""

    def __init__(self, job_dir: str | os.PathLike):
        self.job_dir = job_dir
        self._shard_of: dict | None = None  # key -> its shard's ShardOffsets

    def _scan(self) -> dict:
        if self._shard_of is None:
            from pipeline.data.offsets import scan_offsets
            from pipeline.data.shards import expand_shards

            spec = load_spec(self.job_dir)
            shard_of = {}
            for url in expand_shards(spec.data.queries) if spec.data.queries else []:
                shard = scan_offsets(url)
                shard_of.update(dict.fromkeys(shard.where, shard))
            self._shard_of = shard_of
        return self._shard_of

    def keys(self) -> list[str]:
        return list(self._scan())

    def label(self, key: str) -> int | None:
        shard = self._scan().get(key)
        return None if shard is None else shard.labels[key]

    def __call__(self, key: str) -> bytes:
        from pipeline.data.offsets import ImageNotFound, read_range

        shard = self._scan().get(key)
        if shard is None:
            raise ImageNotFound(f"query key {key!r} is not in this job's query shards")
        offset, size = shard.locate(key)
        return read_range(shard.url, offset, size)


def class_names(job_dir: str | os.PathLike, max_samples: int = 10_000) -> dict[int, str]:
    """{label: name} from the ``class_name`` the shards' JSON metadata carries (Fashion-MNIST's
    import writes it), read from the first database shard's metadata only (images seeked over,
    at most ``max_samples``); {} when the shards carry none."""
    import pyarrow.parquet as pq

    from pipeline.data.shards import ShardStats, iter_samples

    table = pq.read_table(JobLayout(job_dir).shards_table, columns=["url"])
    names: dict[int, str] = {}
    for n, sample in enumerate(iter_samples(table.column("url")[0].as_py(), ShardStats(),
                                            decode=False, meta_exts=("json", "cls"))):
        name = sample.meta.get("class_name") if isinstance(sample.meta, dict) else None
        if sample.label is not None and name:
            names.setdefault(sample.label, str(name))
        if n + 1 >= max_samples:
            break
    return names
