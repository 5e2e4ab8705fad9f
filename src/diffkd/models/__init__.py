"""Models: the CIFAR-100 distillation zoo, ImageNet MobileNetV1, Fashion-MNIST demo nets, and one registry.

`create(name)` builds any of them (and torchvision / `timm:<name>` models), `default_taps(name)` says
where the pre-pool feature map and the logits are, `load_weights` loads checkpoints safely.
"""

from .registry import Taps, available, create, default_taps, input_size
from .weights import load_weights

__all__ = ["Taps", "available", "create", "default_taps", "input_size", "load_weights"]
