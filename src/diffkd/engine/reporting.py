"""Run outputs on the main process: epoch lines, metrics.csv, TensorBoard events, curves.png, the progress bar."""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..atomic import write_atomic

log = logging.getLogger("diffkd")


def progress_bar(iterable: Iterable, *, total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar on stderr, shown only when enabled and stderr is a terminal."""
    return tqdm(
        iterable, total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False, dynamic_ncols=True
    )


def _fmt(value: Any) -> str:
    """A metric for the epoch line: short floats, integers as they are."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Reporter:
    """Writes what a run reports; a disabled Reporter (ranks other than 0) writes nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, main_metric: str) -> None:
        self.run_dir, self.enabled, self.main_metric = run_dir, enabled, main_metric
        self.writer = self._open_tensorboard() if enabled and tensorboard else None

    def _open_tensorboard(self) -> Any:
        """A SummaryWriter in run_dir/tensorboard, or None (with one warning) if tensorboard is unusable."""
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        except Exception as err:  # ImportError, or a broken tensorboard/protobuf install
            warnings.warn(
                f"TensorBoard disabled ({type(err).__name__}: {err}); metrics.csv is still written", stacklevel=2
            )
            return None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Per-iteration scalars (TensorBoard only)."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def epoch(self, history: list[dict[str, Any]], epochs: int) -> None:
        """Log the latest epoch, rewrite metrics.csv from the whole history, add its TensorBoard scalars."""
        if not self.enabled:
            return
        record = history[-1]
        shown = {k: v for k, v in record.items() if k != "epoch"}
        log.info("epoch %d/%d  %s", record["epoch"], epochs, "  ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
        write_atomic(self._csv(history).encode(), self.run_dir / "metrics.csv")
        if self.writer is not None:
            for key, value in shown.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{key}", value, record["epoch"])
            self.writer.flush()

    @staticmethod
    def _csv(history: list[dict[str, Any]]) -> str:
        """metrics.csv text: one row per epoch, columns in first-seen order."""
        columns: list[str] = []
        for record in history:
            columns += [k for k in record if k not in columns]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        return out.getvalue()

    def finish(self, history: list[dict[str, Any]]) -> None:
        """Draw curves.png (losses; train/test metrics) and close TensorBoard."""
        if not self.enabled:
            return
        if history:
            self._plot(history)
        if self.writer is not None:
            self.writer.close()

    def _plot(self, history: list[dict[str, Any]]) -> None:
        """Two panels against the epoch: every loss column, and the task's main metric on train and test."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        epochs = [r["epoch"] for r in history]
        keys = [k for k in history[-1] if isinstance(history[-1][k], (int, float)) and k != "epoch"]
        panels = {
            "loss": [k for k in keys if "loss" in k],
            f"{self.main_metric} (%)": [
                k for k in keys if k in (f"train_{self.main_metric}", f"test_{self.main_metric}")
            ],
        }
        figure = Figure(figsize=(11, 4), tight_layout=True)
        FigureCanvasAgg(figure)
        for i, (label, columns) in enumerate(panels.items()):
            axes = figure.add_subplot(1, 2, i + 1)
            for key in columns:
                values = [r.get(key, math.nan) for r in history]
                axes.plot(epochs, values, marker="o", label=key)
            axes.set_xlabel("epoch")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_ylabel(label)
            if columns:
                axes.legend(fontsize="small")
            axes.grid(alpha=0.3)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        write_atomic(buffer.getvalue(), self.run_dir / "curves.png")
