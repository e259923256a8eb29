"""ImageNet backbones: pre-ReLU taps of torchvision ResNets, EfficientNet-Lite with its real
pretrained weights, weight loading from a file or the torch cache (never a download)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from pipeline.config import ConfigError, ModelSpec, parse_job
from pipeline.data.shards import decode_image
from pipeline.features.backbones import (
    build_model,
    decode_args,
    images_to_tensor,
    load_model,
    pretrained_weights,
)
from pipeline.features.imagenet_backbones import torch_cache_weights


def _foolbox_images() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")  # locate its data files without importing it
    if spec is None:
        pytest.skip("foolbox not installed (make setup installs it with the dev extra)")
    return sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))


def test_resnet50_taps_are_pre_relu_with_the_papers_shapes():
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet50", weights="random")).eval()
    blocks = {"conv_2_3": model.net.layer1[2], "conv_3_4": model.net.layer2[3],
              "conv_4_6": model.net.layer3[5], "conv_5_1": model.net.layer4[0]}
    seen = {}
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n, b in blocks.items()]
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        plain = model(x)
        logits, taps = model.forward_taps(x, list(blocks))
    for h in hooks:
        h.remove()
    shapes = {n: tuple(t.shape[1:]) for n, t in taps.items()}
    assert shapes == {"conv_2_3": (256, 56, 56), "conv_3_4": (512, 28, 28),
                      "conv_4_6": (1024, 14, 14), "conv_5_1": (2048, 7, 7)}
    for name, tap in taps.items():
        assert tap.min() < 0 and torch.allclose(torch.relu(tap), seen[name], atol=1e-5), name
    assert torch.allclose(logits, plain, atol=1e-4)


def test_resnet18_weights_from_a_file_and_from_the_torch_cache(tmp_path, monkeypatch):
    torch.manual_seed(1)
    reference = resnet18(weights=None).eval()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)  # torchvision's own key layout
    model = load_model(ModelSpec(arch="resnet18", weights=str(path)), path)
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), reference((x - mean) / std), atol=1e-5)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth"):
        torch_cache_weights("resnet18")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(path.read_bytes())
    assert pretrained_weights(ModelSpec(arch="resnet18")) == str(cache / "resnet18-f37072fd.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="do not fit resnet18"):
        load_model(ModelSpec(arch="resnet18", weights=str(bad)), bad)


def test_efficientnet_lite0_real_weights_classify_the_foolbox_imagenet_samples():
    files = _foolbox_images()
    assert len(files) == 20
    spec = ModelSpec(arch="efficientnet-lite0")
    model = load_model(spec, pretrained_weights(spec))
    decode = decode_args(model)
    assert decode == {"channels": 3, "size": 224, "resize": 256, "interpolation": "bicubic"}
    images = np.stack([decode_image(f.read_bytes(), 10**8, **decode) for f in files])
    labels = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    with torch.inference_mode():
        logits, taps = model.forward_taps(images_to_tensor(images), ["stage6", "head"])
    correct = int((logits.argmax(1).numpy() == np.array(labels)).sum())
    assert correct >= 16, f"only {correct}/20: preprocessing or class order is wrong"
    assert tuple(taps["stage6"].shape[1:]) == (192, 7, 7)
    assert tuple(taps["head"].shape[1:]) == (1280, 7, 7)
    assert taps["head"].min() < 0 and taps["head"].max() > 6  # before ReLU6
    # the torchvision mean/std convention instead of (255 x - 127) / 128 loses accuracy
    x = images_to_tensor(images)
    tv = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        wrong = model.net(tv).argmax(1).numpy()
    assert int((wrong == np.array(labels)).sum()) < correct


def test_efficientnet_lite_stages_and_sizes():
    for arch, size, head in (("efficientnet-lite1", 240, 1280), ("efficientnet-lite2", 260, 1280)):
        model = build_model(ModelSpec(arch=arch)).eval()
        assert model.input_size == size and model.preprocess["resize"] == size + 32
        with torch.no_grad():
            logits, taps = model.forward_taps(torch.rand(1, 3, size, size), ["stage7", "head"])
        assert logits.shape == (1, 1000) and taps["head"].shape[1] == head


def test_job_spec_checks_arch_taps_and_weights(tmp_path):
    raw = {"name": "t", "data": {"database": str(tmp_path), "queries": str(tmp_path)},
           "model": {"arch": "efficientnet-lite0"}, "features": {"layers": ["stage6", "head"]}}
    spec = parse_job(raw)
    assert spec.model.num_classes == 1000 and spec.model.in_channels == 3
    from pipeline.validate import _unknown_layers

    assert _unknown_layers(spec) == []
    raw["features"]["layers"] = ["conv_5_1"]
    assert _unknown_layers(parse_job(raw)) == ["conv_5_1"]
    with pytest.raises(ConfigError, match="in_channels must be 3"):
        parse_job({**raw, "model": {"arch": "resnet50", "in_channels": 1}})


def test_auto_batch_size_on_cpu():
    from pipeline.features.extract import auto_batch_size

    assert auto_batch_size(build_model(ModelSpec())) == 512  # 28x28 inputs
    assert auto_batch_size(build_model(ModelSpec(arch="efficientnet-lite0"))) == 32
    assert auto_batch_size(build_model(ModelSpec()), 7) == 7
