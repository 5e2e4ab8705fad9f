"""Runs one small distillation inside the Hugging Face Trainer or Lightning, in one process or under torchrun.

    python tests/integration_workers.py hf|lightning OUT_DIR BATCH [STEPS]

Each process writes OUT_DIR/rank<r>.pt: its student and method-module weights, the method modules' initial
weights and (rank 0) the logged history; the tests compare two gloo processes with one process.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from diffkd import Level

CLASSES, SIZE, ITEMS = 3, 16, 32


class Pictures(Dataset):
    """Fixed random images with labels, as dict items (Hugging Face) or (x, y) pairs (Lightning)."""

    def __init__(self, as_dict: bool):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(ITEMS, 3, SIZE, SIZE, generator=g)
        self.y = torch.randint(0, CLASSES, (ITEMS,), generator=g)
        self.as_dict = as_dict

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int):
        return {"pixel_values": self.x[i], "labels": self.y[i]} if self.as_dict else (self.x[i], self.y[i])


def cnn(width: int) -> nn.Sequential:
    """A small CNN without BatchNorm, so per-process batches give the same gradients as one big batch."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, CLASSES))


def run_hf(out: Path, batch: int, steps: int) -> dict:
    import transformers

    from diffkd.integrations.transformers import DistillationTrainer

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = cnn(8)

        def forward(self, pixel_values, labels=None):
            logits = self.net(pixel_values)  # the probe calls it without labels
            return {"logits": logits} if labels is None else {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    torch.manual_seed(0)
    teacher, student = cnn(16), Student()
    args = transformers.TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=batch, max_steps=steps,
                                          learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, seed=0)
    levels = [Level("net.2", "2", "mse", name="feature"), Level("net.6", "6", "kd", tau=2.0, name="logits")]
    trainer = DistillationTrainer(model=student, teacher=teacher.eval().requires_grad_(False), levels=levels, args=args,
                                  train_dataset=Pictures(as_dict=True), teacher_inputs=lambda b: b["pixel_values"])
    initial = {k: v.clone() for k, v in trainer.distiller.methods.state_dict().items()}
    trainer.train()
    return {"student": student.state_dict(), "methods": trainer.distiller.methods.state_dict(), "initial": initial,
            "history": trainer.state.log_history}


def run_lightning(out: Path, batch: int, steps: int) -> dict:
    import lightning as L

    from diffkd.integrations.lightning import DistillationModule

    class Student(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = cnn(8)

        def forward(self, x):
            return self.net(x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    teacher, student = cnn(16), Student()
    levels = [Level("net.2", "2", "mse", name="feature"), Level("net.6", "6", "kd", tau=2.0, name="logits")]
    module = DistillationModule(student, teacher.eval().requires_grad_(False), levels,
                                task_loss=nn.functional.cross_entropy, example_input=torch.randn(2, 3, SIZE, SIZE))
    initial = {k: v.clone() for k, v in module.methods.state_dict().items()}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = Pictures(as_dict=False)  # in order, each process every other item (Lightning's own sampler would shuffle)
    rank = int(os.environ.get("RANK", "0"))
    sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=False) if world > 1 else None
    loader = torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=steps,
                        use_distributed_sampler=False,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(module, loader)
    return {"student": student.state_dict(), "methods": module.methods.state_dict(), "initial": initial,
            "history": [{k: float(v) for k, v in trainer.callback_metrics.items()}]}


def main() -> None:
    kind, out, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    torch.set_num_threads(1)
    result = (run_hf if kind == "hf" else run_lightning)(out, batch, steps)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{os.environ.get('RANK', '0')}.pt")
    if torch.distributed.is_initialized():  # an undestroyed gloo group may abort the exit (it failed one make test)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
