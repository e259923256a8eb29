"""Batch decoding with torchvision on the model's device (nvJPEG on a GPU; run here on CPU through
the same code): the CPU path's sizes and skip reasons, pixels close to Pillow's, real weights
still right, and extract_shard writing the same rows through either backend."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import ModelSpec
from pipeline.data.folder import pack_image_folder
from pipeline.data.shards import decode_image
from pipeline.features.backbones import build_model, decode_args, load_model, pretrained_weights
from pipeline.features.extract import extract_shard, read_metadata
from pipeline.features.stack import LayerTransform
from pipeline.features.tensor_decode import decode_batch, resize_center_crop, resolve_backend
from pipeline.features.transforms import fit_pca
from tests.test_imagenet_backbones import _foolbox_images

DECODE = {"channels": 3, "size": 224, "resize": 256, "interpolation": "bicubic"}


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(smooth).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) == "pil"
    assert resolve_backend("auto", torch.device("cuda")) == "torchvision"
    assert resolve_backend("torchvision", torch.device("cpu")) == "torchvision"
    with pytest.raises(ValueError, match="use one of auto, pil, torchvision"):
        resolve_backend("nvjpeg", torch.device("cpu"))


def test_resize_and_crop_sizes_follow_the_cpu_path():
    img = torch.zeros(3, 300, 533, dtype=torch.uint8)
    assert tuple(resize_center_crop(img, 224, 256, "bicubic").shape) == (3, 224, 224)
    same = torch.arange(3 * 256 * 300, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 256, 300)
    cropped = resize_center_crop(same, 224, 256, "bilinear")  # short side already 256: crop only
    assert torch.equal(cropped, same[:, 16:240, 38:262])


def test_pixels_close_to_pillow_and_real_weights_still_classify_the_foolbox_samples():
    files = _foolbox_images()
    datas = [f.read_bytes() for f in files]
    x, kept, skipped = decode_batch(datas, "cpu", max_pixels=10**8, **DECODE)
    assert kept == list(range(20)) and skipped == []
    assert x.shape == (20, 3, 224, 224) and x.dtype == torch.float32
    pil = torch.from_numpy(np.stack([decode_image(d, 10**8, **DECODE) for d in datas]))
    diff = (x * 255 - pil.permute(0, 3, 1, 2).float()).abs()
    assert diff.mean() < 3.0, f"mean difference {diff.mean():.2f} levels"
    spec = ModelSpec(arch="efficientnet-lite0")
    model = load_model(spec, pretrained_weights(spec))
    assert decode_args(model) == DECODE
    labels = np.array([int(f.stem.rsplit("_", 1)[1]) for f in files])
    with torch.inference_mode():
        correct = int((model(x).argmax(1).numpy() == labels).sum())
    assert correct >= 16, f"only {correct}/20 through the torchvision decode path"


def test_bad_and_non_jpeg_images_get_the_cpu_paths_reasons():
    png = io.BytesIO()
    Image.new("RGB", (300, 260), (10, 200, 30)).save(png, "PNG")
    big = _jpeg(640, 480, seed=1)
    datas = [_jpeg(320, 256), b"\xff\xd8\xff\xe0 not really a jpeg", png.getvalue(), big,
             b"", _jpeg(256, 400, seed=2)]
    x, kept, skipped = decode_batch(datas, "cpu", max_pixels=200_000, **DECODE)
    assert kept == [0, 2, 5]
    assert [(i, reason) for i, reason, _ in skipped] == [
        (1, "corrupt_image"), (3, "oversized_image"), (4, "corrupt_image")]
    assert "640x480 exceeds 200000 pixels" in skipped[1][2]
    assert x.shape == (3, 3, 224, 224)
    # the PNG went through Pillow: exactly its pixels
    assert torch.allclose(x[1, :, 0, 0], torch.tensor([10, 200, 30]) / 255.0)
    nothing, kept, skipped = decode_batch([b"junk"], "cpu", max_pixels=10**8, **DECODE)
    assert nothing is None and kept == [] and skipped[0][1] == "corrupt_image"


def test_extract_shard_writes_the_same_rows_with_either_backend(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for f in _foolbox_images()[:10]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "imagenet_99_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    shard = pack_image_folder(folder, tmp_path / "shards", label_pattern=r"_(\d+)\.")["shards"][0]
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="efficientnet-lite0", weights="random")).eval()
    layers = ["stage6"]
    stacks = {"stage6": LayerTransform("avg", fit_pca(np.random.default_rng(0).normal(size=(300, 192)), 16))}
    tables = {}
    for backend in ("pil", "torchvision"):
        out = tmp_path / f"{backend}.parquet"
        result = extract_shard(model, stacks, shard, 0, str(out), layers=layers, batch_size=4,
                               decode=decode_args(model), max_pixels=10**8, provenance={},
                               decode_backend=backend)
        assert result["written"] == 10 and result["skipped"] == {"corrupt_image": 1}
        assert read_metadata(out)["stats"]["decoded"] == 10
        tables[backend] = pq.read_table(out)
    pil, tv = tables["pil"], tables["torchvision"]
    for column in ("key", "id", "label"):
        assert pil.column(column).to_pylist() == tv.column(column).to_pylist()
    a, b = (np.array(t.column("stage6").to_pylist(), np.float32) for t in (pil, tv))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.98, cosine
