"""Distil your own LightningModule with diffkd's DistillationModule.

    python examples/lightning_module.py                           # one process
    torchrun --nproc_per_node=2 examples/lightning_module.py --tiny   # Lightning's DDP strategy (gloo on CPU)

`LitClassifier` is what a Lightning user already has: a forward, an optimizer over
`self.parameters()` and a validation step that logs. A wider CNN teacher is trained with it first;
then `DistillationModule` wraps a smaller `LitClassifier` and adds two levels, DiffKD on the probed
`@feature` maps and KD on `@logits`. The method modules are in the optimizer (and its scheduler)
and in the checkpoints; each term is logged with `self.log`; the student is exported alone and
loaded back into a plain `LitClassifier`. The synthetic task is which quadrant of the image is
bright (4 classes). --tiny: a few steps (the test runs it).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diffkd import Level
from diffkd.integrations.lightning import DistillationModule

CLASSES, SIZE = 4, 16


def quadrants(n: int, seed: int) -> TensorDataset:
    """Noise images whose bright quadrant is the label."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.5 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    half = SIZE // 2
    for i, label in enumerate(y.tolist()):
        row, col = divmod(label, 2)
        x[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.0
    return TensorDataset(x, y)


class LitClassifier(L.LightningModule):
    """A user's LightningModule: a small CNN classifier."""

    def __init__(self, width: int, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean() * 100, sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 100)}


def fit(module: L.LightningModule, train: TensorDataset, test: TensorDataset, epochs: int,
        root: Path) -> tuple[float, dict[str, float]]:
    """Train, then the test accuracy (%) and the last logged values."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=epochs,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, default_root_dir=root)
    trainer.fit(module, DataLoader(train, batch_size=32, shuffle=True), DataLoader(test, batch_size=128))
    return float(trainer.callback_metrics["val_acc"]), {k: float(v) for k, v in trainer.callback_metrics.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps")
    parser.add_argument("--out", help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    items, epochs = (128, 1) if args.tiny else (2048, 3)
    train, test = quadrants(items, seed=0), quadrants(items // 4, seed=1)
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)
        teacher = LitClassifier(width=32)
        teacher_accuracy, _ = fit(teacher, train, test, epochs, out)

        module = DistillationModule(
            LitClassifier(width=8), teacher.eval().requires_grad_(False),
            [Level("@feature", "@feature", "diffkd", latent_channels=16, name="maps"),
             Level("@logits", "@logits", "kd", tau=1.0, name="logits")],
            input_shape=(3, SIZE, SIZE))  # the task loss: LitClassifier's own training_step
        print("student taps:", {k: t.path for k, t in module.distiller.student_taps.taps.items()})
        student_accuracy, logged = fit(module, train, test, epochs, out)
        print("logged:", {k: round(v, 4) for k, v in logged.items() if k.endswith("_epoch")})

        if module.global_rank != 0:  # one process writes and checks the export
            return {"teacher": teacher_accuracy, "student": student_accuracy, **logged}
        path = module.export_student(out / "student.pt")  # the student's weights alone
        plain = LitClassifier(width=8)
        plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
        plain.eval()
        x, y = test.tensors
        with torch.no_grad():
            reloaded_accuracy = float((plain(x).argmax(1) == y).float().mean() * 100)
    print(f"test accuracy: teacher {teacher_accuracy:.1f}%, distilled student {student_accuracy:.1f}% "
          f"(exported and reloaded: {reloaded_accuracy:.1f}%)")
    return {"teacher": teacher_accuracy, "student": student_accuracy, "reloaded": reloaded_accuracy, **logged}


if __name__ == "__main__":
    main()
