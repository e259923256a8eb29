import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, load_job


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
