"""A 1-D model on sequences: Conv1d teacher and student on synthetic signals, distilled with DiffKD.

    python examples/sequences_1d.py

The signals stand in for audio, ECG or sensor data: each class is a sine of its own frequency, with
a random phase and noise, as (B, 2, L) tensors (two channels). The probe finds each net's (B, C, L)
feature before the pooling over time ("@feature", layout "sequence"), and DiffKD denoises it with 1-D
convolutions along L. --tiny trains for a few steps (the test does).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from diffkd import Distiller, Level
from diffkd.models import find_taps


def signals(n: int, classes: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy two-channel sines; the class sets the frequency, channel 2 is the channel 1 shifted by 90 degrees."""
    labels = torch.randint(0, classes, (n,), generator=generator)
    t = torch.arange(length) / length
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    angle = 2 * math.pi * (2 + 2 * labels[:, None]) * t + phase
    clean = torch.stack([angle.sin(), angle.cos()], dim=1)
    return clean + 0.5 * torch.randn(clean.shape, generator=generator), labels


class SignalNet(nn.Module):
    """Conv1d-BN-ReLU stages (`encoder`, (B, C, L)), average over time, linear classifier (`fc`)."""

    def __init__(self, width: int, depth: int, classes: int) -> None:
        super().__init__()
        layers, channels = [], 2
        for i in range(depth):
            layers += [nn.Conv1d(channels, width, 5, stride=2 if i else 1, padding=2), nn.BatchNorm1d(width), nn.ReLU()]
            channels = width
        self.encoder = nn.Sequential(*layers)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x).mean(dim=-1))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps on short signals")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    classes, length, steps, batch = (4, 64, 3, 16) if args.tiny else (4, 256, 300, 64)
    test_x, test_y = signals(512, classes, length, g)

    # 1. A teacher, trained on the task alone (in practice: your trained model).
    teacher = SignalNet(width=64, depth=4, classes=classes)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for _ in range(steps):
        x, y = signals(batch, classes, length, g)
        teacher.train()
        loss = F.cross_entropy(teacher(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # 2. The taps the probe finds: the Conv1d encoder's (B, C, L) output, read as a sequence, and the logits.
    student = SignalNet(width=16, depth=3, classes=classes)
    print("teacher taps:", find_taps(teacher, input_shape=(2, length)))
    print("student taps:", find_taps(student, input_shape=(2, length)))

    # 3. Distil: DiffKD on the sequences (1-D convolutions along L; the student's shorter L is resampled
    #    to the teacher's), KD on the logits, plus the student's own task loss.
    distiller = Distiller(teacher, student, [
        Level("@feature", "@feature", "diffkd", latent_channels=32, name="sequence"),
        Level("@logits", "@logits", "kd", tau=4.0, name="logits"),
    ], input_shape=(2, length))
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
    for step in range(steps):
        x, y = signals(batch, classes, length, g)
        distiller.train()
        out = distiller(x, y)
        loss = F.cross_entropy(out.student, y) + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 5) == 0:
            print(f"step {step}: loss {loss.item():.3f}, gamma {out.stats['sequence/gamma'].mean().item():.2f}")

    result = {"teacher": accuracy(teacher, test_x, test_y), "student": accuracy(student, test_x, test_y)}
    print(f"test accuracy: teacher {result['teacher']:.1f}%, distilled student {result['student']:.1f}%")
    return result


if __name__ == "__main__":
    main()
