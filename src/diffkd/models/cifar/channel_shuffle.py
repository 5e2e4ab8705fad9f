"""Channel shuffle (Zhang et al., 2018): interleave channel groups so grouped convs see all groups."""

import torch


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Reorder channels from group-major to group-minor: (N, g*c, H, W) viewed as (g, c) -> (c, g)."""
    n, channels, h, w = x.shape
    return x.reshape(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)
