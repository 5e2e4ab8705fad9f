"""Distil a transformers ViT inside the Hugging Face Trainer with diffkd's DistillationTrainer.

    python examples/hf_trainer.py                                 # one process
    torchrun --nproc_per_node=2 examples/hf_trainer.py --tiny     # DDP (gloo on CPU, NCCL on GPUs)

A synthetic task (which quadrant of the image is bright, 4 classes) keeps it self-contained: a
2-layer ViT teacher is trained with the plain `Trainer`, then a 1-layer ViT student is distilled
from it on the probed `@feature` tokens (DiffKD) and `@logits` (KD). The student is saved alone in
Hugging Face format and loaded back with `from_pretrained`, without diffkd. --tiny: 16x16 images
and a few steps (the test runs it).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.utils.data import Dataset

from diffkd import Level
from diffkd.integrations.transformers import DistillationTrainer

CLASSES = 4


class Quadrants(Dataset):
    """Noise images whose bright quadrant is the label, as the dicts a Trainer collates."""

    def __init__(self, n: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)
        self.x = 0.5 * torch.randn(n, 3, size, size, generator=g)
        half = size // 2
        for i, label in enumerate(self.y.tolist()):
            row, col = divmod(label, 2)
            self.x[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def vit(size: int, layers: int, width: int) -> transformers.ViTForImageClassification:
    config = transformers.ViTConfig(image_size=size, patch_size=size // 4, hidden_size=width, num_hidden_layers=layers,
                                    num_attention_heads=2, intermediate_size=2 * width, num_labels=CLASSES)
    return transformers.ViTForImageClassification(config)


def accuracy(prediction: transformers.EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean() * 100)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="16x16 images, a few steps")
    parser.add_argument("--out", help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    size, steps, items = (16, 6, 64) if args.tiny else (32, 150, 2048)
    train, test = Quadrants(items, size, seed=0), Quadrants(items // 4, size, seed=1)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)

        def arguments(name: str, lr: float) -> transformers.TrainingArguments:
            return transformers.TrainingArguments(output_dir=str(out / name), max_steps=steps, learning_rate=lr,
                                                  per_device_train_batch_size=16, per_device_eval_batch_size=64,
                                                  logging_steps=max(1, steps // 3), save_strategy="no",
                                                  report_to=[], disable_tqdm=True, seed=0,
                                                  use_cpu=not torch.cuda.is_available())  # torchrun on CPU: gloo DDP

        torch.manual_seed(0)
        teacher = vit(size, layers=2, width=64)
        teacher_run = transformers.Trainer(model=teacher, args=arguments("teacher", 1e-3), train_dataset=train,
                                           eval_dataset=test, compute_metrics=accuracy)
        teacher_run.train()
        teacher_accuracy = teacher_run.evaluate()["eval_accuracy"]

        trainer = DistillationTrainer(
            model=vit(size, layers=1, width=32), teacher=teacher.eval().requires_grad_(False),
            levels=[Level("@feature", "@feature", "diffkd", latent_channels=32, name="tokens"),
                    Level("@logits", "@logits", "kd", tau=1.0, name="logits")],
            args=arguments("student", 1e-3), train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
        print("student taps:", {k: t.path for k, t in trainer.distiller.student_taps.taps.items()})
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h][-1]
        print("last training log:", {k: round(v, 4) for k, v in logged.items()})
        student_accuracy = trainer.evaluate()["eval_accuracy"]

        trainer.save_model(str(out / "student"))  # the student alone, Hugging Face format (written by process 0)
        if not trainer.is_world_process_zero():
            return {"teacher": teacher_accuracy, "student": student_accuracy, **logged}
        reloaded = transformers.ViTForImageClassification.from_pretrained(out / "student")
        with torch.no_grad():
            reloaded_accuracy = float((reloaded(pixel_values=test.x).logits.argmax(1) == test.y).float().mean() * 100)
    print(f"test accuracy: teacher {teacher_accuracy:.1f}%, distilled student {student_accuracy:.1f}% "
          f"(reloaded without diffkd: {reloaded_accuracy:.1f}%)")
    return {"teacher": teacher_accuracy, "student": student_accuracy, "reloaded": reloaded_accuracy, **logged}


if __name__ == "__main__":
    main()
