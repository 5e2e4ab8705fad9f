"""Write the paper's classification recipes (CIFAR-100 Tab. 9, ImageNet Tab. 2 and 3) as complete YAML configs.

The config loader has no base files, so every recipe is written out in full from the tables below:
edit them here, then run `python configs/classification_recipes.py` (`--check` only reports stale
files; tests/test_recipes.py runs that check). Each file's header names the paper's number to
compare with and the command that runs it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOTS = ("cifar100", "imagenet")  # the folders this script owns, under configs/
SCRIPT = "configs/classification_recipes.py"


@dataclass(frozen=True)
class Recipe:
    """One config file: where it goes, the header lines above it, and its content."""

    path: str
    header: tuple[str, ...]
    content: dict[str, Any]
    mode: str  # "train" or "distill": the subcommand that runs it


@dataclass(frozen=True)
class Strategy:
    """A training strategy of the paper: data, optimizer, schedule and loop sections shared by its runs."""

    name: str
    data: dict[str, Any]
    optim: dict[str, Any]
    schedule: dict[str, Any]
    train: dict[str, Any]
    summary: str


@dataclass(frozen=True)
class Net:
    """A model in a recipe: registry name, short slug for paths, printed name, and how a teacher is loaded.

    `stages`: the module paths of its stage outputs, shallow to deep (the intermediate features of the
    CRD / ReviewKD reference code), for the multi-stage baselines; `hint`: FitNet's hint layer (the
    second of them, RepDistiller's hint_layer 2).
    """

    name: str
    slug: str
    label: str
    lr: float | None = None  # a per-model lr (CIFAR: 0.01 for MobileNetV2 and ShuffleNets)
    teacher: dict[str, Any] = field(default_factory=dict)  # extra teacher section keys
    stages: tuple[str, ...] = ()
    hint: str | None = None


# Where the baselines' published numbers come from, by method key (the others are the DiffKD paper's).
SOURCES = {key: "CRD paper, Tian et al. ICLR 2020, Tab. 1-2" for key in ("fitnet", "vid", "rkd", "pkt", "crd")}
SOURCES["reviewkd"] = "ReviewKD paper, Chen et al. CVPR 2021"


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair, the paper's top-1 numbers by method ("student" for the student alone;
    None: not verified here), and the pair's own methods (those whose taps depend on the models)."""

    teacher: Net
    student: Net
    paper: dict[str, float | None]
    methods: dict[str, Any] = field(default_factory=dict)


def level(tap: str, method: str, weight: float = 1.0, **options: Any) -> dict[str, Any]:
    """A level on the default taps ("feature" or "logits") of both models."""
    return {"student": f"@{tap}", "teacher": f"@{tap}", "method": method, "weight": weight, "options": options}


def tapped(student: str | list[str], teacher: str | list[str], method: str, weight: float, **options: Any) -> dict[str, Any]:
    """A level on given module paths (a list per side for the multi-stage methods)."""
    return {"student": student, "teacher": teacher, "method": method, "weight": weight, "options": options}


# Methods: what each distill config adds, and one line saying so.
Method = tuple[str, list[dict[str, Any]]]

CIFAR_METHODS: dict[str, Method] = {
    "kd": ("KD (Hinton) on the logits, tau 4", [level("logits", "kd", tau=4.0)]),
    "dist": (
        "DIST on the logits: beta 2, gamma 2, tau 4 (our reading of DIST's CIFAR-100 setting)",
        [level("logits", "dist", beta=2.0, gamma=2.0, tau=4.0)],
    ),
    "dkd": (
        "DKD on the logits: alpha 1, beta 8, tau 4, weight ramped over the first 20 epochs",
        [level("logits", "dkd", alpha=1.0, beta=8.0, tau=4.0, warmup_epochs=20)],
    ),
    "mse": ("FitNet-style MSE on the last feature map (1x1 conv connector)", [level("feature", "mse")]),
    "diffkd": (
        "DiffKD on the last feature map (MSE, no AE) and on the logits (KL, tau 1)",
        [level("feature", "diffkd", distance="mse"), level("logits", "diffkd", distance="kl", tau=1.0)],
    ),
}

IMAGENET_FEATURE = level("feature", "diffkd", distance="mse", latent_channels=1024)
B1_METHODS: dict[str, Method] = {
    "kd": ("KD on the logits, tau 1", [level("logits", "kd", tau=1.0)]),
    "dkd": (
        "DKD on the logits: alpha 0.5, beta 0.5, tau 1, weight ramped over the first epoch",
        [level("logits", "dkd", alpha=0.5, beta=0.5, tau=1.0, warmup_epochs=1)],
    ),
    "dist": ("DIST on the logits: beta 1, gamma 1, tau 1", [level("logits", "dist", beta=1.0, gamma=1.0, tau=1.0)]),
    "mse": ("FitNet-style MSE on the last feature map (1x1 conv connector)", [level("feature", "mse")]),
    "diffkd": (
        "DiffKD on the last feature map (AE latent 1024, MSE) and on the logits (KL, tau 1)",
        [IMAGENET_FEATURE, level("logits", "diffkd", distance="kl", tau=1.0)],
    ),
    "diffkd_dist": (
        "DiffKD+DIST (the paper's dagger rows): as diffkd, with DIST instead of KL on the denoised logits",
        [IMAGENET_FEATURE, level("logits", "diffkd", distance="dist", tau=1.0)],
    ),
}


def cifar_baselines(teacher: Net, student: Net) -> dict[str, Method]:
    """The CRD paper's baselines (its CIFAR-100 settings: CE weight 1, no KD, these weights) for one pair."""
    return {
        "fitnet": (f"FitNet: MSE on the hint layers ({student.hint} -> {teacher.hint}, 1x1 conv connector), weight 100",
                   [tapped(student.hint, teacher.hint, "mse", 100.0)]),
        "vid": ("VID on every stage pair, weight 1", [tapped(list(student.stages), list(teacher.stages), "vid", 1.0)]),
        "rkd": ("RKD on the pooled feature: distance 25 + angle 50, weight 1", [level("feature", "rkd")]),
        "pkt": ("PKT on the pooled feature, weight 30000", [level("feature", "pkt", 30000.0)]),
        "crd": ("CRD on the pooled feature: 128-d heads, 16384 negatives of other classes, T 0.07, momentum 0.5, weight 0.8",
                [level("feature", "crd", 0.8)]),
    }


def reviewkd_b1(teacher: Net, student: Net, weight: float, **options: Any) -> dict[str, Method]:
    """ReviewKD on every stage, its ImageNet setting (mdistiller's configs): ramp over 1 epoch."""
    extra = f", ABF middle width {options['max_mid_channels']}" if "max_mid_channels" in options else ""
    return {"reviewkd": (
        f"ReviewKD on the four stages and the pooled feature, weight {weight:g} ramped over the first epoch{extra}",
        [tapped(list(student.stages), list(teacher.stages), "reviewkd", weight, warmup_epochs=1, **options)],
    )}


def strong_methods(latent: int) -> dict[str, Method]:
    """The Tab. 3 methods; KD uses tau 4 there (as in DIST's stronger-strategy runs)."""
    feature = level("feature", "diffkd", distance="mse", latent_channels=latent)
    return {
        "kd": ("KD on the logits, tau 4", [level("logits", "kd", tau=4.0)]),
        "dist": ("DIST on the logits: beta 1, gamma 1, tau 1", [level("logits", "dist", beta=1.0, gamma=1.0, tau=1.0)]),
        "diffkd": (
            f"DiffKD on the last feature map (AE latent {latent}, MSE) and on the logits (KL, tau 1)",
            [feature, level("logits", "diffkd", distance="kl", tau=1.0)],
        ),
    }


IMAGENET_DATA = {"name": "imagenet", "root": "data/imagenet", "workers": 8}

A1 = Strategy(
    "A1",
    {"name": "cifar100", "download": True, "batch_size": 64},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    {"name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1},
    {"epochs": 240, "seed": 0},
    "240 epochs, SGD lr 0.05 (0.01 for MobileNetV2 / ShuffleNets), batch 64, wd 5e-4, x0.1 at 150/180/210, crop + flip",
)
B1 = Strategy(
    "B1",
    {**IMAGENET_DATA, "batch_size": 256},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    {"name": "step", "step_size": 30, "gamma": 0.1},
    {"epochs": 100, "seed": 0},
    "100 epochs, SGD lr 0.1, batch 256, wd 1e-4, x0.1 every 30 epochs, random-resized crop + flip",
)
B2 = Strategy(
    "B2",
    {**IMAGENET_DATA, "batch_size": 768, "randaugment": True, "random_erasing": 0.2},
    # TensorFlow-style RMSprop settings of timm's EfficientNet recipe (alpha 0.9, eps 1e-3).
    {"name": "rmsprop", "lr": 0.048, "momentum": 0.9, "alpha": 0.9, "eps": 1e-3, "weight_decay": 1e-5},
    {"name": "exponential", "gamma": 0.97, "every_epochs": 2.4, "warmup_epochs": 3},
    {"epochs": 450, "label_smoothing": 0.1, "ema_decay": 0.9999, "seed": 0},
    "450 epochs, RMSprop lr 0.048, batch 768, wd 1e-5, label smoothing 0.1, EMA 0.9999, x0.97 every "
    "2.4 epochs, RandAugment + random erasing",
)
B3 = Strategy(
    "B3",
    {
        **IMAGENET_DATA,
        "batch_size": 1024,
        "randaugment": True,
        "random_erasing": 0.25,
        "color_jitter": 0.4,
        "mixup": 0.8,
        "cutmix": 1.0,
    },
    {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05, "no_decay_norm_bias": True},
    {"name": "cosine", "warmup_epochs": 20},
    {"epochs": 300, "label_smoothing": 0.1, "seed": 0},
    "300 epochs, AdamW lr 5e-4, batch 1024, wd 0.05, label smoothing 0.1, cosine (20 warm-up epochs), "
    "RandAugment, random erasing, colour jitter, mixup, cutmix",
)

# CIFAR-100 (Tab. 9). Teachers are trained by the teacher configs into runs/cifar100/teachers/<slug>.
RESNET_STAGES = {"stages": ("layer1", "layer2", "layer3"), "hint": "layer2"}
WRN40_2 = Net("wrn_40_2", "wrn40_2", "WRN-40-2", stages=("block1", "block2", "block3"), hint="block2")
RESNET56 = Net("resnet56", "resnet56", "resnet56", **RESNET_STAGES)
RESNET32X4 = Net("resnet32x4", "resnet32x4", "resnet32x4", **RESNET_STAGES)
RESNET50_CIFAR = Net("resnet50_cifar", "resnet50", "ResNet50", stages=("layer1", "layer2", "layer3", "layer4"), hint="layer2")
CIFAR_TEACHERS = ((WRN40_2, 75.61), (RESNET56, 72.34), (RESNET32X4, 79.42), (RESNET50_CIFAR, 79.34))


def cifar_pair(teacher: Net, student: Net, paper: dict[str, float], baselines: tuple[float, ...]) -> Pair:
    """A Tab. 9 pair; `baselines` are the CRD paper's FitNet, VID, RKD, PKT and CRD top-1 for it."""
    published = dict(zip(("fitnet", "vid", "rkd", "pkt", "crd"), baselines, strict=True))
    return Pair(teacher, student, {**paper, **published}, cifar_baselines(teacher, student))


CIFAR_PAIRS = (
    cifar_pair(WRN40_2, Net("wrn_40_1", "wrn40_1", "WRN-40-1", stages=("block1", "block2", "block3"), hint="block2"),
               {"student": 71.98, "kd": 73.54, "dist": 74.73, "diffkd": 74.09}, (72.24, 73.30, 72.22, 73.45, 74.14)),
    cifar_pair(RESNET56, Net("resnet20", "resnet20", "resnet20", **RESNET_STAGES),
               {"student": 69.06, "kd": 70.66, "dist": 71.75, "diffkd": 71.92}, (69.21, 70.38, 69.61, 70.34, 71.16)),
    cifar_pair(RESNET32X4, Net("resnet8x4", "resnet8x4", "resnet8x4", **RESNET_STAGES),
               {"student": 72.50, "kd": 73.33, "dist": 76.31, "diffkd": 76.72}, (73.50, 73.09, 71.90, 73.64, 75.51)),
    cifar_pair(RESNET50_CIFAR, Net("mobile_half", "mobilenetv2", "MobileNetV2", lr=0.01,
                                   stages=("blocks.1", "blocks.2", "blocks.4", "blocks.6"), hint="blocks.2"),
               {"student": 64.6, "kd": 67.35, "dist": 68.66, "diffkd": 69.21}, (63.16, 67.57, 64.43, 66.52, 69.11)),
    cifar_pair(RESNET32X4, Net("ShuffleV1", "shufflev1", "ShuffleNetV1", lr=0.01, **RESNET_STAGES),
               {"student": 70.5, "kd": 74.07, "dist": 76.34, "diffkd": 76.57}, (73.59, 73.38, 72.28, 74.10, 75.11)),
    cifar_pair(RESNET32X4, Net("ShuffleV2", "shufflev2", "ShuffleNetV2", lr=0.01, **RESNET_STAGES),
               {"student": 71.82, "kd": 74.45, "dist": 77.35, "diffkd": 77.52}, (73.54, 73.40, 73.21, 74.69, 75.65)),
)

# ImageNet B1 (Tab. 2): torchvision's ImageNet teachers. ResNet-34 has one set of weights
# (73.31 %); for ResNet-50 the paper's teacher is the original (V1, 76.13 %) file, whereas
# torchvision's DEFAULT weights are the stronger V2, so the file is given explicitly.
TORCHVISION_STAGES = ("layer1", "layer2", "layer3", "layer4")
R34 = Net("resnet34", "r34", "ResNet-34", teacher={"pretrained": True}, stages=TORCHVISION_STAGES)
R18 = Net("resnet18", "r18", "ResNet-18", stages=TORCHVISION_STAGES)
R50_V1 = Net("resnet50", "r50", "ResNet-50", teacher={"checkpoint": "checkpoints/resnet50-0676ba61.pth"},
             stages=TORCHVISION_STAGES)
MBV1 = Net("mobilenetv1", "mbv1", "MobileNetV1", stages=("model.3", "model.5", "model.11", "model.13"))  # 56, 28, 14, 7
B1_PAIRS = (
    Pair(R34, R18,
         {"student": 69.76, "kd": 70.66, "dkd": 71.70, "dist": 72.07, "mse": 70.58, "diffkd": 72.22,
          "diffkd_dist": 72.49, "reviewkd": 71.61},
         reviewkd_b1(R34, R18, 1.0)),
    Pair(R50_V1, MBV1,
         {"student": 70.13, "kd": 70.68, "dkd": 72.05, "dist": 73.24, "mse": 72.39, "diffkd": 73.62,
          "diffkd_dist": 73.78, "reviewkd": None},
         reviewkd_b1(R50_V1, MBV1, 8.0, max_mid_channels=256)),
)

# ImageNet Tab. 3: strong teachers from timm (ResNet-50 "strikes back" A1, Swin-L), students from scratch.
R50_SB = Net("timm:resnet50.a1_in1k", "r50sb", "ResNet-50-SB", teacher={"pretrained": True})
SWIN_L = Net("timm:swin_large_patch4_window7_224", "swinl", "Swin-L", teacher={"pretrained": True})
B2_PAIRS = tuple(
    Pair(R50_SB, student, {})
    for student in (
        Net("resnet34", "r34", "ResNet-34"),
        Net("mobilenet_v2", "mbv2", "MobileNetV2"),
        Net("efficientnet_b0", "effb0", "EfficientNet-B0"),
    )
)
B3_PAIRS = tuple(
    Pair(SWIN_L, student, {})
    for student in (Net("resnet50", "r50", "ResNet-50"), Net("timm:swin_tiny_patch4_window7_224", "swint", "Swin-T"))
)


def _config(strategy: Strategy, lr: float | None, out: str, **models: Any) -> dict[str, Any]:
    """The full config of one run under a strategy: models in the middle, the strategy's sections around."""
    optim = dict(strategy.optim, **({"lr": lr} if lr is not None else {}))
    return {
        "task": "classification",
        "data": dict(strategy.data),
        **models,
        "optim": optim,
        "schedule": dict(strategy.schedule),
        "train": dict(strategy.train),
        "output": {"dir": out},
    }


def _compare(table: str, pair: Pair, key: str) -> str:
    """The header line naming the published number, where it is from, or why there is none."""
    number = pair.paper.get(key)
    if key in SOURCES:
        return f"Published ({SOURCES[key]}): {number:.2f} top-1." if number is not None else (
            f"Published ({SOURCES[key]}): not verified here.")
    if number is not None:
        return f"Paper {table}: {number:.2f} top-1."
    return "Paper: see Tab. 3." if table == "Tab. 3" else f"Paper: not reported in {table}."


def _recipe_line(strategy: Strategy) -> str:
    """The header line summing up the strategy."""
    return f"Strategy {strategy.name}: {strategy.summary}."


def _teacher_section(net: Net, checkpoint: str | None) -> dict[str, Any]:
    """The teacher section: its registry name plus a checkpoint (a run dir or weights file) or pretrained."""
    section: dict[str, Any] = {"name": net.name}
    if checkpoint is not None:
        section["checkpoint"] = checkpoint
    section.update(net.teacher)
    return section


def _train_recipe(strategy: Strategy, net: Net, folder: str, what: str, table: str, number: float | None) -> Recipe:
    """A `diffkd train` config, <folder>/<slug>.yaml: one model with its task loss only."""
    alone = Pair(net, net, {"student": number})
    header = (f"{strategy.name}: {what}.", _compare(table, alone, "student"), _recipe_line(strategy))
    content = _config(strategy, net.lr, f"runs/{folder}/{net.slug}", model={"name": net.name})
    return Recipe(f"{folder}/{net.slug}.yaml", header, content, "train")


def _distill_recipes(
    strategy: Strategy, root: str, pair: Pair, methods: dict[str, Method], table: str, checkpoint: str | None
) -> list[Recipe]:
    """One `diffkd distill` config per method for a teacher -> student pair."""
    folder = f"{root}/{pair.teacher.slug}-{pair.student.slug}"
    recipes = []
    for key, (what, levels) in {**methods, **pair.methods}.items():
        header = (
            f"{strategy.name}: {pair.teacher.label} -> {pair.student.label}, {what}.",
            _compare(table, pair, key),
            _recipe_line(strategy),
        )
        content = _config(
            strategy,
            pair.student.lr,
            f"runs/{folder}/{key}",
            teacher=_teacher_section(pair.teacher, checkpoint),
            student={"name": pair.student.name},
            levels=[dict(lv, options=dict(lv["options"])) for lv in levels],
        )
        recipes.append(Recipe(f"{folder}/{key}.yaml", header, content, "distill"))
    return recipes


def cifar100() -> list[Recipe]:
    """Tab. 9: teachers, students alone, KD / DIST / DKD / MSE / DiffKD and the CRD paper's baselines, six pairs."""
    recipes = [
        _train_recipe(A1, net, "cifar100/teachers", f"CIFAR-100 teacher {net.label}", "Tab. 9", top1)
        for net, top1 in CIFAR_TEACHERS
    ]
    for pair in CIFAR_PAIRS:
        net = pair.student
        what = f"CIFAR-100 student {net.label} alone"
        recipes.append(_train_recipe(A1, net, "cifar100/students", what, "Tab. 9", pair.paper["student"]))
        teacher_run = f"runs/cifar100/teachers/{pair.teacher.slug}"
        recipes += _distill_recipes(A1, "cifar100", pair, CIFAR_METHODS, "Tab. 9", teacher_run)
    return recipes


def imagenet() -> list[Recipe]:
    """Tab. 2 (B1) and Tab. 3 (B2, B3): students alone and every method per pair."""
    recipes = []
    for strategy, pairs, methods, table in (
        (B1, B1_PAIRS, B1_METHODS, "Tab. 2"),
        (B2, B2_PAIRS, strong_methods(1024), "Tab. 3"),
        (B3, B3_PAIRS, strong_methods(768), "Tab. 3"),
    ):
        root = f"imagenet/{strategy.name.lower()}"
        for pair in pairs:
            net = pair.student
            what = f"ImageNet student {net.label} alone"
            recipes.append(_train_recipe(strategy, net, f"{root}/students", what, table, pair.paper.get("student")))
            recipes += _distill_recipes(strategy, root, pair, methods, table, None)
    return recipes


def recipes() -> list[Recipe]:
    """Every recipe this script writes."""
    return cifar100() + imagenet()


def render(recipe: Recipe) -> str:
    """The file text: header comments, the command line, then the config as YAML."""
    lines = [f"# {line}" for line in recipe.header]
    lines.append(f"#   diffkd {recipe.mode} configs/{recipe.path}")
    lines.append(f"# Written by {SCRIPT}: edit the tables there and rerun it, not this file.")
    for key, value in recipe.content.items():
        if key == "levels":  # one line per level, as in the hand-written configs
            lines += ["levels:", *(f"  - {_dump(lv, flow=True)}" for lv in value)]
        else:
            lines.append(_dump({key: value}, flow=False))
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, but lists of plain values on one line (milestones)."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        scalars = all(not isinstance(v, (dict, list)) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=scalars)


_Dumper.add_representer(list, _Dumper.represent_list)


def _dump(value: Any, *, flow: bool) -> str:
    """YAML text of a value, all on one line (flow) or in block style, without the trailing newline."""
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=flow, width=200).rstrip()


def expected_files() -> dict[Path, str]:
    """Every file this script owns, by absolute path, with its text."""
    return {HERE / r.path: render(r) for r in recipes()}


def stale_files() -> list[str]:
    """Files that differ from what the tables give, are missing, or are left over (relative to configs/)."""
    expected = expected_files()
    present = {p for root in ROOTS for p in (HERE / root).rglob("*.yaml")}
    wrong = [p for p, text in expected.items() if not p.is_file() or p.read_text() != text]
    extra = [p for p in present if p not in expected]
    return sorted(str(p.relative_to(HERE)) for p in wrong + extra)


def write() -> int:
    """Write every recipe and delete left-over YAML files in the owned folders; returns the count written."""
    expected = expected_files()
    for root in ROOTS:
        for path in (HERE / root).rglob("*.yaml"):
            if path not in expected:
                path.unlink()
    for path, text in expected.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return len(expected)


def main(argv: list[str] | None = None) -> int:
    """Write the configs, or with --check list the stale ones and fail if there are any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ from the tables")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: configs/{name}")
        return 1 if stale else 0
    print(f"wrote {write()} configs under configs/{{{','.join(ROOTS)}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
