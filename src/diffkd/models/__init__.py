"""Models: the CIFAR-100 distillation zoo, ImageNet MobileNetV1, Fashion-MNIST demo nets, and one registry.

`create(name)` builds any of them (and torchvision, `timm:<name>`, `hf:<folder>` and the user's own
`package.module:callable` models), `default_taps(name)` says where a registered model's pre-pool
feature map and logits are, `find_taps(model, example_input)` finds them for any model by probing,
`load_weights` loads checkpoints safely.
"""

from .imports import ModelNameError
from .probe import Probe, ProbeError, Taps, find_taps, probe_model
from .registry import available, create, default_taps, input_size, is_registered
from .weights import load_weights

__all__ = [
    "ModelNameError", "Probe", "ProbeError", "Taps", "available", "create", "default_taps", "find_taps", "input_size",
    "is_registered", "load_weights", "probe_model",
]
