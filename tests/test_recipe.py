"""The feature recipe: what it records, how the query side matches it, and the GPU check's tiny
mode (so the prepared GPU check never rots)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.devices import task_device
from pipeline.features.backbones import SmallResNet
from pipeline.features.extract import DeviceFeeder, forward_taps, prefetched, to_device
from pipeline.features.recipe import (
    FeatureRecipe,
    RecipeMismatch,
    check_one_recipe,
    make_recipe,
    query_recipe,
    resolve_precision,
)

ROOT = Path(__file__).resolve().parents[1]
PRE = {"resize": 256, "crop": 224, "interpolation": "bilinear"}


def recipe(**changes) -> FeatureRecipe:
    base = make_recipe(PRE, "cuda", "auto", "auto", "w" * 64, {"head": "t1"})
    return FeatureRecipe(**{**base.as_dict(), **changes})


def test_auto_resolves_per_device():
    gpu = make_recipe(PRE, "cuda", "auto", "auto", "w", {"a": "t"})
    cpu = make_recipe(PRE, "cpu", "auto", "auto", "w", {"a": "t"})
    assert (gpu.precision, gpu.decoder) == ("fp32", "torchvision")
    assert (cpu.precision, cpu.decoder) == ("fp32", "pil")
    assert resolve_precision("tf32", "cpu") == "fp32"  # what ran, not what was asked
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16", "cuda")


def test_recipe_id_covers_every_field():
    ids = {recipe().id}
    for change in ({"precision": "bf16"}, {"precision": "tf32"}, {"decoder": "pil"},
                   {"device": "cpu"}, {"resize": 288}, {"interpolation": "bicubic"},
                   {"weights_sha256": "x"}, {"transforms_sha256": "y"}):
        ids.add(recipe(**change).id)
    assert len(ids) == 9
    assert FeatureRecipe.from_dict(recipe().as_dict()) == recipe()


def test_query_recipe_matches_what_a_cpu_can():
    q, differs = query_recipe(recipe(precision="bf16"), "cpu")
    assert (q.precision, q.decoder) == ("bf16", "torchvision") and differs == {"device": ("cuda", "cpu")}
    q, differs = query_recipe(recipe(precision="tf32"), "cpu")
    assert q.precision == "fp32" and set(differs) == {"device", "precision"}
    q, differs = query_recipe(recipe(device="cpu", decoder="pil"), "cpu")
    assert differs == {}


def test_mixed_recipes_are_refused_naming_both_files():
    assert check_one_recipe({"a.parquet": recipe().as_dict(), "b.parquet": None}) == recipe()
    with pytest.raises(RecipeMismatch, match=r"b.parquet: made by feature recipe .* but a.parquet .*precision fp32 vs bf16"):
        check_one_recipe({"a.parquet": recipe().as_dict(),
                          "b.parquet": recipe(precision="bf16").as_dict()})


def test_task_device():
    assert task_device(None, True) == "cuda:0"
    assert task_device(None, False) == "cpu"
    assert task_device([], True) == "cpu"  # given no GPU: never use the visible one
    assert task_device(["3"], True) == "cuda:0"  # the assigned GPU is the only visible one
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        task_device(["0"], False)


def test_bf16_precision_is_the_forward_arithmetic():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        fp32 = forward_taps(to_device(model, "cpu", "fp32"), x, ["conv_4_2"])[1]["conv_4_2"]
        bf16 = forward_taps(to_device(model, "cpu", "bf16"), x, ["conv_4_2"])[1]["conv_4_2"]
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert not torch.equal(fp32, bf16.float())
    torch.testing.assert_close(fp32, bf16.float(), atol=0.1, rtol=0.05)


def test_feeder_and_prefetch():
    images = torch.randint(0, 256, (3, 8, 8, 1), dtype=torch.uint8)
    x = DeviceFeeder(torch.device("cpu"))(images)
    assert x.shape == (3, 1, 8, 8) and torch.allclose(x * 255, images.permute(0, 3, 1, 2).float())
    assert list(prefetched(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise OSError("tar truncated")

    it = prefetched(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="tar truncated"):
        next(it)
    endless = prefetched(iter(range(10**9)))
    assert next(endless) == 0
    endless.close()  # stops the producer thread instead of leaving it blocked


def test_gpu_check_tiny_mode_runs_every_step(tmp_path):
    """The prepared GPU check, on CPU in seconds: every step runs and writes its JSON."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["finished"] and result["errors"] == {}
    extract = result["extract/efficientnet-lite0/fp32"]
    for key in ("256px/pil-threads", "256px/pil-processes", "256px/torchvision",
                "1080px/pil-threads", "1080px/pil-processes", "1080px/torchvision",
                "1080px/hybrid"):
        assert extract[key]["images"] > 0 and extract[key]["ratio_to_bare"] > 0
    agreement = result["recipes"]["query_cpu_fp32"]["recipes"]["cpu/fp32"]
    assert agreement["self_retrieval"]["rate"] == 1.0  # the same recipe finds every image
    assert np.isclose(agreement["self_retrieval"]["cosine_min"], 1.0)
    assert result["pixels"]["device_vs_cpu_torchvision"]["max_abs_levels"] == 0  # both CPU here


def test_auto_batch_counts_decode_buffers_and_the_gpu_share():
    from pipeline.features.extract import DECODE_BYTES_PER_IMAGE, batch_for_memory

    gib = 2**30
    alone = batch_for_memory(100 * gib, 140 * gib, 1.0, 20e6, 0, cap=10**6)
    with_nvjpeg = batch_for_memory(100 * gib, 140 * gib, 1.0, 20e6,
                                   DECODE_BYTES_PER_IMAGE["torchvision"], cap=10**6)
    half_gpu = batch_for_memory(100 * gib, 140 * gib, 0.5, 20e6, 0, cap=10**6)
    assert with_nvjpeg < alone  # a decoded 1080-px photo per slot is not free
    assert half_gpu == int(0.7 * 70 * gib / 20e6)  # a task given half a GPU sizes on half
    assert batch_for_memory(gib, 140 * gib, 1.0, 1e12, 0) == 8  # never below 8
    assert batch_for_memory(100 * gib, 140 * gib, 1.0, 1, 0) == 1024  # the cap


def test_query_decoded_like_an_nvjpeg_database():
    """A torchvision-decoded database's queries get torchvision's pixels (on the CPU), not
    Pillow's; bad bytes raise what Pillow's path raises."""
    import io

    from PIL import Image, UnidentifiedImageError

    from pipeline.features.tensor_decode import decode_batch, decode_like_database

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG")
    decode = {"channels": 3, "size": 224, "resize": 256, "interpolation": "bilinear"}
    batch, kept, _ = decode_batch([buf.getvalue()], "cpu", max_pixels=10**8, **decode)
    tv = decode_like_database(buf.getvalue(), 10**8, "torchvision", **decode)
    assert kept == [0] and tv.dtype == np.uint8 and tv.shape == (224, 224, 3)
    assert np.array_equal(tv, (batch[0] * 255).round().byte().permute(1, 2, 0).numpy())
    pil = decode_like_database(buf.getvalue(), 10**8, "pil", **decode)
    assert not np.array_equal(tv, pil)
    with pytest.raises(UnidentifiedImageError):
        decode_like_database(b"not an image", 10**8, "torchvision", **decode)
    with pytest.raises(OverflowError):
        decode_like_database(buf.getvalue(), 1000, "torchvision", **decode)


def test_docs_tables_match_the_committed_results():
    """docs/*.md result tables are rendered from benchmarks/results/*.json (no drift)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/render_docs.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_queries_loaded_like_an_nvjpeg_database_skip_with_the_cpu_paths_reasons(tmp_path):
    import io

    from PIL import Image

    from pipeline.data.shards import write_tar_shards
    from pipeline.features.tensor_decode import load_images_like_database

    def jpeg(w, h):
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    datas = [jpeg(64, 48), jpeg(400, 400), b"\xff\xd8 broken", jpeg(50, 40)]
    [shard] = write_tar_shards(tmp_path, 4, 4, lambda row, key: {"jpg": datas[row], "cls": "1"})
    decode = dict(channels=3, size=32, resize=36, interpolation="bilinear", max_pixels=100_000)
    got = {d: load_images_like_database([str(shard)], d, **decode) for d in ("pil", "torchvision")}
    for keys, images, labels, skipped in got.values():
        assert len(keys) == 2 and images.shape == (2, 32, 32, 3) and list(labels) == [1, 1]
        assert skipped == {"oversized_image": 1, "corrupt_image": 1}
