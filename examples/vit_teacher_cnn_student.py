"""A timm ViT teacher, a CNN student, distilled at the token level: tokens folded into a map.

    python examples/vit_teacher_cnn_student.py

The probe finds the ViT's final normed tokens ("@feature": timm's `norm`, its class token dropped as
the model's `num_prefix_tokens` says) and folds the 14x14 patch tokens into a (B, C, 14, 14) map;
DiffKD then denoises the CNN's last feature map (resized to the teacher's grid by the projector)
against it. Random weights here (no download): load a trained ViT in practice
(timm.create_model(..., pretrained=True) or --teacher-weights). --tiny runs at 32x32 (the test does).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from diffkd import Distiller, Level, models


def main(argv: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-weights", help="a state dict for the ViT teacher")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer ViT at 32x32 and a CIFAR ResNet-8")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    classes = 10
    if args.tiny:
        size, student_name, vit_options = 32, "resnet8", {"img_size": 32, "depth": 2}
    else:
        size, student_name, vit_options = 224, "resnet18", {}
    teacher = models.create("timm:vit_tiny_patch16_224", num_classes=classes, **vit_options)
    if args.teacher_weights:
        models.load_weights(teacher, args.teacher_weights)
    student = models.create(student_name, num_classes=classes)

    distiller = Distiller(teacher, student, [
        Level("@feature", "@feature", "diffkd", latent_channels=64 if args.tiny else 256, name="tokens"),
        Level("@logits", "@logits", "kd", tau=1.0, name="logits"),
    ], input_shape=(3, size, size))
    print("teacher feature tap:", distiller.teacher_taps.taps["tokens"])
    images, labels = torch.randn(4, 3, size, size), torch.randint(0, classes, (4,))
    out = distiller(images, labels)
    shapes = {"teacher": tuple(distiller.teacher_taps["tokens"].shape), "student": tuple(distiller.student_taps["tokens"].shape)}
    print(f"teacher tokens as a map {shapes['teacher']}, student map {shapes['student']}")

    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
    loss = F.cross_entropy(out.student, labels) + out.loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"one step: loss {loss.item():.3f} ({', '.join(f'{k} {v.item():.3f}' for k, v in out.losses.items())})")
    return shapes


if __name__ == "__main__":
    main()
