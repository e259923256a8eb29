"""`knn-defense` command line: run a job or one stage of it, import data, classify, status."""

from __future__ import annotations

import functools
import logging
import sys

import click
import yaml

from pipeline import __version__
from pipeline.config import ConfigError, load_job
from pipeline.runtime.job import STAGES


def _one_line_errors(fn):
    """Known failures become one line on stderr (exit 2 for bad input, 1 for failed work)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.runtime.ray_runner import StageFailed
        from pipeline.runtime.verify import VerifyFailed

        try:
            return fn(*args, **kwargs)
        except (ConfigError, FileNotFoundError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except (StageFailed, VerifyFailed) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)

    return wrapper


def _parse_sets(values: tuple[str, ...]) -> dict:
    out = {}
    for item in values:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. evaluate.num_queries=200")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


_job_options = [
    click.argument("job_yaml", type=click.Path(dir_okay=False)),
    click.option("--address", default=None, help="Ray address; default: start a local Ray on 127.0.0.1."),
    click.option("--num-cpus", type=int, default=None, help="CPUs for the local Ray."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Override a spec key, e.g. --set evaluate.num_queries=200 (repeatable)."),
    click.option("--no-progress", is_flag=True, help="No progress bars."),
]


def job_options(fn):
    for option in reversed(_job_options):
        fn = option(fn)
    return fn


def _run(job_yaml, address, num_cpus, sets, no_progress, until):
    from pipeline.runtime.job import run_job

    spec = load_job(job_yaml, _parse_sets(sets))
    summary = run_job(spec, until, address=address, num_cpus=num_cpus,
                      progress=False if no_progress else None)
    if summary.get("eval_markdown") and until in (None, "evaluate"):
        click.echo("")
        click.echo(summary["eval_markdown"])
    click.echo(f"job {spec.name}: {summary['written']} images indexed, skipped {summary['skipped'] or 0}; "
               f"outputs in {spec.output_dir} (stage seconds: {summary['stage_seconds']})")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def main(verbose: bool) -> None:
    """kNN defense against adversarial images: build the database, query it, evaluate it."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@job_options
@click.option("--until", type=click.Choice(STAGES), default=None,
              help="Stop after this stage (default: run every stage).")
@_one_line_errors
def run(job_yaml, address, num_cpus, sets, no_progress, until):
    """Run the job described by JOB_YAML. Finished units are reused: re-running redoes only what
    is missing, failed, or changed."""
    _run(job_yaml, address, num_cpus, sets, no_progress, until)


def _stage_command(stage: str):
    @job_options
    @_one_line_errors
    def command(job_yaml, address, num_cpus, sets, no_progress):
        _run(job_yaml, address, num_cpus, sets, no_progress, stage)

    command.__doc__ = f"Run a job up to its {stage} stage (same as run --until {stage})."
    return main.command(name=stage)(command)


for _stage in STAGES:
    if _stage not in ("import", "subset", "index"):  # these have their own command groups
        _stage_command(_stage)


@main.group("index")
def index_group():
    """FAISS indexes of a job: train, populate, merge (or build: all three), inspect, search.

    Each step runs what it needs before it that is not done yet, like `run --until`, and
    skips what the manifest records as done, so steps can be run (and re-run) one by one."""


_INDEX_STEP_HELP = {
    "train": "Run a job up to training its indexes: one task per layer, on a sample of the "
             "feature shards (k-means on GPUs when faiss-gpu finds one).",
    "populate": "Run a job up to populating its indexes: one task per (layer, shard) adds the "
                "shard's vectors and ids to a copy of the trained index (retried, resumable).",
    "merge": "Run a job up to merging its index parts: one index per layer or one shard per "
             "store partition, in memory or on disk (index.merge); tunes nprobe when asked.",
}


def _index_step_command(step: str):
    @job_options
    @_one_line_errors
    def command(job_yaml, address, num_cpus, sets, no_progress):
        _run(job_yaml, address, num_cpus, sets, no_progress, f"index.{step}")

    command.__doc__ = _INDEX_STEP_HELP[step]
    return index_group.command(name=step)(command)


for _step in _INDEX_STEP_HELP:
    _index_step_command(_step)


@index_group.command("build")
@job_options
@_one_line_errors
def index_build(job_yaml, address, num_cpus, sets, no_progress):
    """Run a job up to its index stage: train, populate and merge."""
    _run(job_yaml, address, num_cpus, sets, no_progress, "index")


@index_group.command("info")
@click.option("--job", "job_dir", required=True, type=click.Path(file_okay=False))
@_one_line_errors
def index_info(job_dir):
    """Per layer: factory, layout, vectors, nprobe, measured recall, memory estimate, files."""
    import json

    from pipeline.layout import JobLayout, read_json
    from pipeline.runtime.artifacts import load_spec

    layout = JobLayout(job_dir)
    for layer in load_spec(job_dir).features.layers:
        info = read_json(layout.index_info(layer), "run the index stage")
        choice_path = layout.index_dir(layer) / "choice.json"
        files = [*layout.index_dir(layer).glob("*.faiss"), *layout.index_dir(layer).glob("*.ivfdata")]
        out = {"layer": layer, **{k: info.get(k) for k in ("factory", "layout", "merge", "shards",
                                                           "ntotal", "nprobe")},
               "recall": (info.get("recall") or {}).get("recall"),
               "files_bytes": sum(f.stat().st_size for f in files if f.name != "trained.faiss")}
        if choice_path.is_file():
            choice = read_json(choice_path)
            out["choice"] = {k: choice[k] for k in ("reason", "memory_bytes", "memory_budget_gb")}
        click.echo(json.dumps(out))


@index_group.command("search")
@click.option("--job", "job_dir", required=True, type=click.Path(file_okay=False))
@click.option("--layer", required=True)
@click.option("-k", "--k", type=int, default=10, show_default=True)
@click.option("--nprobe", type=int, default=None, help="Override the index's nprobe.")
@click.argument("vectors", type=click.Path(dir_okay=False))
@_one_line_errors
def index_search(job_dir, layer, k, nprobe, vectors):
    """Search VECTORS (.npy, [N, d] float32, or uint8 codes for binary indexes): one JSON line
    per query with ids, sample keys and distances."""
    import json

    import numpy as np

    from pipeline.index.faiss_index import search
    from pipeline.layout import JobLayout
    from pipeline.runtime.artifacts import KeyLookup, load_layer_index

    layout = JobLayout(job_dir)
    index = load_layer_index(layout, layer, nprobe)
    queries = np.load(vectors)
    if queries.ndim != 2:
        raise ConfigError(f"{vectors}: expected a 2-D array of query vectors, got {queries.shape}")
    dist, ids = search(index, queries, k, nprobe)
    keys = KeyLookup(job_dir)
    for d, i in zip(dist, ids, strict=True):
        click.echo(json.dumps({"ids": i.tolist(), "keys": keys(i), "distances": d.tolist()}))


@main.group()
def subset():
    """IG-N-All / IG-N-Targeted subsets of a shard collection."""


@subset.command("build")
@click.option("--kind", type=click.Choice(["all", "targeted"]), required=True,
              help="all: uniform over valid samples; targeted: among samples with a vocabulary hashtag.")
@click.option("--size", type=click.IntRange(min=1), required=True, help="N, the number of samples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--input", "input_", required=True, multiple=True,
              help="Shards: folder, glob, {00000..00099} pattern or fsspec URL (repeatable).")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Folder for subset.parquet, summary.json and per-shard candidates.")
@click.option("--tag-field", default="tags", show_default=True, help="json field holding the tags.")
@click.option("--vocabulary", default=None, help="Hashtag vocabulary JSON (default: ImageNet-1k's).")
@click.option("--allow-smaller", is_flag=True, help="Accept fewer than N when fewer qualify.")
@click.option("--address", default=None, help="Ray address; default: a local Ray on 127.0.0.1.")
@click.option("--no-progress", is_flag=True)
@_one_line_errors
def subset_build(kind, size, seed, input_, output, tag_field, vocabulary, allow_smaller, address,
                 no_progress):
    """Choose exactly N samples reproducibly (smallest seeded key hashes), shard by shard."""
    import json
    from pathlib import Path

    from pipeline.data.shards import expand_shards
    from pipeline.data.subsets import NotEnoughSamples, SubsetRule
    from pipeline.runtime.job import run_subset
    from pipeline.runtime.manifest import Manifest
    from pipeline.runtime.ray_runner import ray_session

    urls = expand_shards(list(input_))
    if not urls:
        raise ConfigError(f"--input {' '.join(input_)}: no .tar shard found")
    if vocabulary is not None and not Path(vocabulary).is_file():
        raise ConfigError(f"--vocabulary {vocabulary}: not found")
    rule = SubsetRule(kind, size, seed, tag_field, vocabulary)
    manifest = Manifest(Path(output) / "manifest.sqlite")
    try:
        with ray_session(address):
            summary = run_subset(manifest, rule, urls, output, allow_smaller=allow_smaller,
                                 progress=not no_progress)
    except NotEnoughSamples as err:
        raise ConfigError(str(err)) from None
    finally:
        manifest.close()
    brief = {k: v for k, v in summary.items() if k != "coverage"}
    if "coverage" in summary:
        cov = summary["coverage"]
        brief["classes_covered"] = cov["classes_covered"]
        brief["classes_without_images"] = len(cov["classes_without_images"])
    click.echo(json.dumps(brief, indent=2))
    click.echo(f"wrote {Path(output) / 'subset.parquet'} and summary.json")


@main.command("import-fashion-mnist")
@click.option("--source-dir", default=None, help="Folder with the idx files (default: the Debian package's).")
@click.option("--out-dir", default="data/fashion-mnist", show_default=True)
@click.option("--samples-per-shard", default=4000, show_default=True)
@click.option("--limit", type=int, default=None, help="Images per split (smoke tests).")
@_one_line_errors
def import_fashion_mnist_cmd(source_dir, out_dir, samples_per_shard, limit):
    """Write Fashion-MNIST as webdataset shards (img2dataset layout) under OUT_DIR/{train,test}."""
    from pipeline.config import FashionMnistImport
    from pipeline.data.fashion_mnist import import_fashion_mnist, missing_files

    spec = FashionMnistImport(out_dir=out_dir, samples_per_shard=samples_per_shard, limit=limit,
                              **({"source_dir": source_dir} if source_dir else {}))
    if missing_files(spec.source_dir):
        raise ConfigError(f"{spec.source_dir}: lacks {missing_files(spec.source_dir)[0]}; install "
                          "dataset-fashion-mnist or pass --source-dir")
    folders = import_fashion_mnist(spec.source_dir, spec.out_dir, spec.samples_per_shard, spec.limit)
    for split, folder in folders.items():
        click.echo(f"{split}: {len(list(folder.glob('*.tar')))} shards in {folder}")


@main.command()
@click.option("--job", "job_dir", required=True, type=click.Path(file_okay=False),
              help="A finished job folder.")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--layer", default=None, help="Feature layer (default: the job's last).")
@click.option("--weighting", type=click.Choice(["uw", "cbw_e", "cbw_d"]), default="cbw_d", show_default=True)
@click.option("-k", "--k", type=int, default=None, help="Neighbours (default: the job's evaluate.k).")
@click.option("--neighbours", "show_neighbours", is_flag=True, help="Print the nearest neighbours too.")
@_one_line_errors
def classify(job_dir, images, layer, weighting, k, show_neighbours):
    """Classify image files with the kNN defense of a finished job."""
    import numpy as np

    from pipeline.data.shards import decode_image
    from pipeline.defense.classifier import DefendedClassifier
    from pipeline.features.backbones import decode_args

    overrides = {"weighting": weighting, **({"layer": layer} if layer else {}), **({"k": k} if k else {})}
    defense = DefendedClassifier.from_job(job_dir, **overrides)
    decode = decode_args(defense.model)
    arrays = []
    for path in images:
        try:
            with open(path, "rb") as f:
                arrays.append(decode_image(f.read(), 89_478_485, **decode))
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{path}: not a readable image ({err})") from None
    labels, scores, neigh = defense.predict(np.stack(arrays), return_neighbours=True)
    undefended = defense.neighbours_all_layers(np.stack(arrays), [defense.layer], 1)[0].argmax(1)
    for j, path in enumerate(images):
        top = np.argsort(-scores[j])[:3]
        tops = ", ".join(f"{c}:{scores[j, c]:.3f}" for c in top)
        click.echo(f"{path}\tlabel={labels[j]}\tundefended={undefended[j]}\ttop=[{tops}]")
        if show_neighbours:
            keys = defense.keys_of(neigh.ids[j][:10])
            label_of = neigh.softmax[j][:10].argmax(1)
            weight_of = defense.weights_for(neigh)[j][:10]
            for d, i, key, c, w in zip(neigh.distances[j][:10], neigh.ids[j][:10], keys, label_of,
                                       weight_of, strict=True):
                click.echo(f"    key={key} id={i} dist={d:.4f} neighbour_label={c} weight={w:.4f}")
    defense.store.close()


@main.command()
@click.option("--job", "job_dir", required=True, type=click.Path(file_okay=False),
              help="A finished job folder.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Bind address (loopback by default; put a proxy in front for remote clients).")
@click.option("--port", default=8000, show_default=True)
@click.option("--max-request-mb", default=32, show_default=True, help="Request body limit.")
@click.option("--max-images", default=64, show_default=True, help="Images per request.")
@click.option("--batch-window-ms", default=5.0, show_default=True,
              help="How long concurrent requests are collected into one batch.")
@_one_line_errors
def serve(job_dir, host, port, max_request_mb, max_images, batch_window_ms):
    """HTTP query service: POST /classify, GET /healthz, GET /info."""
    from pipeline.serve.app import serve as run_server

    run_server(job_dir, host, port, max_request_bytes=max_request_mb << 20,
               max_images_per_request=max_images, batch_window_ms=batch_window_ms)


@main.command()
@click.argument("job_dir", type=click.Path(file_okay=False))
@click.option("--address", default=None, help="Ray address; default: a local Ray on 127.0.0.1.")
@click.option("--no-progress", is_flag=True)
@_one_line_errors
def resume(job_dir, address, no_progress):
    """Finish a job folder from its recorded spec (job.yaml): only units that are not done (or
    whose inputs changed) run, e.g. after a crash or a killed driver."""
    from pipeline.runtime.artifacts import load_spec
    from pipeline.runtime.job import run_job

    spec = load_spec(job_dir)
    spec.output_dir = str(job_dir)
    summary = run_job(spec, address=address, progress=False if no_progress else None)
    if summary.get("eval_markdown"):
        click.echo(summary["eval_markdown"])
    click.echo(f"job {spec.name}: {summary['written']} images indexed; outputs in {job_dir}")


@main.command()
@click.argument("job_dir", type=click.Path(file_okay=False))
@_one_line_errors
def status(job_dir):
    """Per-stage unit states of a job folder, and the failures."""
    from pipeline.layout import JobLayout
    from pipeline.runtime.manifest import Manifest

    layout = JobLayout(job_dir)
    if not layout.manifest.is_file():
        raise FileNotFoundError(f"{job_dir}: no manifest; is it a job folder?")
    manifest = Manifest(layout.manifest)
    stages = [r[0] for r in manifest._db.execute("SELECT DISTINCT stage FROM units ORDER BY rowid")]
    for stage in stages:
        click.echo(f"{stage:24s} " + " ".join(f"{k}={v}" for k, v in sorted(manifest.counts(stage).items())))
    for stage, unit, error in manifest.failures():
        click.echo(f"FAILED {stage}/{unit}: {(error or '').splitlines()[-1] if error else ''}")
    manifest.close()


if __name__ == "__main__":
    main()
