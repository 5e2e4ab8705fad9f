"""The standard CIFAR-100 distillation model zoo, with the module names of its published checkpoints."""

from .mobilenetv2 import MobileNetV2, mobile_half
from .resnet import (
    CifarResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from .resnet_imagenet_style import CifarImageNetResNet, resnet18_cifar, resnet50_cifar
from .shufflenetv1 import ShuffleNetV1, ShuffleV1
from .shufflenetv2 import ShuffleNetV2, ShuffleV2
from .vgg import VGG, vgg8_bn, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn
from .wrn import WideResNet, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "VGG",
    "CifarImageNetResNet",
    "CifarResNet",
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "ShuffleV1",
    "ShuffleV2",
    "WideResNet",
    "mobile_half",
    "resnet8",
    "resnet8x4",
    "resnet14",
    "resnet18_cifar",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet44",
    "resnet50_cifar",
    "resnet56",
    "resnet110",
    "vgg8_bn",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]
