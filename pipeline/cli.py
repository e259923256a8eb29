"""`knn-defense` command line: run a job or one stage of it, import data, classify, status."""

from __future__ import annotations

import functools
import logging
import sys

import click
import yaml

from pipeline import __version__
from pipeline.config import ConfigError
from pipeline.runtime.job import STAGES
from pipeline.validate import load_job


def _one_line_errors(fn):
    """Known failures become one line on stderr (exit 2 for bad input, 1 for failed work); a
    failed job prints its summary first."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.runtime.job import JobFailed, format_summary
        from pipeline.runtime.ray_runner import StageFailed
        from pipeline.runtime.verify import VerifyFailed

        try:
            return fn(*args, **kwargs)
        except (ConfigError, FileNotFoundError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except JobFailed as err:  # the summary ends with the retry command
            click.echo(format_summary(err.summary))
            click.echo(f"error: {str(err).splitlines()[0]}", err=True)
            sys.exit(1)
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


_no_progress = click.option("--no-progress", is_flag=True,
                            help="No progress bars (one line per stage).")
_quiet = click.option("--quiet", "-q", is_flag=True,
                      help="For logs: no progress bars, no per-stage lines; the summary and errors.")
_progress_options = [_no_progress, _quiet]

_job_options = [
    click.argument("job_yaml", type=click.Path(dir_okay=False)),
    click.option("--address", default=None, help="Ray address; default: start a local Ray on 127.0.0.1."),
    click.option("--num-cpus", type=int, default=None, help="CPUs for the local Ray."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Override a spec key, e.g. --set evaluate.num_queries=200 (repeatable)."),
    _no_progress,
]


def _apply(options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


job_options = _apply(_job_options)
progress_options = _apply(_progress_options)


def _progress_modes(no_progress: bool, quiet: bool) -> dict:
    """run_job's progress (bars) and announce (a line per stage) for the flags."""
    if quiet:
        return {"progress": False, "announce": False}
    if no_progress:
        return {"progress": False, "announce": True}
    return {"progress": None, "announce": None}


def _finish(summary: dict, until: str | None) -> None:
    from pipeline.runtime.job import format_summary

    if summary.get("eval_markdown") and until in (None, "evaluate"):
        click.echo("")
        click.echo(summary["eval_markdown"])
    click.echo(format_summary(summary))


def _run(job_yaml, address, num_cpus, sets, no_progress, until, quiet=False):
    from pipeline.runtime.job import run_job

    if _is_jobs_address(address):
        raise ConfigError(f"--address {address} is a Jobs API address: use `knn-defense submit` "
                          "(run takes a Ray address such as auto or ray://HEAD:10001)")
    spec = load_job(job_yaml, _parse_sets(sets))  # inputs checked here, naming the file
    summary = run_job(spec, until, address=address, num_cpus=num_cpus, check_inputs=False,
                      **_progress_modes(no_progress, quiet))
    _finish(summary, until)


def _is_jobs_address(address) -> bool:
    from pipeline.runtime.submit import is_jobs_address

    return is_jobs_address(address)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def main(verbose: bool) -> None:
    """kNN defense against adversarial images: build the database, query it, evaluate it."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@job_options
@_quiet
@click.option("--until", type=click.Choice(STAGES), default=None,
              help="Stop after this stage (default: run every stage).")
@_one_line_errors
def run(job_yaml, address, num_cpus, sets, no_progress, quiet, until):
    """Run the job described by JOB_YAML. Finished units are reused: re-running redoes only what
    is missing, failed, or changed. Exits 1 when units failed (after the others finished),
    printing what failed and the command that retries it."""
    _run(job_yaml, address, num_cpus, sets, no_progress, until, quiet)


def _stage_command(stage: str):
    @job_options
    @_quiet
    @_one_line_errors
    def command(job_yaml, address, num_cpus, sets, no_progress, quiet):
        _run(job_yaml, address, num_cpus, sets, no_progress, stage, quiet)

    command.__doc__ = f"Run a job up to its {stage} stage (same as run --until {stage})."
    return main.command(name=stage)(command)


for _stage in STAGES:
    if _stage not in ("import", "subset", "index", "evaluate", "verify"):  # these have their own commands
        _stage_command(_stage)


@main.command()
@job_options
@_quiet
@_one_line_errors
def evaluate(job_yaml, address, num_cpus, sets, no_progress, quiet):
    """Run an experiment file (attacks x databases x defenses: tables, plots, claims), or a job
    up to its evaluate stage when JOB_YAML is a job spec. Cells already written are reused."""
    from pipeline.evaluate.experiment import is_experiment_file, load_experiment
    from pipeline.runtime.experiment import run_experiment

    if not is_experiment_file(job_yaml):
        _run(job_yaml, address, num_cpus, sets, no_progress, "evaluate", quiet)
        return
    exp = load_experiment(job_yaml, _parse_sets(sets))
    result = run_experiment(exp, address, num_cpus, progress=not (no_progress or quiet))
    click.echo("")
    click.echo(result["markdown"])
    click.echo(f"experiment {exp.name}: {result['sets_crafted']} adversarial set(s) crafted, "
               f"{result['cells_evaluated']} cell(s) evaluated now (the rest reused); outputs in "
               f"{exp.output_dir}")
    failed = {db: s["failed"] for db, s in (result.get("sanity") or {}).items() if s["failed"]}
    if failed:
        click.echo("sanity checks failed (tables flagged): " + "; ".join(
            f"{db}: {', '.join(names)}" for db, names in failed.items()))


@main.command()
@click.argument("target")
@click.option("--address", default=None,
              help="Ray address (default: local Ray). With a job folder: run the checks as tasks there.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="With a JOB_YAML: override a key.")
@click.option("--run-on", "run_on", type=click.Choice(["auto", "process", "ray"]), default="auto",
              show_default=True,
              help="With a job folder: the checks one after another in this process, or as tasks "
                   "on Ray; auto: this process up to 5M keys (and no --address), else Ray.")
@progress_options
@_one_line_errors
def verify(target, address, sets, run_on, no_progress, quiet):
    """Check a job folder (path or URL): every selected key is exactly once in Parquet, every
    FAISS index and the LevelDB store, or recorded as skipped with its reason. The checks are
    units of one shard, hash bucket, index file or store partition each (memory bounded by
    one of them, whatever N): run in this process for small jobs, as tasks on a local Ray
    (or --address) for large ones (--run-on). Given a JOB_YAML instead, run the job up to its
    verify stage."""
    import json
    import os

    from pipeline.config import is_url

    if not is_url(target) and os.path.isfile(target):
        _run(target, address, None, sets, no_progress, "verify", quiet)
        return
    from pipeline.runtime.verify import verify_folder

    mode = {"auto": "auto", "process": "local", "ray": "ray"}[run_on]
    result = verify_folder(target, mode, address, progress=not no_progress and not quiet)
    click.echo(json.dumps(result))
    click.echo(f"verify: ok, {result['keys']} keys in Parquet, {len(result['layers'])} index(es) "
               f"and the store exactly once; skipped {result['skipped'] or 0}")


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a spec key.")
@click.option("--no-check-inputs", is_flag=True,
              help="Check the spec only, not that its data and weights exist here (a cluster's spec).")
@_one_line_errors
def validate(job_yaml, sets, no_check_inputs):
    """Check a job spec: every problem (unknown keys, bad values, missing inputs) at once."""
    spec = load_job(job_yaml, _parse_sets(sets), check_inputs=not no_check_inputs)
    click.echo(f"{job_yaml}: ok (job {spec.name}, output {spec.output_dir})")


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
@click.option("--address", default=None,
              help="The cluster's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a spec key (repeatable).")
@click.option("--until", type=click.Choice(STAGES), default=None, help="Stop after this stage.")
@click.option("--check-inputs", is_flag=True,
              help="Also check here that the data and weights exist (when this machine sees the "
                   "cluster's storage); the cluster checks them before any work anyway.")
@_one_line_errors
def submit(job_yaml, address, sets, until, check_inputs):
    """Submit JOB_YAML to a Ray cluster through the Jobs API and print the job id. The package is
    shipped with the job; torch and faiss come from the cluster's image. Paths in the spec must
    be absolute or URLs that the cluster sees. Re-submitting a spec resumes its output folder."""
    from pipeline.runtime.submit import jobs_api_errors, jobs_client, submit_run

    spec = load_job(job_yaml, _parse_sets(sets), check_inputs=check_inputs)
    client = jobs_client(address)
    with jobs_api_errors(address):
        job_id = submit_run(client, spec, until)
    click.echo(job_id)
    click.echo(f"submitted {spec.name} (outputs: {spec.output_dir}); watch it with "
               f"`knn-defense status {job_id}` / `knn-defense logs {job_id} --follow`", err=True)


@main.command()
@click.argument("job_id")
@click.option("--address", default=None, help="The cluster's dashboard (default: $RAY_ADDRESS).")
@click.option("--follow", "-f", is_flag=True, help="Stream the logs until the job ends.")
@_one_line_errors
def logs(job_id, address, follow):
    """The driver logs of a submitted job."""
    from pipeline.runtime.submit import follow_logs, jobs_address, jobs_api_errors, jobs_client

    client = jobs_client(address)
    with jobs_api_errors(jobs_address(address)):
        if follow:
            follow_logs(client, job_id, lambda text: click.echo(text, nl=False))
        else:
            click.echo(client.get_job_logs(job_id), nl=False)


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

    from pipeline.jobfolder import load_spec
    from pipeline.layout import JobLayout, read_json

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
    from pipeline.jobfolder import KeyLookup, load_layer_index
    from pipeline.layout import JobLayout

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


@main.command("import-images")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--out-dir", required=True, help="Where the tar shards go.")
@click.option("--label-pattern", default=None,
              help=r"Regex whose first group in the file name is the class index, e.g. '_(\d+)\.jpg$'.")
@click.option("--glob", "glob_", default="*", show_default=True, help="Only files matching this.")
@click.option("--samples-per-shard", default=10000, show_default=True)
@_one_line_errors
def import_images_cmd(source, out_dir, label_pattern, glob_, samples_per_shard):
    """Pack a folder of image files into webdataset tar shards (labels from file names)."""
    from pipeline.data.folder import pack_image_folder

    try:
        result = pack_image_folder(source, out_dir, label_pattern, samples_per_shard, glob_)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    click.echo(f"{result['images']} images -> {len(result['shards'])} shard(s) in {out_dir}")
def _readable_job(job_dir: str):
    """A finished job folder to query: the path, or a local copy of a URL's complete stages."""
    from pipeline.runtime.remote import local_job_dir

    return local_job_dir(job_dir, required=["shards", "train", "transforms", "features", "index",
                                            "store"])


@main.command("generate-shards")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--shards", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--per-shard", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--size", default=96, show_default=True, type=click.IntRange(min=16),
              help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True)
@click.option("--tagged-fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Share of samples carrying an ImageNet-vocabulary hashtag of their class.")
@_one_line_errors
def generate_shards(out_dir, shards, per_shard, size, seed, tagged_fraction):
    """Write generated Instagram-like shards (JPEG, json with hashtags, ImageNet label) for the
    small ImageNet-shaped job (jobs/imagenet-ig-small.yaml)."""
    from pipeline.data.generated import write_generated_shards

    paths = write_generated_shards(out_dir, shards, per_shard, size, seed, tagged_fraction)
    click.echo(f"{len(paths)} shards of {per_shard} samples in {out_dir}")


@main.command()
@click.option("--job", "job_dir", required=True, help="A finished job folder (path or URL).")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--layer", default=None,
              help="Feature layer. Default: the one the job's evaluation chose (best worst-case "
                   "accuracy at the headline budget; among layers within its 95% interval, the "
                   "best clean accuracy; eval/default_layer.json), else the last tap.")
@click.option("--weighting", type=click.Choice(["uw", "cbw_e", "cbw_d"]), default="cbw_d", show_default=True)
@click.option("-k", "--k", type=int, default=None, help="Neighbours (default: the job's evaluate.k).")
@click.option("--neighbours", "show_neighbours", is_flag=True, help="Print the nearest neighbours too.")
@_one_line_errors
def classify(job_dir, images, layer, weighting, k, show_neighbours):
    """Classify image files with the kNN defense of a finished job."""
    import numpy as np

    from pipeline.defense.classifier import DefendedClassifier

    overrides = {"weighting": weighting, **({"layer": layer} if layer else {}), **({"k": k} if k else {})}
    defense = DefendedClassifier.from_job(_readable_job(job_dir), **overrides)
    if defense.recipe["differs"]:
        click.echo(f"note: queries run {defense.recipe['differs']} (database vs here); "
                   "docs/gpu.md gives the measured agreement", err=True)
    arrays = []
    for path in images:
        try:
            with open(path, "rb") as f:
                arrays.append(defense.decode(f.read()))
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{path}: not a readable image ({err})") from None
    click.echo(f"layer {defense.layer_reason}", err=True)
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
@click.argument("job_dir", type=click.Path(file_okay=False))
@click.option("--queries", "queries", required=True,
              help="The evaluation images: shard URLs (folder, glob, {00000..00009}, s3://...).")
@click.option("--layer", default=None,
              help="Feature layer. Default: calibrated (the best recall at its threshold).")
@click.option("--threshold", type=float, default=None,
              help="Distance below which a pair is a near-duplicate (needs --layer). Default: "
                   "calibrated (the largest with precision >= 0.99 on the calibration pairs).")
@click.option("-k", "--k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Database neighbours examined per query.")
@click.option("--calibration", "calibration", type=click.IntRange(min=1), default=500,
              show_default=True, help="Query images sampled for calibration.")
@click.option("--seed", default=0, show_default=True)
@_one_line_errors
def decontaminate(job_dir, queries, layer, threshold, k, calibration, seed):
    """Find database images that are duplicates or near-duplicates of the images of --queries,
    with the job's own index: writes JOB_DIR/eval/decontaminate/duplicates.parquet and
    report.json (layer, threshold, calibration precision and recall)."""
    from pipeline.data.shards import expand_shards
    from pipeline.evaluate.decontaminate import decontaminate as run_decontaminate
    from pipeline.evaluate.decontaminate import output_dir

    urls = expand_shards(queries)
    if not urls:
        raise ConfigError(f"--queries {queries!r} matches no .tar shard")
    try:
        report = run_decontaminate(job_dir, urls, layer=layer, threshold=threshold, k=k,
                                   calibration_images=calibration, seed=seed,
                                   log=functools.partial(click.echo, err=True))
    except ValueError as err:  # e.g. a layer the job does not have
        raise ConfigError(str(err).splitlines()[0]) from None
    cal, how = report["calibration"], report["how_chosen"]

    def rate(r):
        if r["value"] is None:
            return "n/a (no pairs)"
        return f"{r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"

    click.echo(f"layer {report['layer']} ({how['layer']})")
    click.echo(f"threshold {report['threshold']:.6g} {report['metric']} ({how['threshold']})")
    click.echo(f"calibration: {cal['images']} images, {cal['positives']} augmented pairs, "
               f"{cal['negatives']} nearest-image pairs ({cal['negatives_set_aside']} set aside "
               "as likely true duplicates)")
    click.echo(f"  precision {rate(cal['precision'])}  recall {rate(cal['recall'])}  "
               f"false positives {rate(cal['false_positive_rate'])}")
    for kind, r in cal["per_augmentation"].items():
        click.echo(f"  {kind:<7} recall {rate(r['recall'])}  precision {rate(r['precision'])}")
    click.echo(f"{report['queries_scanned']:,} queries scanned: "
               f"{report['queries_with_duplicate']:,} with a near-duplicate, "
               f"{report['database_images_found']:,} database images found "
               f"({report['pairs']:,} pairs, {report['seconds']:.0f} s)")
    expected = report["expected_false_queries"]
    if expected[0] is not None:
        click.echo(f"  of which look-alikes rather than copies, by the calibration: about "
                   f"{expected[0]:,} [{expected[1]:,}, {expected[2]:,}]")
    click.echo(f"written: {output_dir(job_dir)}/{{duplicates.parquet,report.json}}")


@main.command()
@click.option("--job", "job_dir", required=True, help="A finished job folder (path or URL).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Bind address (loopback by default; put a proxy in front for remote clients).")
@click.option("--port", default=8000, show_default=True)
@click.option("--max-request-mb", default=32, show_default=True, help="Request body limit.")
@click.option("--max-images", default=64, show_default=True, help="Images per request.")
@click.option("--batch-window-ms", default=5.0, show_default=True,
              help="How long concurrent requests are collected into one batch.")
@click.option("--layer", default=None,
              help="Default layer of requests without `layer`. Default: the one the job's "
                   "evaluation chose (best worst-case accuracy at the headline budget; among "
                   "layers within its 95% interval, the best clean accuracy), else the last tap; "
                   "GET /info says which and why.")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False),
              help="A file holding the token every request but /healthz must carry "
                   "(Authorization: Bearer, or ?token= in the page's URL); also "
                   "$KNN_DEFENSE_SERVE_TOKEN. Required to bind anything but loopback.")
@click.option("--attack-timeout-s", default=60.0, show_default=True,
              help="The viewer's attack button: time limit of one attack (504 past it).")
@click.option("--reload-interval-s", default=2.0, show_default=True,
              help="How often generation.json is polled for a newer database (after `add` or "
                   "`remove`), swapped in without a restart; 0: only on POST /admin/reload.")
@_one_line_errors
def serve(job_dir, host, port, max_request_mb, max_images, batch_window_ms, layer, token_file,
          attack_timeout_s, reload_interval_s):
    """HTTP query service and neighbour viewer: the page at /, POST /classify, /explain and
    /attack, GET /image/{id}, /queries, /query-image/{key}, /healthz, /info."""
    from pipeline.serve.access import resolve_token
    from pipeline.serve.app import serve as run_server

    resolve_token(host, token_file)  # refuse an unprotected public bind before loading anything
    run_server(str(_readable_job(job_dir)), host, port, max_request_bytes=max_request_mb << 20,
               max_images_per_request=max_images, batch_window_ms=batch_window_ms, layer=layer,
               token_file=token_file, attack_timeout_s=attack_timeout_s,
               reload_interval_s=reload_interval_s)


@main.command()
@click.argument("job_dir")
@click.option("--address", default=None,
              help="Ray address (default: a local Ray on 127.0.0.1), or a dashboard "
                   "http://HEAD:8265 to resume on the cluster through the Jobs API.")
@progress_options
@_one_line_errors
def resume(job_dir, address, no_progress, quiet):
    """Finish a job folder (path or URL) from its recorded spec (job.yaml): only units that are
    not done (or whose inputs changed) run, e.g. after failures, a crash or a killed driver."""
    from pipeline.config import is_url
    from pipeline.runtime.job import run_job
    from pipeline.runtime.submit import is_jobs_address

    if is_jobs_address(address):
        from pipeline.runtime.submit import jobs_api_errors, jobs_client, submit_resume

        client = jobs_client(address)
        with jobs_api_errors(address):
            click.echo(submit_resume(client, job_dir))
        return
    spec = _recorded_spec(job_dir)
    spec.output_dir = job_dir if is_url(job_dir) else str(job_dir)
    summary = run_job(spec, address=address, **_progress_modes(no_progress, quiet))
    _finish(summary, None)


@main.command()
@click.argument("job_dir")
@click.argument("shard_urls", nargs=-1, required=True)
@click.option("--address", default=None, help="Ray address (default: a local Ray on 127.0.0.1).")
@progress_options
@_one_line_errors
def add(job_dir, shard_urls, address, no_progress, quiet):
    """Add SHARD_URLS (paths, URLs, {a..b} patterns) to a finished job's database as a new
    generation: scanned, extracted with the frozen weights and transforms, populated into the
    trained index (their own generation file) and stored; cost O(new shards). Then verifies."""
    from pipeline.runtime.living import add_shards
    from pipeline.runtime.verify import verify_folder
    from pipeline.store.softmax_store import StoreLocked

    result = add_shards(job_dir, list(shard_urls), address=address,
                        progress=not no_progress and not quiet)
    try:
        checked = f"verify ok, {verify_folder(job_dir)['keys']} keys"
    except StoreLocked:
        checked = "verify skipped: a running serve holds the store (run `knn-defense verify` later)"
    click.echo(f"add: generation {result['generation']}: {result['shards']} shard(s), "
               f"{result['images']} images (shard indexes {result['shard_indexes'][0]}.."
               f"{result['shard_indexes'][-1]}); {checked}")


@main.command()
@click.argument("job_dir")
@click.option("--keys", "keys_file", required=True, type=click.Path(dir_okay=False),
              help="A file with one sample key per line.")
@_one_line_errors
def remove(job_dir, keys_file):
    """Take the listed images out of the database: every index (batched remove_ids; tombstones
    in read-only on-disk lists until `compact`) and the store; journaled, so running it again
    after a crash finishes it. Unknown keys are listed, not an error."""
    from pipeline.runtime.living import remove_keys

    report = remove_keys(job_dir, keys_file)
    click.echo(f"remove: generation {report['generation']}: {report['found']} of "
               f"{report['keys']} keys removed, {report['already_removed']} already removed, "
               f"{report['unknown']} unknown" + (f" (e.g. {', '.join(report['unknown_keys'][:5])})"
                                                 if report["unknown"] else "")
               + (f"; {report['tombstoned_files']} on-disk index file(s) skip them until "
                  "`knn-defense compact`" if report["tombstoned_files"] else "")
               + (f"; the store is held by a running serve: it deletes {report['store_deferred']} "
                  "of them on its next reload" if report["store_deferred"] else ""))


@main.command()
@click.argument("job_dir")
@_one_line_errors
def compact(job_dir):
    """Fold the added generations into the base index files and store partitions, and rewrite
    on-disk lists without their removed ids (journaled; run it while nothing serves the job)."""
    from pipeline.runtime.living import compact as compact_job

    result = compact_job(job_dir)
    click.echo(f"compact: generation {result['generation']}: {result['folded']} added "
               f"generation(s) folded, {result['rewritten']} index file(s) rewritten")


def _recorded_spec(job_dir: str):
    """The resolved spec a job folder (or URL: its local staging copy, else the upload) was
    started with."""
    from pipeline.config import is_url, parse_job
    from pipeline.jobfolder import load_spec

    if not is_url(job_dir):
        return load_spec(job_dir)
    from pipeline.runtime.remote import RemoteJob, default_staging

    remote = RemoteJob(job_dir, default_staging(job_dir))
    if (remote.staging / "job.yaml").is_file():
        return load_spec(remote.staging)
    if not remote.has_job():
        raise FileNotFoundError(f"{job_dir}: not a job folder (no job.yaml)")
    raw = yaml.safe_load(remote.read_text("job.yaml"))
    raw.pop("code_version", None)
    return parse_job(raw, f"{job_dir}/job.yaml")


@main.command()
@click.argument("target")
@click.option("--address", default=None,
              help="For a Ray job id: the cluster's dashboard (default: $RAY_ADDRESS).")
@_one_line_errors
def status(target, address):
    """TARGET is a job folder (path or URL): unit states per stage, the last run's report, the
    failures; or a submitted job's id: its state on the cluster."""
    import os

    from pipeline.config import is_url

    if is_url(target) or os.path.isdir(target):
        _folder_status(target)
        return
    import json

    from pipeline.runtime.submit import job_status, jobs_address, jobs_api_errors, jobs_client

    if not target.startswith("knn-defense-") and not target.startswith("raysubmit_") \
            and not (address or os.environ.get("RAY_ADDRESS")):
        raise FileNotFoundError(f"{target}: no such job folder (for a submitted job's id pass "
                                "--address http://HEAD:8265 or set $RAY_ADDRESS)")
    client = jobs_client(address)
    with jobs_api_errors(jobs_address(address)):
        click.echo(json.dumps(job_status(client, target), indent=2, default=str))


def _folder_status(target: str) -> None:
    from pipeline.config import is_url
    from pipeline.layout import JobLayout, read_json
    from pipeline.runtime.manifest import Manifest

    if is_url(target):
        from pipeline.runtime.remote import RemoteJob, default_cache

        remote = RemoteJob(target, default_cache(target))
        if not remote.has_job():
            raise FileNotFoundError(f"{target}: not a job folder (no job.yaml)")
        remote.fetch_state()
        layout = JobLayout(remote.staging)
        complete = sorted(remote.complete_stages())
        click.echo(f"uploaded and marked complete: {', '.join(complete) or 'nothing yet'}")
    else:
        layout = JobLayout(target)
    if not layout.manifest.is_file():
        raise FileNotFoundError(f"{target}: no manifest; is it a job folder?")
    manifest = Manifest(layout.manifest)
    try:
        for stage in manifest.stage_names():
            states = manifest.counts(stage)
            info = manifest.stage_info(stage) or {}
            total = f"/{info['total']}" if info.get("total") else ""
            line = f"{stage:24s} done={states.get('done', 0)}{total} " + " ".join(
                f"{k}={v}" for k, v in sorted(states.items()) if k != "done")
            report = info.get("report")
            if report:
                line += f"  (last run: {report['done']} done, {report['failed']} failed, " \
                        f"{report['cached']} cached, {report['seconds']:.1f}s)"
            click.echo(line.rstrip())
        failures = manifest.failures(limit=20)
        for stage, unit, error in failures:
            lines = [x for x in (error or "").splitlines() if x.strip()]
            click.echo(f"FAILED {stage}/{unit}: {lines[-1] if lines else ''}")
    finally:
        manifest.close()
    if layout.summary.is_file():
        summary = read_json(layout.summary)
        click.echo(f"last summary: {summary.get('status', 'done')}"
                   + (f"; retry: {summary['retry']}" if summary.get("retry") else ""))
    _generations_status(layout)


def _generations_status(layout) -> None:
    from pipeline.jobfolder import read_generations

    gens = read_generations(layout)
    if not gens["generation"]:
        return
    click.echo(f"database generation {gens['generation']}:")
    for g in gens.get("compacted", []):
        click.echo(f"  generation {g['generation']}: added {len(g['shard_indexes'])} shard(s), "
                   f"{g['images']} images (compacted into the base files)")
    for g in gens["added"]:
        click.echo(f"  generation {g['generation']}: added {len(g['shard_indexes'])} shard(s), "
                   f"{g['images']} images (own index and store files)")
    for r in gens["removals"]:
        click.echo(f"  generation {r['generation']}: removed {r['removed']} images "
                   f"({r['unknown']} unknown keys) from {r['keys_file']}")


if __name__ == "__main__":
    main()
