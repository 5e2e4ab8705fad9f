"""The paper's classification recipes (configs/cifar100, configs/imagenet): up to date, faithful, and runnable.

Every config is parsed, checked against the paper's settings, built through the engine's own task
and learner builders, and takes one optimizer step on a random batch of 2. ImageNet ones run at
64x64 (data.image_size): the taps are probed, so the method modules size themselves from channel
counts, which do not depend on the input size. Teacher weights are not on disk here: the learner's
teacher loader is replaced by a recorder and pretrained downloads are turned off.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from diffkd import models
from diffkd.config import Config, TeacherConfig, config_from_dict, config_to_dict, load_config
from diffkd.engine import learner as learner_module
from diffkd.engine.learner import LEARNERS
from diffkd.engine.optim import build_optimizer
from diffkd.engine.schedules import LRSchedule, Timeline
from diffkd.models.registry import TIMM_PREFIX
from diffkd.tasks import build_task

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for root in ("cifar100", "imagenet") for p in (CONFIGS_DIR / root).rglob("*.yaml"))
LOW_CAPACITY = {"mobile_half", "ShuffleV1", "ShuffleV2"}  # CIFAR students trained with lr 0.01
TRAIN_ITEMS = {"cifar100": 50_000, "imagenet": 1_281_167}  # training set sizes (CRD's memory bank has a row each)

# Parameters the methods add, from the fingerprints of the official release (docs/design.md §2).
CIFAR_LOGITS_LEVEL = 352_302
IMAGENET_LOGITS_LEVEL = 23_323_002
EXTRA_PARAMETERS = {
    "cifar100/resnet32x4-resnet8x4/diffkd.yaml": 694_722 + CIFAR_LOGITS_LEVEL,
    "cifar100/wrn40_2-wrn40_1/diffkd.yaml": 248_802 + CIFAR_LOGITS_LEVEL,
    "imagenet/b1/r34-r18/diffkd.yaml": 7_644_418 + IMAGENET_LOGITS_LEVEL,
    "imagenet/b1/r50-mbv1/diffkd_dist.yaml": 11_315_970 + IMAGENET_LOGITS_LEVEL,
}
# The ImageNet DiffKD runs carry 30-35 M method parameters each (a few seconds a step here). The two
# above step in the fast suite; these repeat the same levels with models that other fast configs
# already step, so they run with the slow tests, as do the Swin runs (Swin-L alone has 197 M).
SLOW = {
    "imagenet/b1/r34-r18/diffkd_dist.yaml",
    "imagenet/b1/r50-mbv1/diffkd.yaml",
    "imagenet/b2/r50sb-r34/diffkd.yaml",
    "imagenet/b2/r50sb-mbv2/diffkd.yaml",
    "imagenet/b2/r50sb-effb0/diffkd.yaml",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Many tiny steps: one thread is an order of magnitude faster than several on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative(path: Path) -> str:
    """A config's path under configs/ (its test id)."""
    return str(path.relative_to(CONFIGS_DIR))


def model_names(cfg: Config) -> list[str]:
    """Every registry name a config builds."""
    return [spec.name for spec in (cfg.model, cfg.teacher, cfg.student) if spec is not None]


# ---------------------------------------------------------------- the files


def test_configs_match_their_generator(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("classification_recipes", CONFIGS_DIR / "classification_recipes.py")
    generator = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, generator)  # dataclasses look their module up there
    spec.loader.exec_module(generator)
    assert generator.stale_files() == [], "run: python configs/classification_recipes.py"
    per_table = {"cifar100/": 70, "imagenet/b1/": 16, "imagenet/b2/": 12, "imagenet/b3/": 8}
    assert {root: sum(relative(p).startswith(root) for p in RECIPES) for root in per_table} == per_table


@pytest.fixture(scope="module")
def parsed() -> dict[str, Config]:
    """Every recipe, loaded and checked by the config loader."""
    return {relative(p): load_config(p) for p in RECIPES}


def test_headers_give_the_command_and_the_paper_number(parsed: dict[str, Config]):
    for name, cfg in parsed.items():
        text = (CONFIGS_DIR / name).read_text()
        mode = "distill" if cfg.levels else "train"
        assert f"#   diffkd {mode} configs/{name}\n" in text
        assert ("# Paper Tab. " in text or "# Paper: see Tab. 3." in text or "# Paper: not reported in Tab. 9." in text
                or "# Published (" in text), name


def test_cifar100_recipes_follow_strategy_a1(parsed: dict[str, Config]):
    for name, cfg in parsed.items():
        if not name.startswith("cifar100/"):
            continue
        trained = cfg.student or cfg.model
        assert (cfg.data.name, cfg.data.batch_size, cfg.data.augment) == ("cifar100", 64, None), name
        assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.9, 5e-4), name
        assert cfg.optim.lr == (0.01 if trained.name in LOW_CAPACITY else 0.05), name
        assert (cfg.schedule.name, cfg.schedule.milestones, cfg.schedule.gamma) == ("multistep", [150, 180, 210], 0.1)
        assert cfg.train.epochs == 240


def test_cifar100_students_distil_from_the_teacher_configs_runs(parsed: dict[str, Config]):
    runs = {cfg.model.name: cfg.output.dir for name, cfg in parsed.items() if name.startswith("cifar100/teachers/")}
    distill = {name: cfg for name, cfg in parsed.items() if name.startswith("cifar100/") and cfg.levels}
    pairs = {(cfg.teacher.name, cfg.student.name) for cfg in distill.values()}
    assert pairs == {("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet32x4", "resnet8x4"),
                     ("resnet50_cifar", "mobile_half"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2")}
    for name, cfg in distill.items():
        assert cfg.teacher.checkpoint == runs[cfg.teacher.name], name


STRATEGIES = {
    "imagenet/b1/": {"epochs": 100, "batch": 256, "optim": ("sgd", 0.1, 1e-4), "schedule": "step",
                     "smoothing": 0.0, "ema": 0.0, "augment": (False, 0.0, 0.0, 0.0, 0.0)},
    "imagenet/b2/": {"epochs": 450, "batch": 768, "optim": ("rmsprop", 0.048, 1e-5), "schedule": "exponential",
                     "smoothing": 0.1, "ema": 0.9999, "augment": (True, 0.2, 0.0, 0.0, 0.0)},
    "imagenet/b3/": {"epochs": 300, "batch": 1024, "optim": ("adamw", 5e-4, 0.05), "schedule": "cosine",
                     "smoothing": 0.1, "ema": 0.0, "augment": (True, 0.25, 0.4, 0.8, 1.0)},
}


def test_imagenet_recipes_follow_their_strategy(parsed: dict[str, Config]):
    for name, cfg in parsed.items():
        if not name.startswith("imagenet/"):
            continue
        want = STRATEGIES[name[: len("imagenet/b1/")]]
        d = cfg.data
        assert (cfg.train.epochs, d.batch_size) == (want["epochs"], want["batch"]), name
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == want["optim"], name
        assert cfg.schedule.name == want["schedule"], name
        assert (cfg.train.label_smoothing, cfg.train.ema_decay) == (want["smoothing"], want["ema"]), name
        assert (d.randaugment, d.random_erasing, d.color_jitter, d.mixup, d.cutmix) == want["augment"], name
    b2 = parsed["imagenet/b2/students/r34.yaml"].schedule
    assert (b2.gamma, b2.every_epochs) == (0.97, 2.4)
    b1 = parsed["imagenet/b1/students/r18.yaml"].schedule
    assert (b1.gamma, b1.step_size) == (0.1, 30)


# Baseline options by (config prefix, method), from docs/design.md §5 and the issue.
BASELINES = {
    ("cifar100/", "kd"): {"tau": 4.0},
    ("cifar100/", "dkd"): {"alpha": 1.0, "beta": 8.0, "tau": 4.0, "warmup_epochs": 20},
    ("imagenet/b1/", "kd"): {"tau": 1.0},
    ("imagenet/b1/", "dkd"): {"alpha": 0.5, "beta": 0.5, "tau": 1.0, "warmup_epochs": 1},
    ("imagenet/b1/", "dist"): {"beta": 1.0, "gamma": 1.0, "tau": 1.0},
    ("imagenet/b2/", "kd"): {"tau": 4.0},
    ("imagenet/b3/", "kd"): {"tau": 4.0},
}


def test_baseline_levels_follow_the_paper(parsed: dict[str, Config]):
    for (prefix, method), options in BASELINES.items():
        runs = [cfg for name, cfg in parsed.items() if name.startswith(prefix) and name.endswith(f"/{method}.yaml")]
        assert runs, (prefix, method)
        for cfg in runs:
            [level] = cfg.levels
            assert (level.student, level.method, level.weight, level.options) == ("@logits", method, 1.0, options)


# The CRD paper's CIFAR-100 baselines (RepDistiller's settings): method -> (student tap, weight, options).
CIFAR_BASELINES = {"rkd": ("@feature", 1.0), "pkt": ("@feature", 30000.0), "crd": ("@feature", 0.8)}
STAGES = {"resnet56": ["layer1", "layer2", "layer3"], "resnet20": ["layer1", "layer2", "layer3"],
          "resnet32x4": ["layer1", "layer2", "layer3"], "resnet8x4": ["layer1", "layer2", "layer3"],
          "wrn_40_2": ["block1", "block2", "block3"], "wrn_40_1": ["block1", "block2", "block3"],
          "resnet50_cifar": ["layer1", "layer2", "layer3", "layer4"],
          "mobile_half": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"],
          "ShuffleV1": ["layer1", "layer2", "layer3"], "ShuffleV2": ["layer1", "layer2", "layer3"]}
PUBLISHED = {  # FitNet, VID, RKD, PKT, CRD top-1 (CRD paper, Tab. 1-2)
    "wrn40_2-wrn40_1": (72.24, 73.30, 72.22, 73.45, 74.14), "resnet56-resnet20": (69.21, 70.38, 69.61, 70.34, 71.16),
    "resnet32x4-resnet8x4": (73.50, 73.09, 71.90, 73.64, 75.51), "resnet50-mobilenetv2": (63.16, 67.57, 64.43, 66.52, 69.11),
    "resnet32x4-shufflev1": (73.59, 73.38, 72.28, 74.10, 75.11), "resnet32x4-shufflev2": (73.54, 73.40, 73.21, 74.69, 75.65),
}


def test_cifar100_baselines_follow_the_crd_paper(parsed: dict[str, Config]):
    for pair, numbers in PUBLISHED.items():
        for method, number in zip(("fitnet", "vid", "rkd", "pkt", "crd"), numbers):
            name = f"cifar100/{pair}/{method}.yaml"
            cfg = parsed[name]
            assert f"# Published (CRD paper, Tian et al. ICLR 2020, Tab. 1-2): {number:.2f} top-1.\n" in (
                CONFIGS_DIR / name).read_text()
            [level] = cfg.levels
            if method in CIFAR_BASELINES:
                assert (level.student, level.teacher, level.method, level.weight, level.options) == (
                    *CIFAR_BASELINES[method][:1] * 2, method, CIFAR_BASELINES[method][1], {})
            elif method == "vid":
                assert (level.student, level.teacher, level.weight) == (STAGES[cfg.student.name], STAGES[cfg.teacher.name], 1.0)
            else:  # FitNet: the second stage of each (RepDistiller's hint layer 2), weight 100
                assert (level.method, level.weight) == ("mse", 100.0)
                assert (level.student, level.teacher) == (STAGES[cfg.student.name][1], STAGES[cfg.teacher.name][1])


def test_imagenet_reviewkd_follows_its_reference_settings(parsed: dict[str, Config]):
    r18 = parsed["imagenet/b1/r34-r18/reviewkd.yaml"].levels
    mbv1 = parsed["imagenet/b1/r50-mbv1/reviewkd.yaml"].levels
    stages = ["layer1", "layer2", "layer3", "layer4"]
    assert [(lv.student, lv.teacher, lv.weight, lv.options) for lv in r18] == [(stages, stages, 1.0, {"warmup_epochs": 1})]
    assert [(lv.student, lv.teacher, lv.weight, lv.options) for lv in mbv1] == [
        (["model.3", "model.5", "model.11", "model.13"], stages, 8.0, {"warmup_epochs": 1, "max_mid_channels": 256})]
    assert "# Published (ReviewKD paper, Chen et al. CVPR 2021): 71.61 top-1." in (
        CONFIGS_DIR / "imagenet/b1/r34-r18/reviewkd.yaml").read_text()
    assert "not verified here" in (CONFIGS_DIR / "imagenet/b1/r50-mbv1/reviewkd.yaml").read_text()


def test_diffkd_levels_follow_the_paper(parsed: dict[str, Config]):
    for name, cfg in parsed.items():
        levels = {lv.student: lv for lv in cfg.levels if lv.method == "diffkd"}
        if not levels:
            continue
        feature, logits = levels["@feature"].options, levels["@logits"].options
        assert feature["distance"] == "mse"
        latent = None if name.startswith("cifar100/") else 768 if "swinl" in name else 1024
        assert feature.get("latent_channels") == latent, name
        assert (logits["distance"], logits["tau"]) == ("dist" if name.endswith("diffkd_dist.yaml") else "kl", 1.0)


def test_a_published_cifar_teacher_file_loads_through_teacher_checkpoint(tmp_path: Path):
    """docs/recipes.md: a `{"model": state_dict, ...}` file given as teacher.checkpoint is the teacher."""
    teacher = models.create("wrn_40_2")
    path = tmp_path / "wrn_40_2_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"epoch": 240, "model": teacher.state_dict(), "accuracy": torch.tensor(75.61)}, path)
    recipe = config_to_dict(load_config(CONFIGS_DIR / "cifar100/wrn40_2-wrn40_1/kd.yaml"))
    recipe["teacher"]["checkpoint"] = str(path)
    cfg = config_from_dict(recipe)
    loaded = LEARNERS["distill"](cfg, build_task(cfg)).module.teacher.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in teacher.state_dict().items())


# ---------------------------------------------------------------- building and one step


_BUILT: dict[tuple[str, int | None], torch.nn.Module] = {}


def cached_models(task: Any) -> None:
    """Build each model once per session (weight init dominates); every use gets a fresh copy."""
    build = task.build_model

    def build_model(spec: Any) -> torch.nn.Module:
        key = (spec.name, spec.num_classes)
        if key not in _BUILT:
            _BUILT[key] = build(spec)
        return copy.deepcopy(_BUILT[key])

    task.build_model = build_model


def runnable_config(path: Path) -> Config:
    """The recipe with teacher weights and downloads off, ImageNet at 64x64 (timm is a test requirement)."""
    cfg = load_config(path)
    names = model_names(cfg)
    data = config_to_dict(cfg)
    if cfg.data.name == "imagenet" and not any("swin" in n for n in names):  # timm's Swin needs 224
        data["data"]["image_size"] = 64
    if cfg.teacher is not None:
        data["teacher"].update(pretrained=False, checkpoint=None, sha256=None)
    return config_from_dict(data)


def channels_last_features(learner: Any, cfg: Config) -> list[str]:
    """timm models whose '@feature' capture does not have num_features channels in dim 1 (NHWC maps)."""
    wrong = []
    for spec, level in zip(cfg.levels, learner.module.levels):
        for role in ("student", "teacher"):
            name = getattr(cfg, role).name
            model = getattr(learner.module, role)
            timm_feature = getattr(spec, role) == "@feature" and name.startswith(TIMM_PREFIX)
            if timm_feature and getattr(learner.module, f"{role}_taps")[level.name].shape[1] != model.num_features:
                wrong.append(name)
    return wrong


@pytest.fixture
def recorded_teacher_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[TeacherConfig]]:
    """Replace the learner's teacher-weight loader by a recorder (no checkpoint exists in tests)."""
    calls: list[TeacherConfig] = []
    monkeypatch.setattr(learner_module, "load_teacher_weights", lambda model, spec: calls.append(spec))
    yield calls


STEPPED = [
    pytest.param(p, id=relative(p), marks=[pytest.mark.slow] if relative(p) in SLOW or "swin" in relative(p) else [])
    for p in RECIPES
]


@pytest.mark.integration
@pytest.mark.parametrize("path", STEPPED)
def test_recipe_builds_and_takes_one_step(path: Path, recorded_teacher_loads: list[TeacherConfig]):
    torch.manual_seed(0)
    cfg = runnable_config(path)
    mode = "distill" if cfg.levels else "train"
    task = build_task(cfg)
    cached_models(task)
    shape = task.input_shape
    learner = LEARNERS[mode](cfg, task, dataset_size=TRAIN_ITEMS[cfg.data.name])
    assert recorded_teacher_loads == ([cfg.teacher] if mode == "distill" else [])

    optimizer = build_optimizer(learner.trainable_parameters(), cfg.optim)
    LRSchedule(cfg.schedule, cfg.optim.lr, Timeline(10, cfg.train.epochs)).apply(optimizer, 0)
    learner.set_progress(0.0, cfg.train.epochs)
    learner.module.train()
    classes = task.info.num_classes
    inputs, targets = task.augment_batch(torch.randn(2, *shape), torch.tensor([0, classes - 1]))
    before = [p.detach().clone() for p in learner.student.parameters()]
    indices = torch.tensor([0, TRAIN_ITEMS[cfg.data.name] - 1]) if learner.needs_indices else None
    assert learner.needs_indices == any(lv.method == "crd" for lv in cfg.levels)
    out = learner.compute(learner.module, inputs, targets, indices)
    assert torch.isfinite(out.total), {k: float(v) for k, v in out.terms.items()}
    optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.student.parameters()))

    name = relative(path)
    if name in EXTRA_PARAMETERS:
        assert learner.extra_parameters == EXTRA_PARAMETERS[name]
    assert {"task", *(lv.method for lv in cfg.levels)} == {k.split("_")[0] for k in out.terms}
    if mode == "distill":  # timm (B,H,W,C) maps (Swin) must reach the methods as (B,C,H,W)
        assert channels_last_features(learner, cfg) == []
