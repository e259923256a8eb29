import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from pipeline.features.backbones import SmallResNet, block_pre_relu


def test_pre_relu_tap_is_negative_somewhere_and_relu_gives_block_output():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = torch.rand(4, 1, 28, 28)
    outputs = {}
    hooks = []
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            name = f"conv_{s + 2}_{b + 1}"
            hooks.append(block.register_forward_hook(
                lambda mod, inp, out, name=name: outputs.__setitem__(name, out)))
    with torch.no_grad():
        logits_plain = model(x)  # runs torchvision's real block forward, hooked
        logits, taps = model.forward_taps(x, model.tap_names())
    for h in hooks:
        h.remove()
    assert set(taps) == {"conv_2_1", "conv_2_2", "conv_3_1", "conv_3_2", "conv_4_1", "conv_4_2"}
    for name, tap in taps.items():
        assert tap.min() < 0, f"{name} has no negative value: not pre-ReLU"
        assert torch.allclose(torch.relu(tap), outputs[name], atol=1e-6), name
    assert torch.allclose(logits, logits_plain, atol=1e-5)


def test_block_pre_relu_matches_torchvision_bottleneck_and_basicblock():
    torch.manual_seed(0)
    bottleneck = Bottleneck(64, 16, downsample=None).eval()  # ResNet-50's block type
    down = torch.nn.Sequential(conv1x1(16, 32, 2), torch.nn.BatchNorm2d(32))
    basic = BasicBlock(16, 32, stride=2, downsample=down).eval()
    with torch.no_grad():
        for block, x in ((bottleneck, torch.randn(2, 64, 8, 8)), (basic, torch.randn(2, 16, 8, 8))):
            pre = block_pre_relu(block, x)
            assert pre.min() < 0
            assert torch.allclose(torch.relu(pre), block(x), atol=1e-6)


def test_unknown_tap_is_a_clear_error():
    model = SmallResNet().eval()
    try:
        model.forward_taps(torch.rand(1, 1, 28, 28), ["conv_5_1"])
    except KeyError as err:
        assert "conv_5_1" in str(err) and "conv_4_2" in str(err)
    else:
        raise AssertionError("expected KeyError")
