"""Dilated backbones for segmentation: ResNets and MobileNetV2 at output stride 8 (or 16, 32).

Dilation replaces the stride of the last stages, so the map stays at 1/8 of the input while each
3x3 conv keeps its receptive field. The ResNets are written here because torchvision's BasicBlock
refuses dilation (ResNet-18/34 could not be dilated otherwise); their parameter names follow
torchvision's, so ImageNet weights load into them. The rule for a dilated stage: its first 3x3 conv
keeps the previous stage's dilation, every later 3x3 conv uses the stage's own.

Every backbone returns {"aux": stride-8 map of the second-to-last stage, "out": last map} and
says its channel counts in `aux_channels` / `out_channels`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Stage dilations for each output stride; stages 1 and 2 always keep their strides.
DILATIONS = {8: (1, 1, 2, 4), 16: (1, 1, 1, 2), 32: (1, 1, 1, 1)}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _stage_dilations(output_stride: int) -> tuple[int, ...]:
    if output_stride not in DILATIONS:
        raise ValueError(f"output_stride must be one of {sorted(DILATIONS)}, got {output_stride}")
    return DILATIONS[output_stride]


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; `first` is the dilation of conv1, `rest` of conv2."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, first: int, rest: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, first)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, rest)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride and dilation `first`), 1x1 expand x4, residual (torchvision's V1.5)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, first: int, rest: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, first)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


RESNET_LAYOUTS: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class DilatedResNet(nn.Module):
    """A ResNet whose last stages dilate instead of striding; `width_mult` scales every channel count."""

    def __init__(self, depth: int, in_channels: int = 3, width_mult: float = 1.0, output_stride: int = 8):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        block, counts = RESNET_LAYOUTS[depth]
        widths = [max(1, round(64 * width_mult * 2**i)) for i in range(4)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.cin, previous = widths[0], 1
        stages = []
        for i, (planes, blocks, dilation) in enumerate(zip(widths, counts, _stage_dilations(output_stride))):
            stride = 1 if i == 0 or dilation > 1 else 2
            stages.append(self._stage(block, planes, blocks, stride, previous, dilation))
            previous = dilation
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.aux_channels = widths[2] * block.expansion
        self.out_channels = widths[3] * block.expansion
        self._init_weights()

    def _stage(self, block: type[nn.Module], planes: int, blocks: int, stride: int, previous: int, dilation: int) -> nn.Sequential:
        """One stage: the first block may stride and change width; its first 3x3 keeps `previous` dilation."""
        cout = planes * block.expansion
        downsample = None
        if stride != 1 or self.cin != cout:
            downsample = nn.Sequential(nn.Conv2d(self.cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        layers = [block(self.cin, planes, stride, previous, dilation, downsample)]
        self.cin = cout
        layers += [block(cout, planes, 1, dilation, dilation, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """He-normal convs (fan out) and unit BatchNorm, as torchvision initialises its ResNets."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        aux = self.layer3(self.layer2(self.layer1(x)))
        return {"aux": aux, "out": self.layer4(aux)}


class DilatedMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 features without the final 1x1 conv, its last two stride-2 stages dilated.

    "aux" is the output of block 13 (the last block at stride 16 of the plain net, 96 channels at
    width 1), "out" of block 17 (320 channels).
    """

    AUX_BLOCK, LAST_BLOCK = 13, 17
    STRIDED_BLOCKS = (7, 14)  # the blocks that stride down to 1/16 and 1/32 in the plain net

    def __init__(self, in_channels: int = 3, width_mult: float = 1.0, output_stride: int = 8):
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2(weights=None, width_mult=width_mult)
        self.features = nn.Sequential(*list(net.features)[: self.LAST_BLOCK + 1])
        if in_channels != 3:
            stem = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=2, padding=1, bias=False)
            nn.init.kaiming_normal_(self.features[0][0].weight, mode="fan_out")
        dilations = _stage_dilations(output_stride)[2:]
        previous = 1
        for start, end, dilation in zip(self.STRIDED_BLOCKS, (self.STRIDED_BLOCKS[1], self.LAST_BLOCK + 1), dilations):
            if dilation > 1:
                _dilate(self.features[start:end], previous, dilation)
            previous = dilation
        self.aux_channels = _out_channels(self.features[self.AUX_BLOCK])
        self.out_channels = _out_channels(self.features[self.LAST_BLOCK])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs = {}
        for i, block in enumerate(self.features):
            x = block(x)
            if i == self.AUX_BLOCK:
                outputs["aux"] = x
        outputs["out"] = x
        return outputs


def _dilate(blocks: nn.Module, first: int, dilation: int) -> None:
    """Turn strided 3x3 convs into dilated ones: the first gets dilation `first`, the rest `dilation`."""
    convs = [m for m in blocks.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    for i, conv in enumerate(convs):
        d = first if i == 0 else dilation
        conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)


def _out_channels(block: nn.Module) -> int:
    """Channel count a block produces: that of its last conv."""
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def load_imagenet_weights(backbone: nn.Module, arch: str) -> None:
    """Load torchvision's ImageNet weights of `arch` (downloaded on first use) into a width-1, 3-channel backbone."""
    from torchvision.models import get_model_weights

    state = get_model_weights(arch).DEFAULT.get_state_dict(progress=True)
    own = backbone.state_dict()
    kept = {k: v for k, v in state.items() if k in own}
    mismatched = [k for k, v in kept.items() if v.shape != own[k].shape]
    missing = sorted(set(own) - set(kept))
    if mismatched or missing:
        raise ValueError(
            f"ImageNet weights of {arch} do not fit this backbone (they need width_mult=1 and 3 input channels): "
            f"shape mismatches {mismatched[:3]}, missing {missing[:3]}"
        )
    backbone.load_state_dict(kept, strict=True)


@torch.no_grad()
def measure_output_stride(backbone: nn.Module, size: int = 64) -> int:
    """The measured ratio input size / "out" map size (for checks and tests)."""
    was_training = backbone.training
    backbone.eval()
    channels = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d)).in_channels
    out = backbone(torch.zeros(1, channels, size, size))["out"]
    backbone.train(was_training)
    return size // out.shape[-1]
