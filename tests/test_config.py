import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.validate import load_job


def _write(tmp_path, raw) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _base(fm_source, tmp_path) -> dict:
    return {"name": "t", "output_dir": str(tmp_path / "out"),
            "data": {"fashion_mnist": {"source_dir": str(fm_source), "out_dir": str(tmp_path / "d")}}}


def test_valid_spec_fills_defaults(fm_source, tmp_path):
    spec = load_job(_write(tmp_path, _base(fm_source, tmp_path)))
    assert spec.data.database == f"{tmp_path / 'd'}/train"
    assert spec.evaluate.k == 50 and spec.evaluate.attacks[0].budget == 0.06
    assert spec.features.layers[-1] == "conv_4_2"


def test_unknown_key_fails_with_one_line_naming_it(fm_source, tmp_path):
    raw = _base(fm_source, tmp_path)
    raw["features"] = {"pca_dims": 64}
    with pytest.raises(ConfigError) as err:
        load_job(_write(tmp_path, raw))
    msg = str(err.value)
    assert "features.pca_dims" in msg and "unknown key" in msg and "job.yaml" in msg
    assert "\n" not in msg


def test_missing_data_path_fails_naming_it(tmp_path):
    raw = {"name": "t", "data": {"database": str(tmp_path / "missing"), "queries": str(tmp_path)}}
    with pytest.raises(ConfigError, match="data.database.*missing"):
        load_job(_write(tmp_path, raw))
    raw = {"name": "t", "data": {"fashion_mnist": {"source_dir": str(tmp_path / "nowhere")}}}
    with pytest.raises(ConfigError, match="source_dir.*nowhere.*dataset-fashion-mnist"):
        load_job(_write(tmp_path, raw))


def test_bad_values_are_reported(fm_source, tmp_path):
    raw = _base(fm_source, tmp_path)
    raw["evaluate"] = {"attacks": [{"name": "pgd", "budget": -1}]}
    with pytest.raises(ConfigError, match="evaluate.attacks.0.pgd.budget"):
        load_job(_write(tmp_path, raw))
    raw["evaluate"] = {"weightings": ["cbw_x"]}
    with pytest.raises(ConfigError, match="weightings"):
        load_job(_write(tmp_path, raw))


def test_cli_bad_spec_exits_before_any_work(fm_source, tmp_path):
    raw = _base(fm_source, tmp_path)
    raw["colour"] = "blue"
    path = _write(tmp_path, raw)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", path],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {path}: unknown key 'colour': remove it or fix its spelling"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "d").exists()


def test_every_problem_is_listed_one_line_each_after_the_file(fm_source, tmp_path):
    raw = _base(fm_source, tmp_path)
    raw["features"] = {"pca_dims": 64, "batch_size": "big"}
    raw["index"] = {"nprobe": -1}
    raw["runtime"] = {"max_retries": -1, "retry_exceptions": ["ValueError"],
                      "resources": {"features": {"num_gpus": 1.5}, "evaluat": {}}}
    with pytest.raises(ConfigError) as err:
        load_job(_write(tmp_path, raw))
    first, *lines = str(err.value).splitlines()
    assert first == f"{tmp_path / 'job.yaml'}: 7 problems:"
    assert lines == [f"  - {p}" for p in err.value.problems]
    text = "\n".join(lines)
    assert "unknown key 'features.pca_dims': remove it or fix its spelling (did you mean 'pca_dim'?)" in text
    assert "bad value for 'features.batch_size'" in text and "(got 'big')" in text
    assert "bad value for 'index.nprobe'" in text and "should be 'auto'" in text
    assert "bad value for 'runtime.max_retries'" in text
    assert "bad value for 'runtime.retry_exceptions.0'" in text
    assert "runtime.resources.features: num_gpus=1.5: above 1 a task asks for whole CPUs/GPUs" in text
    assert "unknown key 'runtime.resources.evaluat'" in text and "did you mean 'evaluate'" in text


def test_resources_that_cannot_fit_the_local_ray_fail_before_any_work(fm_source, tmp_path):
    raw = _base(fm_source, tmp_path)
    raw["runtime"] = {"num_cpus": 2, "resources": {"index": {"num_cpus": 4}, "store": {"num_cpus": 3},
                                                   "features": {"num_cpus": 2, "memory_gb": -1}}}
    with pytest.raises(ConfigError, match=r"bad value for 'runtime.resources.features.memory_gb'"):
        load_job(_write(tmp_path, raw))
    raw["runtime"]["resources"]["features"] = {"num_cpus": 2, "num_gpus": 0.5, "memory_gb": 1}
    with pytest.raises(ConfigError, match=r"resources.index.num_cpus=4, resources.store.num_cpus=3 "
                                          r"exceed\(s\) the local Ray's runtime.num_cpus=2"):
        load_job(_write(tmp_path, raw))
    raw["runtime"]["resources"] = {"features": {"num_cpus": 2, "num_gpus": 0.5, "memory_gb": 1}}
    spec = load_job(_write(tmp_path, raw))
    assert spec.runtime.resources.features.ray_options() == {"num_cpus": 2, "num_gpus": 0.5,
                                                             "memory": 2**30}
    assert spec.runtime.retryable() == [OSError]


def test_missing_input_shards_are_all_named(tmp_path):
    (tmp_path / "db").mkdir()
    for i in (0, 2):
        (tmp_path / "db" / f"{i:05d}.tar").write_bytes(b"")
    raw = {"name": "t", "data": {"database": str(tmp_path / "db" / "{00000..00006}.tar"),
                                 "queries": str(tmp_path / "nowhere")},
           "model": {"weights": str(tmp_path / "w.pt")}}
    with pytest.raises(ConfigError) as err:
        load_job(_write(tmp_path, raw))
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("data.database: 5 of 7 input shard(s) missing: ")
    assert "00001.tar" in problems[0] and "and 2 more" in problems[0]
    assert problems[1].startswith("data.queries: 1 of 1 input shard(s) missing")
    assert problems[2] == f"model.weights {str(tmp_path / 'w.pt')!r} not found"
    assert load_job(_write(tmp_path, raw), check_inputs=False).name == "t"


def test_run_job_checks_inputs_before_any_work(tmp_path):
    """Python callers of run_job get the same input check as the CLI, before Ray or a folder."""
    from pipeline.config import parse_job
    from pipeline.runtime.job import run_job

    spec = parse_job({"name": "t", "output_dir": str(tmp_path / "out"),
                      "data": {"database": str(tmp_path / "missing"), "queries": str(tmp_path)}})
    with pytest.raises(ConfigError) as err:
        run_job(spec)
    assert str(err.value).startswith("job t: ") and len(err.value.problems) == 2
    assert err.value.problems[0].startswith("data.database: 1 of 1 input shard(s) missing")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["imagenet-ig-targeted", "imagenet-ig-all"])
def test_imagenet_specs_are_valid_and_only_lack_their_inputs_here(name):
    from pathlib import Path

    path = Path(__file__).parent.parent / "jobs" / f"{name}.yaml"
    spec = load_job(path, check_inputs=False)
    assert spec.model.arch == "resnet50" and spec.features.pooling == "avg"
    assert spec.features.pca_dim == 256 and "conv_5_1" in spec.features.layers
    assert spec.subset.kind == name.rsplit("-", 1)[1] and spec.subset.size == 10**9
    assert spec.evaluate.k == 50 and spec.evaluate.attacks[0].budget == 0.06
    assert "CHANGE-ME" in spec.data.database and "CHANGE-ME" in spec.output_dir
    with pytest.raises(ConfigError) as err:
        load_job(path)
    keys = {p.split(" ")[0].rstrip(":") for p in err.value.problems}
    assert keys <= {"data.database", "data.queries", "model.weights", "output_dir"}
    assert {"data.database", "data.queries"} <= keys


def test_cli_validate_lists_problems_and_skips_inputs_on_request(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    path = _write(tmp_path, {"name": "t", "data": {"database": "/x/{0..2}.tar", "queries": "/q"},
                             "store": {"partitions": 0}})
    result = CliRunner().invoke(main, ["validate", path])
    assert result.exit_code == 2
    assert result.output.splitlines()[0] == f"error: {path}: bad value for 'store.partitions': " \
                                            "Input should be greater than 0 (got 0)"
    path = _write(tmp_path, {"name": "t", "data": {"database": "/x/{0..2}.tar", "queries": "/q"}})
    result = CliRunner().invoke(main, ["validate", path])
    assert result.exit_code == 2 and "2 problems" in result.output
    result = CliRunner().invoke(main, ["validate", path, "--no-check-inputs"])
    assert result.exit_code == 0 and "ok" in result.output
