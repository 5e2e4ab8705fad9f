"""Your own PyTorch training loop with diffkd's Distiller, on your own folder of images.

    python examples/own_loop_image_folder.py --data /path/to/images --teacher-weights teacher.pt

The folder holds train/<class>/* and val/<class>/* (any format PIL reads); the class count comes from
the folders. Taps are "@feature" / "@logits": the probe finds each model's last feature map before
global pooling and its logits, so no layer is named. --tiny runs two steps at 32x32 (the test does).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from diffkd import Distiller, Level, models
from diffkd.data import build_dataset, dataset_info


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="image folder: train/<class>/*, val/<class>/*")
    parser.add_argument("--teacher-weights", help="the trained teacher's state dict (random weights without it)")
    parser.add_argument("--tiny", action="store_true", help="two steps at 32x32 with CIFAR-sized nets")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # Data: ImageNet-style transforms (RandomResizedCrop + flip for training) at the chosen size.
    size, teacher_name, student_name = (32, "resnet14", "resnet8") if args.tiny else (224, "resnet50", "resnet18")
    classes = dataset_info("image_folder", args.data).classes
    train = build_dataset("image_folder", "train", args.data, image_size=size)
    val = build_dataset("image_folder", "val", args.data, image_size=size)
    loader = DataLoader(train, batch_size=4 if args.tiny else 64, shuffle=True, drop_last=True)

    # Models: any nn.Module works; here two registered nets with the folder's class count.
    teacher = models.create(teacher_name, num_classes=len(classes))
    if args.teacher_weights:
        models.load_weights(teacher, args.teacher_weights)
    student = models.create(student_name, num_classes=len(classes))

    # One DiffKD level on the feature maps, KD on the logits; method modules are sized by one dry forward.
    distiller = Distiller(teacher, student, [
        Level("@feature", "@feature", "diffkd", latent_channels=64 if args.tiny else 1024, name="feature"),
        Level("@logits", "@logits", "kd", tau=4.0, name="logits"),
    ], input_shape=(3, size, size))
    for role, taps in (("student", distiller.student_taps), ("teacher", distiller.teacher_taps)):
        print(f"{role} taps found:", {name: tap.path for name, tap in taps.taps.items()})
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)

    distiller.train()  # the teacher stays in eval mode and frozen
    for step, (images, labels) in enumerate(loader):
        out = distiller(images, labels)
        loss = F.cross_entropy(out.student, labels) + out.loss  # task loss + every level's weighted losses
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.3f} ({', '.join(f'{k} {v.item():.3f}' for k, v in out.losses.items())})")
        if args.tiny and step == 1:
            break

    # Evaluate the student alone, then keep its weights (a plain state dict).
    student.eval()
    with torch.no_grad():
        correct = sum(int(student(image[None]).argmax(1) == label) for image, label in val)
    accuracy = 100.0 * correct / len(val)
    print(f"student val top-1 {accuracy:.1f}% on {len(val)} images of {len(classes)} classes ({', '.join(classes)})")
    return accuracy


if __name__ == "__main__":
    main()
