"""jobs/imagenet-ig-small.yaml, the CPU-sized copy of the paper's ImageNet job, on generated
shards: IG-N-Targeted subset, ResNet-50 taps conv_4_6 and conv_5_1, PCA, index and store."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.data.generated import write_generated_shards
from pipeline.data.hashtags import load_vocabulary
from pipeline.layout import JobLayout
from pipeline.runtime.job import run_job
from pipeline.validate import load_job

SPEC = Path(__file__).parent.parent / "jobs" / "imagenet-ig-small.yaml"


def test_generated_shards_carry_vocabulary_hashtags_for_some_posts(tmp_path):
    from pipeline.data.shards import ShardStats, iter_samples

    (path,) = write_generated_shards(tmp_path, shards=1, per_shard=40, seed=3)
    vocab = load_vocabulary()
    samples = list(iter_samples(str(path), ShardStats(), decode=False, meta_exts=("json", "cls")))
    assert len(samples) == 40
    tagged = [s for s in samples if vocab.match(s.meta["tags"])[0]]
    assert 5 < len(tagged) < 35  # about half
    assert all(s.label in vocab.match(s.meta["tags"])[1] for s in tagged)


@pytest.mark.slow
def test_small_imagenet_job_runs_to_verify_on_generated_shards(tmp_path, ray_local):
    result = CliRunner().invoke(main, ["generate-shards", str(tmp_path / "db"), "--shards", "3",
                                       "--per-shard", "16"])
    assert result.exit_code == 0, result.output
    write_generated_shards(tmp_path / "q", shards=1, per_shard=8, seed=1)
    spec = load_job(SPEC, {"data.database": str(tmp_path / "db"), "data.queries": str(tmp_path / "q"),
                           "output_dir": str(tmp_path / "job"), "runtime.progress": False})
    assert spec.model.arch == "resnet50" and spec.subset.kind == "targeted"
    summary = run_job(spec, "verify")
    layout = JobLayout(spec.output_dir)
    assert summary["subset"]["selected"] == spec.subset.size
    assert summary["verify"]["keys"] == spec.subset.size  # generated JPEGs all decode
    table = pq.read_table(layout.features_file(0))
    assert table.schema.names[-3:] == ["conv_4_6", "conv_5_1", "softmax"]
    assert str(table.schema.field("softmax").type) == "fixed_size_list<element: halffloat>[1000]"
    assert summary["stages"]["features"]["done"] == 3
