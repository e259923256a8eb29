"""Jobs API submission without a cluster: the token is found where Ray keeps it and sent, a
missing one is one clear line, the package (and nothing heavy) is shipped, paths are checked."""

from pathlib import Path

import pytest
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.config import ConfigError, parse_job
from pipeline.runtime import auth
from pipeline.runtime.submit import jobs_client, relative_paths, submit_resume, submit_run


class FakeClient:
    """Records what a JobSubmissionClient was built with and asked to do."""

    def __init__(self, address, headers=None):
        self.address, self.headers, self.submitted = address, headers, []

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        # Ray uploads working_dir while submitting: read it before it is deleted
        kwargs["files"] = {p.name: p.read_text() for p in Path(kwargs["runtime_env"]["working_dir"]).iterdir()}
        return kwargs["submission_id"]


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(auth, "default_token_path", lambda: tmp_path / "nowhere" / "auth_token")


def _spec(tmp_path, **extra):
    return parse_job({"name": "sub", "output_dir": str(tmp_path / "out"),
                      "data": {"database": str(tmp_path / "db"), "queries": str(tmp_path / "q")},
                      **extra})


def test_token_is_found_in_rays_order(no_token, monkeypatch, tmp_path):
    assert auth.find_token() is None
    default = tmp_path / "nowhere" / "auth_token"
    default.parent.mkdir()
    default.write_text("from-default\n")
    assert auth.find_token() == ("from-default", str(default))
    path = tmp_path / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert auth.find_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth.auth_headers() == {"Authorization": "Bearer from-env"}


def test_missing_token_is_one_clear_line(no_token, monkeypatch, tmp_path):
    with pytest.raises(auth.AuthTokenMissing, match="no Ray authentication token: set .RAY_AUTH_TOKEN"):
        jobs_client("http://127.0.0.1:1", FakeClient)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "gone"))
    with pytest.raises(auth.AuthTokenMissing, match="gone: no such file"):
        auth.require_token()
    job = tmp_path / "job.yaml"
    job.write_text(f"name: x\noutput_dir: {tmp_path}/o\ndata: {{database: /d, queries: /q}}\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    result = CliRunner().invoke(main, ["submit", str(job), "--address", "http://127.0.0.1:1"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no Ray authentication token" in result.output


def test_jobs_api_needs_a_dashboard_address(no_token, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    with pytest.raises(ConfigError, match="--address http://HEAD:8265"):
        jobs_client(None, FakeClient)
    with pytest.raises(ConfigError, match="got 'ray://h:10001'"):
        jobs_client("ray://h:10001", FakeClient)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert jobs_client(None, FakeClient).address == "http://10.0.0.1:8265"


def test_submit_ships_the_package_and_the_resolved_spec(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    client = jobs_client("http://127.0.0.1:8265", FakeClient)
    assert client.headers == {"Authorization": "Bearer secret"}
    spec = _spec(tmp_path, evaluate={"num_queries": 7})
    job_id = submit_run(client, spec, until="verify")
    (call,) = client.submitted
    assert job_id == call["submission_id"] and job_id.startswith("knn-defense-sub-")
    assert call["entrypoint"] == ("python -m pipeline.cli run job.yaml --address auto --no-progress "
                                  "--until verify")
    env = call["runtime_env"]
    assert env["py_modules"] == [str(Path(pipeline.__file__).parent)]  # the package, not torch
    assert "pip" not in env and "conda" not in env
    assert "__pycache__" in env["excludes"]
    assert "num_queries: 7" in call["files"]["job.yaml"]
    assert parse_job(__import__("yaml").safe_load(call["files"]["job.yaml"])).output_dir == spec.output_dir
    assert call["metadata"]["output_dir"] == str(tmp_path / "out")

    submit_resume(client, "s3://bucket/jobs/sub")
    assert client.submitted[1]["entrypoint"].startswith(
        "python -m pipeline.cli resume s3://bucket/jobs/sub --address auto")


def test_submitted_specs_need_paths_the_cluster_sees(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    spec = parse_job({"name": "rel", "data": {"database": "data/db", "queries": "s3://b/q"}})
    problems = relative_paths(spec)
    assert [p.split(" ")[0] for p in problems] == ["output_dir", "data.database"]
    with pytest.raises(ConfigError, match="2 problems"):
        submit_run(jobs_client("http://h:8265", FakeClient), spec)
    with pytest.raises(ConfigError, match="absolute path or URL"):
        submit_resume(FakeClient("http://h:8265"), "runs/x")
