"""Input checks of a job spec that need the stages (shard expansion, weights, model taps), above
them in the layer map: pipeline.config parses a spec alone, this module checks that what it
names is there. ``knn-defense validate``, ``run`` / ``submit`` and ``run_job`` call it; every
problem is listed in one ConfigError (one line each) before any work."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import FASHION_MNIST_ENV, ConfigError, JobSpec, is_url, read_job


def load_job(path: str | os.PathLike, overrides: dict | None = None, *,
             check_inputs: bool = True) -> JobSpec:
    """Read, validate and check a job spec; raises ConfigError listing every problem before any
    work. ``check_inputs=False`` skips the checks that need the data and weights to be here
    (a spec written for a cluster)."""
    spec = read_job(path, overrides)
    if check_inputs:
        check_paths(spec, str(Path(path)))
    return spec


def check_paths(spec: JobSpec, source: str) -> None:
    """Inputs must exist now, not halfway through the job: every problem in one error."""
    problems = input_problems(spec)
    if problems:
        raise ConfigError.listing(source, problems)


def _missing_shard_problem(key: str, pattern, limit: int = 3) -> str | None:
    from pipeline.data.shards import expand_shards

    missing: list[str] = []
    try:
        urls = expand_shards(pattern, missing=missing)
    except (OSError, ImportError, ValueError) as err:  # an unreachable or unknown filesystem
        return f"data.{key}: {err}"
    if missing:
        shown = ", ".join(repr(m) for m in missing[:limit])
        more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
        return (f"data.{key}: {len(missing)} of {len(missing) + len(urls)} input shard(s) "
                f"missing: {shown}{more}")
    if not urls:
        return f"data.{key} matches no .tar shard"
    return None


def input_problems(spec: JobSpec) -> list[str]:
    """Missing data, weights, vocabulary; unknown taps; an output URL nobody can write."""
    problems = []
    fm = spec.data.fashion_mnist
    if fm is not None:
        from pipeline.data.fashion_mnist import missing_files

        missing = missing_files(fm.source_dir)
        if missing:
            problems.append(
                f"data.fashion_mnist.source_dir {fm.source_dir!r} lacks {missing[0]}; install the "
                f"Debian package dataset-fashion-mnist or set it (or ${FASHION_MNIST_ENV}) to a "
                "folder with the idx files")
    for key in ("database", "queries") if fm is None else ():  # else written by the import
        problem = _missing_shard_problem(key, getattr(spec.data, key))
        if problem:
            problems.append(problem)
    if spec.subset is not None and spec.subset.vocabulary is not None \
            and not Path(spec.subset.vocabulary).is_file():
        problems.append(f"subset.vocabulary {spec.subset.vocabulary!r} not found")
    if spec.model.weights not in (None, "random") and not Path(spec.model.weights).is_file():
        problems.append(f"model.weights {spec.model.weights!r} not found")
    elif spec.model.arch != "small_resnet" and spec.model.weights is None:
        from pipeline.features.backbones import pretrained_weights

        try:
            pretrained_weights(spec.model)
        except FileNotFoundError as err:
            problems.append(f"model.weights: {err}")
    bad_layers = _unknown_layers(spec)
    if bad_layers:
        problems.append(f"features.layers {bad_layers} are not taps of {spec.model.arch}")
    if is_url(spec.output_dir):
        import fsspec

        try:
            fsspec.core.url_to_fs(spec.output_dir)
        except (ImportError, ValueError) as err:
            problems.append(f"output_dir {spec.output_dir!r}: {str(err).splitlines()[0]}")
    return problems


def _unknown_layers(spec: JobSpec) -> list[str]:
    from pipeline.features.backbones import tap_names_for

    taps = tap_names_for(spec.model)
    return [layer for layer in spec.features.layers if layer not in taps]
