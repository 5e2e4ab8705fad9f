"""Step time of the Hugging Face and Lightning adapters against a plain Distiller loop with the same models.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/integration_overhead.py [--steps 60]

Interleaved: after each step of the framework's own loop (a callback at the step's end), one step of
a hand-written loop (next batch, Distiller forward, task loss, backward, optimizer step) on copies of
the same models, so load drift on a shared machine hits both alike. The adapter's step is the time
from the end of that plain step to the end of the framework's next step: data loading, the framework's
bookkeeping, forward, backward and optimizer step. Medians over the measured steps; the ratio is
adapter / plain. Gradient clipping is off in both (a Trainer default that the plain loop lacks).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffkd import Distiller, Level

CLASSES, BATCH, ITEMS = 10, 32, 4096


class Timer:
    """Alternates: the framework's step (measured from the last hand-back), then one plain step."""

    def __init__(self, plain_step: Callable[[], None], warmup: int):
        self.plain_step, self.warmup = plain_step, warmup
        self.adapter: list[float] = []
        self.plain: list[float] = []
        self.mark = time.perf_counter()

    def step_end(self) -> None:
        adapter = time.perf_counter() - self.mark
        start = time.perf_counter()
        self.plain_step()
        plain = time.perf_counter() - start
        if self.warmup > 0:
            self.warmup -= 1
        else:
            self.adapter.append(adapter * 1000)
            self.plain.append(plain * 1000)
        self.mark = time.perf_counter()

    def row(self, name: str) -> str:
        a, p = statistics.median(self.adapter), statistics.median(self.plain)
        return f"| {name} | {len(self.adapter)} | {p:.1f} | {a:.1f} | {a / p:.3f} |"


def plain_loop(teacher: nn.Module, student: nn.Module, levels: list[Level], example: object, teacher_example: object,
               batches: Callable[[], object], call: Callable[[Distiller, object], torch.Tensor]) -> Callable[[], None]:
    """One step of the hand-written loop on its own Distiller and AdamW."""
    distiller = Distiller(teacher, student, levels, example_input=example, teacher_example_input=teacher_example)
    optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-4)
    distiller.train()

    def step() -> None:
        loss = call(distiller, batches())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def images(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ITEMS, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (ITEMS,), generator=g)


def cycle(loader: torch.utils.data.DataLoader) -> Callable[[], object]:
    iterator = iter(loader)

    def next_batch() -> object:
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(loader)
            return next(iterator)

    return next_batch


def hugging_face(steps: int, warmup: int, scratch: str) -> str:
    import transformers

    from diffkd.integrations.transformers import DistillationTrainer

    def vit(layers: int, width: int) -> transformers.ViTForImageClassification:
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=32, patch_size=4, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=2 * width, num_labels=CLASSES))

    class Items(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = images(0)

        def __len__(self) -> int:
            return ITEMS

        def __getitem__(self, i: int) -> dict:
            return {"pixel_values": self.x[i], "labels": self.y[i]}

    torch.manual_seed(0)
    teacher, student = vit(4, 128).eval().requires_grad_(False), vit(2, 64)
    levels = [Level("@feature", "@feature", "diffkd", latent_channels=64, name="tokens"),
              Level("@logits", "@logits", "kd", tau=1.0, name="logits")]
    data = Items()
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
    example = {"pixel_values": data.x[:2]}

    def call(distiller: Distiller, batch: dict) -> torch.Tensor:
        out = distiller(batch, batch["labels"], teacher_inputs={"pixel_values": batch["pixel_values"]})
        return out.student.loss + out.loss

    timer = Timer(plain_loop(copy.deepcopy(teacher), copy.deepcopy(student), levels, example, example, cycle(loader), call),
                  warmup)

    class Tick(transformers.TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            timer.step_end()

    args = transformers.TrainingArguments(output_dir=scratch, max_steps=steps + warmup, per_device_train_batch_size=BATCH,
                                          learning_rate=1e-4, max_grad_norm=0.0, logging_steps=50, save_strategy="no",
                                          report_to=[], disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False)
    trainer = DistillationTrainer(model=student, teacher=teacher, levels=levels, args=args, train_dataset=data,
                                  callbacks=[Tick()])
    timer.mark = time.perf_counter()
    trainer.train()
    return timer.row("Hugging Face `DistillationTrainer` (ViT 4x128 -> 2x64, DiffKD tokens + KD)")


def lightning(steps: int, warmup: int, scratch: str) -> str:
    import lightning as L

    from diffkd.integrations.lightning import DistillationModule

    def cnn(width: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, CLASSES))

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = cnn(16)

        def forward(self, x):
            return self.net(x)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    teacher, student = cnn(64).eval().requires_grad_(False), Lit()
    levels = [Level("@feature", "@feature", "diffkd", latent_channels=64, name="maps"),
              Level("@logits", "@logits", "kd", tau=1.0, name="logits")]
    data = torch.utils.data.TensorDataset(*images(0))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
    example = data.tensors[0][:2]

    def call(distiller: Distiller, batch: tuple) -> torch.Tensor:
        x, y = batch
        out = distiller(x, y)
        return F.cross_entropy(out.student, y) + out.loss

    timer = Timer(plain_loop(copy.deepcopy(teacher), copy.deepcopy(student), levels, example, None, cycle(loader), call),
                  warmup)

    class Tick(L.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            timer.step_end()

    module = DistillationModule(student, teacher, levels, task_loss=F.cross_entropy, example_input=example)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps + warmup, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Tick()], default_root_dir=scratch,
                        log_every_n_steps=50)
    timer.mark = time.perf_counter()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True))
    return timer.row("Lightning `DistillationModule` (CNN 64 -> 16, DiffKD maps + KD)")


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="measured steps per adapter")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rows = ["| adapter | steps | plain loop ms (median) | adapter ms (median) | adapter / plain |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        rows.append(hugging_face(args.steps, args.warmup, scratch))
        rows.append(lightning(args.steps, args.warmup, scratch))
    print(f"CPU, {torch.get_num_threads()} thread, batch {BATCH}, 32x32 images")
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
