"""train.channels_last: the trained module's 4-D weights and every 4-D input batch in the channels-last memory format.

Only the memory layout (strides) changes, never a shape: convolutions on GPUs (and under bf16/fp16
autocast) often run faster on NHWC data. Inputs that are not one 4-D tensor (detection's lists of
images) are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def module_to_channels_last(module: nn.Module) -> None:
    """Re-lay every 4-D parameter and buffer of module (and of a Distiller's teacher, which follows `.to`)."""
    module.to(memory_format=torch.channels_last)


def inputs_to_channels_last(inputs: Any) -> Any:
    """A 4-D tensor batch in channels-last; anything else unchanged."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs
