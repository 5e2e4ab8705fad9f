"""Per-epoch averages of the loss terms and method stats, kept on the device and combined over processes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .learner import StepOutput


class LossMeter:
    """Sample-weighted means of the total loss and of every term, and per-step means of method stats.

    Sums stay on the device (no host sync per step); `summary` sums them over processes once.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # value x batch size per column, then the sample count
        self.stats: dict[str, torch.Tensor] = {}
        self.steps = 0

    def update(self, out: StepOutput, n: int) -> None:
        """Add one step's losses (a batch of n samples) and stats."""
        self.names = ["train_loss", *(f"loss_{k}" for k in out.terms)]
        values = [out.total.detach(), *(t.detach().reshape(()) for t in out.terms.values())]
        row = torch.stack(values).double() * n
        row = torch.cat([row, row.new_tensor([n])])
        self.sums = row if self.sums is None else self.sums + row
        for key, value in out.stats.items():
            value = torch.as_tensor(value.detach() if torch.is_tensor(value) else value, dtype=torch.float64)
            self.stats[key] = self.stats.get(key, 0) + value.to(row.device).mean()
        self.steps += 1

    def running_loss(self) -> tuple[float, int]:
        """(mean total loss, samples) so far in this process, for the progress bar."""
        values = self.sums.tolist() if self.sums is not None else [float("nan"), 0]
        return values[0] / max(values[-1], 1), int(values[-1])

    def summary(self, reduce: Callable[[torch.Tensor], torch.Tensor], world_size: int) -> tuple[dict, dict, int]:
        """(mean losses by column, mean stats, samples) over every process."""
        if self.sums is None:
            return {}, {}, 0
        totals = reduce(self.sums).tolist()
        losses = {name: total / totals[-1] for name, total in zip(self.names, totals[:-1])}
        stats = {}
        if self.stats:
            means = reduce(torch.stack(list(self.stats.values())) / self.steps) / world_size
            stats = dict(zip(self.stats, means.tolist()))
        return losses, stats, int(totals[-1])
