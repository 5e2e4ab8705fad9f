"""Model zoo, registry and checkpoint loading: exact shapes, standard wiring, clear errors."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffkd.models import Taps, available, create, default_taps, input_size, load_weights
from diffkd.models.weights import file_sha256

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "cifar_zoo_state_dict.json"  # docs/design.md §7

# registry name: (fixture key, parameter count from docs/design.md §6 or None, pre-pool map (C, H, W))
ZOO = {
    "resnet8": ("resnet8", 83_892, (64, 8, 8)),
    "resnet14": ("resnet14", 181_108, (64, 8, 8)),
    "resnet20": ("resnet20", 278_324, (64, 8, 8)),
    "resnet32": ("resnet32", 472_756, (64, 8, 8)),
    "resnet44": ("resnet44", 667_188, (64, 8, 8)),
    "resnet56": ("resnet56", 861_620, (64, 8, 8)),
    "resnet110": ("resnet110", 1_736_564, (64, 8, 8)),
    "resnet8x4": ("resnet8x4", 1_233_540, (256, 8, 8)),
    "resnet32x4": ("resnet32x4", 7_433_860, (256, 8, 8)),
    "wrn_16_1": ("wrn_16_1", 180_916, (64, 8, 8)),
    "wrn_16_2": ("wrn_16_2", 703_284, (128, 8, 8)),
    "wrn_40_1": ("wrn_40_1", 569_780, (64, 8, 8)),
    "wrn_40_2": ("wrn_40_2", 2_255_156, (128, 8, 8)),
    "vgg8_bn": ("vgg8_bn", 3_965_028, (512, 4, 4)),
    "vgg11_bn": ("vgg11_bn", None, (512, 4, 4)),
    "vgg13_bn": ("vgg13_bn", 9_462_180, (512, 4, 4)),
    "vgg16_bn": ("vgg16_bn", None, (512, 4, 4)),
    "vgg19_bn": ("vgg19_bn", None, (512, 4, 4)),
    "mobile_half": ("mobile_half", 812_836, (1280, 2, 2)),
    "ShuffleV1": ("ShuffleV1", 949_258, (960, 4, 4)),
    "ShuffleV2": ("ShuffleV2", 1_355_528, (1024, 4, 4)),
    "resnet18_cifar": ("ResNet18", 11_220_132, (512, 4, 4)),
    "resnet50_cifar": ("ResNet50", 23_705_252, (2048, 4, 4)),
    "mobilenetv1": ("MobileNetV1 (ImageNet, 1000 classes)", 4_231_976, (1024, 7, 7)),
}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@functools.cache
def fixture_models() -> dict[str, dict[str, list[int]]]:
    """Keys and shapes of the published zoo checkpoints."""
    return json.loads(FIXTURE.read_text())["models"]


@functools.cache
def model(name: str) -> nn.Module:
    """A seeded model in eval mode with random BN statistics and affine terms, so BN is not the identity."""
    torch.manual_seed(0)
    net = create(name)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0.0, 0.1)
    return net.eval()


def batch(name: str, n: int = 2) -> torch.Tensor:
    """A seeded random batch at the model's usual input size."""
    return torch.randn(n, *input_size(name), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ZOO)
def test_parameter_count(name: str) -> None:
    key, expected, _ = ZOO[name]
    count = sum(p.numel() for p in model(name).parameters())
    from_fixture = sum(math.prod(s) for k, s in fixture_models()[key].items() if not k.endswith(BUFFERS))
    assert count == from_fixture
    if expected is not None:
        assert count == expected


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_matches_published_checkpoints(name: str) -> None:
    expected = [(k, list(s)) for k, s in fixture_models()[ZOO[name][0]].items()]
    actual = [(k, list(v.shape)) for k, v in model(name).state_dict().items()]
    assert actual == expected


@pytest.mark.parametrize("name", ZOO)
def test_forward_and_default_taps(name: str) -> None:
    net, taps = model(name), default_taps(name)
    captured: dict[str, torch.Tensor] = {}
    modules = dict(net.named_modules())
    hooks = [modules[path].register_forward_hook(lambda _m, _i, out, path=path: captured.__setitem__(path, out))
             for path in (taps.feature, taps.logits)]
    with torch.no_grad():
        logits = net(batch(name))
    for hook in hooks:
        hook.remove()
    num_classes = 1000 if name == "mobilenetv1" else 100
    assert logits.shape == (2, num_classes)
    assert captured[taps.feature].shape == (2, *ZOO[name][2])
    torch.testing.assert_close(captured[taps.logits], logits)
    # the tapped map is exactly what gets pooled: classifier(global mean of it) reproduces the logits
    with torch.no_grad():
        pooled = modules[taps.logits](captured[taps.feature].mean((2, 3)))
    torch.testing.assert_close(pooled, logits, rtol=1e-4, atol=1e-4)


# --- independent functional recomputations from the state dict (eval-mode BN) ---


def bn(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{key}.running_mean"], sd[f"{key}.running_var"], sd[f"{key}.weight"],
                        sd[f"{key}.bias"], training=False, eps=1e-5)


def conv(x: torch.Tensor, sd: dict, key: str, stride: int = 1) -> torch.Tensor:
    """'Same'-padded conv; the group count follows from the weight shape."""
    weight = sd[f"{key}.weight"]
    groups = x.shape[1] // weight.shape[1]
    return F.conv2d(x, weight, sd.get(f"{key}.bias"), stride, weight.shape[-1] // 2, 1, groups)


def linear(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    return F.linear(x.mean((2, 3)), sd[f"{key}.weight"], sd[f"{key}.bias"])


def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle by index: output channel j * groups + i comes from input channel i * (C / groups) + j."""
    channels = x.shape[1]
    return x[:, torch.arange(channels).view(groups, channels // groups).t().reshape(-1)]


def ref_cifar_resnet(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(bn(conv(x, sd, "conv1"), sd, "bn1"))
    for stage in (1, 2, 3):
        index = 0
        while f"layer{stage}.{index}.conv1.weight" in sd:
            p, stride = f"layer{stage}.{index}", 2 if stage > 1 and index == 0 else 1
            out = F.relu(bn(conv(x, sd, f"{p}.conv1", stride), sd, f"{p}.bn1"))
            out = bn(conv(out, sd, f"{p}.conv2"), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = bn(conv(x, sd, f"{p}.downsample.0", stride), sd, f"{p}.downsample.1")
            x = F.relu(out + x)
            index += 1
    return linear(x, sd, "fc")


def ref_wrn(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = conv(x, sd, "conv1")
    for stage, first_stride in ((1, 1), (2, 2), (3, 2)):
        index = 0
        while f"block{stage}.layer.{index}.conv1.weight" in sd:
            p, stride = f"block{stage}.layer.{index}", first_stride if index == 0 else 1
            activated = F.relu(bn(x, sd, f"{p}.bn1"))
            out = F.relu(bn(conv(activated, sd, f"{p}.conv1", stride), sd, f"{p}.bn2"))
            out = conv(out, sd, f"{p}.conv2")
            shortcut = conv(activated, sd, f"{p}.convShortcut", stride) if f"{p}.convShortcut.weight" in sd else x
            x = out + shortcut
            index += 1
    return linear(F.relu(bn(x, sd, "bn1")), sd, "fc")


def ref_vgg8(sd: dict, x: torch.Tensor) -> torch.Tensor:
    for block in range(5):
        x = F.relu(bn(conv(x, sd, f"block{block}.0"), sd, f"block{block}.1"))
        if block < 3:
            x = F.max_pool2d(x, 2)
    return linear(x, sd, "classifier")


def ref_mobile_half(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(bn(conv(x, sd, "conv1.0", 2), sd, "conv1.1"))
    for stage, first_stride in enumerate((1, 1, 2, 2, 1, 2, 1)):
        index = 0
        while f"blocks.{stage}.{index}.conv.0.weight" in sd:
            p, stride = f"blocks.{stage}.{index}.conv", first_stride if index == 0 else 1
            out = F.relu(bn(conv(x, sd, f"{p}.0"), sd, f"{p}.1"))
            out = F.relu(bn(conv(out, sd, f"{p}.3", stride), sd, f"{p}.4"))
            out = bn(conv(out, sd, f"{p}.6"), sd, f"{p}.7")
            x = x + out if out.shape == x.shape else out
            index += 1
    return linear(F.relu(bn(conv(x, sd, "conv2.0"), sd, "conv2.1")), sd, "classifier.0")


def ref_shufflev1(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(bn(conv(x, sd, "conv1"), sd, "bn1"))
    for stage in (1, 2, 3):
        index = 0
        while f"layer{stage}.{index}.conv1.weight" in sd:
            p, stride = f"layer{stage}.{index}", 2 if index == 0 else 1
            out = F.relu(bn(conv(x, sd, f"{p}.conv1"), sd, f"{p}.bn1"))
            out = shuffle(out, x.shape[1] // sd[f"{p}.conv1.weight"].shape[1])
            out = F.relu(bn(conv(out, sd, f"{p}.conv2", stride), sd, f"{p}.bn2"))
            out = bn(conv(out, sd, f"{p}.conv3"), sd, f"{p}.bn3")
            x = F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if stride == 2 else out + x)
            index += 1
    return linear(x, sd, "linear")


def ref_shufflev2(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(bn(conv(x, sd, "conv1"), sd, "bn1"))
    for stage in (1, 2, 3):
        p = f"layer{stage}.0"
        left = bn(conv(x, sd, f"{p}.conv1", 2), sd, f"{p}.bn1")
        left = F.relu(bn(conv(left, sd, f"{p}.conv2"), sd, f"{p}.bn2"))
        right = F.relu(bn(conv(x, sd, f"{p}.conv3"), sd, f"{p}.bn3"))
        right = bn(conv(right, sd, f"{p}.conv4", 2), sd, f"{p}.bn4")
        right = F.relu(bn(conv(right, sd, f"{p}.conv5"), sd, f"{p}.bn5"))
        x = shuffle(torch.cat([left, right], 1), 2)
        index = 1
        while f"layer{stage}.{index}.conv1.weight" in sd:
            p, half = f"layer{stage}.{index}", x.shape[1] // 2
            kept, branch = x[:, :half], x[:, half:]
            branch = F.relu(bn(conv(branch, sd, f"{p}.conv1"), sd, f"{p}.bn1"))
            branch = bn(conv(branch, sd, f"{p}.conv2"), sd, f"{p}.bn2")
            branch = F.relu(bn(conv(branch, sd, f"{p}.conv3"), sd, f"{p}.bn3"))
            x = shuffle(torch.cat([kept, branch], 1), 2)
            index += 1
    return linear(F.relu(bn(conv(x, sd, "conv2"), sd, "bn2")), sd, "linear")


def ref_resnet50_cifar(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(bn(conv(x, sd, "conv1"), sd, "bn1"))
    for stage in (1, 2, 3, 4):
        index = 0
        while f"layer{stage}.{index}.conv1.weight" in sd:
            p, stride = f"layer{stage}.{index}", 2 if stage > 1 and index == 0 else 1
            out = F.relu(bn(conv(x, sd, f"{p}.conv1"), sd, f"{p}.bn1"))
            out = F.relu(bn(conv(out, sd, f"{p}.conv2", stride), sd, f"{p}.bn2"))
            out = bn(conv(out, sd, f"{p}.conv3"), sd, f"{p}.bn3")
            if f"{p}.shortcut.0.weight" in sd:
                x = bn(conv(x, sd, f"{p}.shortcut.0", stride), sd, f"{p}.shortcut.1")
            x = F.relu(out + x)
            index += 1
    return linear(x, sd, "linear")


def ref_mobilenetv1(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(bn(conv(x, sd, "model.0.0", 2), sd, "model.0.1"))
    for block, stride in enumerate((1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1), start=1):
        x = F.relu(bn(conv(x, sd, f"model.{block}.0", stride), sd, f"model.{block}.1"))
        x = F.relu(bn(conv(x, sd, f"model.{block}.3"), sd, f"model.{block}.4"))
    return linear(x, sd, "fc")


REFERENCES = {
    "resnet20": ref_cifar_resnet,
    "resnet8x4": ref_cifar_resnet,
    "wrn_16_2": ref_wrn,
    "wrn_40_1": ref_wrn,
    "vgg8_bn": ref_vgg8,
    "mobile_half": ref_mobile_half,
    "ShuffleV1": ref_shufflev1,
    "ShuffleV2": ref_shufflev2,
    "resnet50_cifar": ref_resnet50_cifar,
    "mobilenetv1": ref_mobilenetv1,
}


@pytest.mark.parametrize("name", REFERENCES)
def test_forward_matches_functional_reference(name: str) -> None:
    net, x = model(name), batch(name, n=1)
    with torch.no_grad():
        out = net(x)
        expected = REFERENCES[name](net.state_dict(), x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_vgg_adds_a_pool_for_64px_inputs() -> None:
    with torch.no_grad():
        assert model("vgg8_bn")(torch.randn(1, 3, 64, 64)).shape == (1, 100)


# --- Fashion-MNIST demo models ---


@pytest.mark.parametrize(
    ("name", "channels", "max_macs"), [("fmnist_teacher", 256, 25e6), ("fmnist_student", 32, 1e6)]
)
def test_fmnist_models_shapes_and_cost(name: str, channels: int, max_macs: float) -> None:
    net, taps = create(name).eval(), default_taps(name)
    assert input_size(name) == (1, 28, 28)
    features: list[torch.Tensor] = []
    net.get_submodule(taps.feature).register_forward_hook(lambda _m, _i, out: features.append(out))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        logits = net(torch.randn(1, 1, 28, 28))
    assert logits.shape == (1, 10)
    assert features[0].shape == (1, channels, 7, 7)
    assert taps.logits == "fc"
    assert counter.get_total_flops() / 2 <= max_macs


# --- registry ---


@pytest.mark.integration
def test_every_name_has_taps_that_exist_and_an_input_size() -> None:
    for name in available():
        with torch.device("meta"):
            net = create(name)
        taps = default_taps(name)
        assert isinstance(taps, Taps)
        names = dict(net.named_modules())
        assert taps.feature in names and taps.logits in names, name
        assert len(input_size(name)) == 3


def test_aliases_and_unambiguous_resnets() -> None:
    with torch.device("meta"):
        assert type(create("ResNet50")) is type(create("resnet50_cifar"))
        assert type(create("resnet50")).__module__.startswith("torchvision")
        assert type(create("vgg8")) is type(create("vgg8_bn"))
    assert default_taps("ResNet18") == Taps("layer4", "linear")
    assert default_taps("resnet18") == Taps("layer4", "fc")
    assert input_size("resnet18") == (3, 224, 224)
    assert input_size("shufflenetv2") == (3, 32, 32)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_taps_are_the_pre_pool_map(name: str) -> None:
    torch.manual_seed(0)
    net, taps = create(name, num_classes=10).eval(), default_taps(name)
    features: list[torch.Tensor] = []
    net.get_submodule(taps.feature).register_forward_hook(lambda _m, _i, out: features.append(out))
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 32, 32))
        pooled = net.get_submodule(taps.logits)(features[0].mean((2, 3)))
    assert logits.shape == (2, 10)
    torch.testing.assert_close(pooled, logits, rtol=1e-4, atol=1e-5)


def test_torchvision_pretrained_gets_a_new_head(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision
    real = torchvision.models.get_model
    requested: list[object] = []

    def offline(arch: str, weights: object = None, **kwargs: object) -> nn.Module:
        requested.append(weights)
        return real(arch, weights=None, **kwargs)  # no download in tests

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    net = create("mobilenet_v2", num_classes=10, pretrained=True)
    assert requested == ["DEFAULT"]
    assert net.classifier[1].out_features == 10


def test_num_classes_and_pretrained_zoo_error() -> None:
    with torch.no_grad():
        assert create("resnet8", num_classes=10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="load_weights"):
        create("resnet56", pretrained=True)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"resnet56.*available\(\)"):
        create("resnet57")
    with pytest.raises(ValueError, match="shufflenetv2"):
        default_taps("Shufflenet_v2")


def test_timm_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(ImportError, match="pip install timm"):
        create("timm:resnet18")
    with pytest.raises(ImportError, match="pip install timm"):
        default_taps("timm:resnet18")


def test_timm_default_taps() -> None:
    assert default_taps("timm:resnet18") == Taps("layer4", "fc")
    assert input_size("timm:resnet18") == (3, 224, 224)
    net = create("timm:resnet18", num_classes=10).eval()
    features: list[torch.Tensor] = []
    net.get_submodule("layer4").register_forward_hook(lambda _m, _i, out: features.append(out))
    with torch.no_grad():
        logits = net(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(net.fc(features[0].mean((2, 3))), logits, rtol=1e-4, atol=1e-5)


# --- checkpoint loading ---


def test_load_weights_round_trip(tmp_path: Path) -> None:
    source = model("resnet8")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict(), "epoch": 240, "best_acc": torch.tensor(70.0)}, path)
    target = create("resnet8")
    load_weights(target, path, sha256=file_sha256(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_load_weights_state_dict_key_and_ddp_prefix(tmp_path: Path) -> None:
    source = model("wrn_16_1")
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = create("wrn_16_1")
    load_weights(target, path)
    torch.testing.assert_close(target.fc.weight, source.fc.weight)


def test_load_weights_errors(tmp_path: Path) -> None:
    path = tmp_path / "resnet8.pth"
    torch.save(model("resnet8").state_dict(), path)
    actual = file_sha256(path)
    with pytest.raises(ValueError, match=f"expected {'0' * 64}, got {actual}"):
        load_weights(create("resnet8"), path, sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_weights(create("resnet8"), tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="cannot read checkpoint .*: not a torch checkpoint"):
        load_weights(create("resnet8"), corrupt)
    with pytest.raises(ValueError, match=r"missing layer1\.1\.conv1\.weight"):
        load_weights(create("resnet14"), path)
    with pytest.raises(ValueError, match=r"fc\.weight \(100, 64\) vs \(10, 64\)"):
        load_weights(create("resnet8", num_classes=10), path)
