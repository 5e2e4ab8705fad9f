"""A Hugging Face transformers image classifier distilled into a smaller one, in the Python API and by config.

    python examples/huggingface_model.py --folder my-vit        # a folder with config.json (+ weights)

Without --folder a small ViT config is written to a temporary folder (random weights, nothing is
downloaded). The teacher is built from the folder as a config would (`hf:<folder>`; weights too
with pretrained=True), the student from a smaller config. The probe finds each model's final normed
tokens (`vit.layernorm`, the class token dropped) and its classifier; the ModelOutput's `.logits`
goes into the task loss. --tiny uses 32x32 images and 2-layer models (the test does).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from diffkd import Distiller, Level, models


def vit_config(tiny: bool, layers: int, width: int, classes: int) -> transformers.ViTConfig:
    size = 32 if tiny else 224
    return transformers.ViTConfig(image_size=size, patch_size=8 if tiny else 16, hidden_size=width,
                                  num_hidden_layers=layers, num_attention_heads=2 if tiny else width // 64,
                                  intermediate_size=4 * width, num_labels=classes)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", help="a transformers folder: config.json, and weights for --pretrained")
    parser.add_argument("--pretrained", action="store_true", help="load the folder's weights into the teacher")
    parser.add_argument("--tiny", action="store_true", help="32x32 images, 2-layer models")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    classes = 5
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.folder) if args.folder else Path(scratch) / "teacher"
        if not args.folder:
            vit_config(args.tiny, layers=2 if args.tiny else 12, width=64 if args.tiny else 384, classes=classes).save_pretrained(folder)
        # What a config's `teacher: {name: "hf:<folder>", pretrained: true}` builds:
        teacher = models.create(f"hf:{folder}", num_classes=classes, pretrained=args.pretrained)
        student = transformers.ViTForImageClassification(
            vit_config(args.tiny, layers=1 if args.tiny else 6, width=32 if args.tiny else 192, classes=classes))
        size = teacher.config.image_size

        distiller = Distiller(teacher, student, [
            Level("@feature", "@feature", "diffkd", latent_channels=32 if args.tiny else 256, name="tokens"),
            Level("@logits", "@logits", "kd", tau=1.0, name="logits"),
        ], input_shape=(3, size, size))
        print("teacher taps found:", {k: t.path for k, t in distiller.teacher_taps.taps.items()},
              "prefix tokens dropped:", distiller.teacher_taps.taps["tokens"].prefix_tokens)

        optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-4)
        images, labels = torch.randn(4, 3, size, size), torch.randint(0, classes, (4,))
        for step in range(2 if args.tiny else 10):
            out = distiller(images, labels)
            loss = F.cross_entropy(out.student.logits, labels) + out.loss  # the student returns a ModelOutput
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"step {step}: loss {loss.item():.3f}")
    return loss.item()


if __name__ == "__main__":
    main()
