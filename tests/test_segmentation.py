"""Segmentation: label mapping, mIoU, dilated backbones, Cityscapes-format data and its errors, mosaics,
the task's loss, and one DiffKD training step of every student on tiny files in the real format."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffkd.config import Config, ConfigError, config_from_dict
from diffkd.segmentation import catalog, labels, mosaic
from diffkd.segmentation import models as seg_models
from diffkd.segmentation.backbones import (
    DilatedMobileNetV2,
    DilatedResNet,
    measure_output_stride,
)
from diffkd.segmentation.miou import confusion_matrix, iou_per_class, metric_key
from diffkd.segmentation.transforms import train_transform
from diffkd.tasks import build_task
from diffkd.tasks.segmentation import MeanIoU

from conftest import needs_fmnist

# The 19 evaluated Cityscapes classes by label id, written out from the dataset's label definitions.
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
             26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- label ids
def test_label_ids_map_to_the_19_train_ids_and_255():
    table = labels.id_to_train_id()
    for label_id in range(34):
        assert int(table[label_id]) == TRAIN_IDS.get(label_id, 255), label_id
    raw = torch.tensor([[7, 26, 0, 33], [9, 24, 23, 1]], dtype=torch.uint8)
    mapped = labels.apply_table(raw, table, "x", "y")
    assert mapped.tolist() == [[0, 13, 255, 18], [255, 11, 10, 255]]
    assert mapped.dtype == torch.int64
    assert labels.CLASSES[0] == "road" and labels.CLASSES[13] == "car" and labels.CLASSES[18] == "bicycle"
    assert len(labels.CLASSES) == 19


def test_unknown_label_values_name_the_file_and_the_values():
    raw = torch.tensor([[7, 34], [200, 7]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"label file a\.png: unknown label values \[34, 200\]; ids are 0\.\.33"):
        labels.apply_table(raw, labels.id_to_train_id(), "label file a.png", "ids are 0..33")
    train = labels.train_id_identity(11)
    assert labels.apply_table(torch.tensor([0, 10, 255], dtype=torch.uint8), train, "", "").tolist() == [0, 10, 255]
    with pytest.raises(ValueError, match=r"unknown label values \[11\]"):
        labels.apply_table(torch.tensor([11], dtype=torch.uint8), train, "f", "w")


# ----------------------------------------------------------------------------- mIoU
def test_miou_from_a_confusion_matrix_computed_by_hand():
    # Ground truth and prediction of 8 pixels in 4 classes; one pixel is ignored (255), class 3 never occurs.
    target = torch.tensor([[0, 0, 1, 1], [2, 255, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 0]])
    # kept (t, p): (0,0) (0,1) (1,1) (1,1) (2,0) (2,2) (0,0) -> rows = truth, columns = prediction
    by_hand = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion_matrix(pred, target, 4), by_hand)
    # IoU = TP / (row + column - TP): class 0: 2/(3+3-2), class 1: 2/(2+3-2), class 2: 1/(2+1-1), class 3: none
    expected = [2 / 4, 2 / 3, 1 / 2]
    iou = iou_per_class(by_hand)
    assert iou[:3].tolist() == pytest.approx(expected) and math.isnan(iou[3])

    metric = MeanIoU(["a", "b", "c", "d"])
    logits = F.one_hot(pred, 4).permute(2, 0, 1)[None].float()  # argmax gives pred
    metric.update({"out": logits, "aux": torch.zeros_like(logits)}, target[None])
    result = metric.compute(lambda m: m)
    assert result["miou"] == pytest.approx(100 * sum(expected) / 3)
    assert result["pixel_acc"] == pytest.approx(100 * 5 / 7)
    assert result["iou_b"] == pytest.approx(100 * 2 / 3) and math.isnan(result["iou_d"])


def test_confusion_matrices_are_summed_over_processes():
    target = torch.randint(0, 3, (2, 6, 5))
    target[0, 0] = 255
    logits = torch.randn(2, 3, 6, 5)
    whole, first, second = MeanIoU("xyz"), MeanIoU("xyz"), MeanIoU("xyz")
    whole.update(logits, target)
    first.update(logits[:1], target[:1])
    second.update(logits[1:], target[1:])
    # `reduce` sums over processes: here process 0 adds what process 1 holds.
    assert first.compute(lambda m: m + second.matrix) == whole.compute(lambda m: m)
    assert first.compute(lambda m: m) != whole.compute(lambda m: m)


def test_metric_keys_are_plain_names():
    assert metric_key("traffic light") == "iou_traffic_light"
    assert metric_key("T-shirt/top") == "iou_t_shirt_top"


# ----------------------------------------------------------------------------- backbones and models
def test_dilated_resnet50_equals_torchvision_with_replace_stride_with_dilation():
    from torchvision.models import resnet50

    reference = resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    ours = DilatedResNet(50).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(stem))))
        assert torch.equal(ours(x)["out"], expected)


def test_dilated_resnet18_has_torchvision_names_and_the_dilation_rule():
    from torchvision.models import resnet18

    reference = {k: v.shape for k, v in resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    net = DilatedResNet(18)
    assert {k: v.shape for k, v in net.state_dict().items()} == reference
    # a dilated stage's first 3x3 conv keeps the previous dilation, every later one uses the stage's
    dilations = {name: m.dilation[0] for name, m in net.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    assert [dilations[f"layer3.{b}.conv{c}"] for b in (0, 1) for c in (1, 2)] == [1, 2, 2, 2]
    assert [dilations[f"layer4.{b}.conv{c}"] for b in (0, 1) for c in (1, 2)] == [2, 4, 4, 4]
    assert all(m.stride == (1, 1) for n, m in net.named_modules() if n.startswith(("layer3", "layer4")) and hasattr(m, "stride"))
    assert measure_output_stride(net) == 8
    assert measure_output_stride(DilatedResNet(18, output_stride=16)) == 16


def test_dilated_mobilenetv2_keeps_torchvision_names():
    from torchvision.models import mobilenet_v2

    reference = {k: v.shape for k, v in mobilenet_v2(weights=None).state_dict().items() if k.startswith("features.")
                 and int(k.split(".")[1]) <= 17}  # fmt: skip
    net = DilatedMobileNetV2()
    assert {k: v.shape for k, v in net.state_dict().items()} == reference
    assert (net.aux_channels, net.out_channels) == (96, 320)
    assert measure_output_stride(net) == 8
    assert measure_output_stride(DilatedMobileNetV2(in_channels=1, width_mult=0.25)) == 8


@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "pspnet_resnet18", "deeplabv3_mobilenetv2", "deeplabv3_resnet101"])
def test_models_give_logits_at_input_size_and_the_default_tap_at_stride_8(name):
    from diffkd.taps import probe_shapes

    model = seg_models.create(name, num_classes=11, in_channels=1, width_mult=0.0625)
    out = model.eval()(torch.randn(2, 1, 64, 48))
    assert out["out"].shape == out["aux"].shape == (2, 11, 64, 48)
    taps = seg_models.default_taps(name)
    shapes = probe_shapes(model, {"logits": taps.logits, "aux": seg_models.AUX_TAP}, input_shape=(1, 64, 48))
    assert shapes["logits"] == shapes["aux"] == (2, 11, 8, 6)


def test_unknown_model_name_lists_the_close_ones():
    with pytest.raises(ValueError, match=r"unknown segmentation model 'deeplabv3_resnet19' \(closest: deeplabv3_resnet18"):
        seg_models.create("deeplabv3_resnet19")


# ----------------------------------------------------------------------------- transforms
def test_train_transform_moves_image_and_label_together():
    torch.manual_seed(0)
    label = torch.randint(0, 5, (20, 30))
    image = torch.stack([label.float(), -label.float()])  # the image encodes its own label
    for _ in range(10):
        img, lab = train_transform(image, label, (24, 36), (1.0, 1.0), flip=True)
        assert img.shape == (2, 24, 36) and lab.shape == (24, 36)
        real = lab != 255
        assert torch.equal(img[0][real], lab[real].float()) and torch.equal(img[1][real], -lab[real].float())
        assert torch.all(img[:, ~real] == 0) and int(real.sum()) == 20 * 30  # padded: zero image, ignored label
    img, lab = train_transform(image, label, (16, 16), (2.0, 2.0), flip=False)
    assert set(lab.unique().tolist()) <= set(label.unique().tolist())


# ----------------------------------------------------------------------------- Cityscapes-format files
def write_cityscapes(root: Path, split: str, city: str, count: int, size=(40, 24), ids=(0, 4, 7, 8, 26), seed=0) -> None:
    """`count` random RGB images and labelIds maps of `size` (width, height) in the Cityscapes layout."""
    rng = np.random.default_rng(seed)
    (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
    (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        stem = f"{city}_{i:06d}_000019"
        image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        label = rng.choice(np.array(ids, dtype=np.uint8), (size[1], size[0]))
        Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        Image.fromarray(label).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def test_cityscapes_folder_reads_pixels_and_maps_ids(tmp_path):
    write_cityscapes(tmp_path, "val", "lindau", 2)
    write_cityscapes(tmp_path, "val", "frankfurt", 1, seed=1)
    data = catalog.build_dataset("cityscapes", "test", str(tmp_path))  # test reads val
    assert len(data) == 3 and data.pairs[0].image.parent.name == "frankfurt"  # sorted by city, then name
    image, label = data[1]
    raw = np.asarray(Image.open(data.pairs[1].image))
    mean, std = torch.tensor(catalog.IMAGENET_MEAN), torch.tensor(catalog.IMAGENET_STD)
    expected = (torch.from_numpy(raw.copy()).permute(2, 0, 1).float() / 255 - mean[:, None, None]) / std[:, None, None]
    assert image.shape == (3, 24, 40) and torch.allclose(image, expected)
    raw_label = torch.from_numpy(np.asarray(Image.open(data.pairs[1].label)).copy()).long()
    assert torch.equal(label, torch.tensor([TRAIN_IDS.get(i, 255) for i in range(256)])[raw_label])


def test_missing_label_file_is_named(tmp_path):
    write_cityscapes(tmp_path, "train", "aachen", 2)
    missing = tmp_path / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 train images have no label file, e\.g\. .*aachen_000001_000019_leftImg8bit\.png needs .*aachen_000001_000019_gtFine_labelIds\.png"):
        catalog.build_dataset("cityscapes", "train", str(tmp_path))


def test_image_label_size_mismatch_is_named(tmp_path):
    write_cityscapes(tmp_path, "train", "aachen", 1)
    label = tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((24, 36), 7, dtype=np.uint8)).save(label)
    with pytest.raises(ValueError, match=r"image .*aachen_000000_000019_leftImg8bit\.png is 40x24 but its label .*labelIds\.png is 36x24 \(width x height\); they must match"):
        catalog.build_dataset("cityscapes", "train", str(tmp_path))


def test_unknown_ids_in_a_label_file_are_named(tmp_path):
    write_cityscapes(tmp_path, "train", "aachen", 1, ids=(7, 34, 99))
    data = catalog.build_dataset("cityscapes", "train", str(tmp_path))
    with pytest.raises(ValueError, match=r"label file .*aachen_000000_000019_gtFine_labelIds\.png: unknown label values \[34, 99\]; Cityscapes labelIds are 0\.\.33"):
        data[0]


def test_missing_folder_and_missing_root_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no images found in .*leftImg8bit/train \(expected leftImg8bit/train/<city>/<name>_leftImg8bit\.png"):
        catalog.build_dataset("cityscapes", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"Cityscapes needs data\.root=/path/to/cityscapes"):
        catalog.build_dataset("cityscapes", "train", None)
    with pytest.raises(ValueError, match=r"unknown segmentation dataset 'cityscape'\. Did you mean 'cityscapes'\?"):
        catalog.build_dataset("cityscape", "train", str(tmp_path))


# ----------------------------------------------------------------------------- mosaics
def test_mosaic_labels_are_item_class_plus_one_on_nonzero_pixels():
    item = torch.zeros(1, 28, 28, dtype=torch.uint8)
    item[0, 5:20, 3:9] = torch.arange(1, 91, dtype=torch.uint8).view(15, 6)
    spec = mosaic.MosaicSpec(grid=3, cell=30, fill=1.0)
    image, label = mosaic.compose(item, torch.tensor([6]), spec, torch.Generator().manual_seed(0))
    assert image.shape == label.shape == (90, 90)
    assert torch.equal(label, torch.where(image > 0, 7, 0).to(torch.uint8))
    assert int((image > 0).sum()) == 9 * 90  # one item in each of the 3x3 cells
    again = mosaic.compose(item, torch.tensor([6]), spec, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], image) and torch.equal(again[1], label)


def test_mosaic_spec_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="cell must be at least 28 pixels"):
        mosaic.MosaicSpec(cell=20).check()


@needs_fmnist
def test_mosaic_set_is_deterministic_and_in_cityscapes_format(tmp_path):
    spec = mosaic.MosaicSpec(train=4, val=3)
    mosaic.generate(tmp_path / "a", spec)
    mosaic.generate(tmp_path / "b", spec)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 2 * (4 + 3)
    assert Path("gtFine/val/fashion/fashion_000002_000000_gtFine_labelTrainIds.png") in files
    for f in files:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / f)), np.asarray(Image.open(tmp_path / "b" / f)))
    data = catalog.build_dataset("fmnist_mosaic", "val", str(tmp_path / "a"))
    image, label = data[0]
    assert image.shape == (1, 64, 64) and label.shape == (64, 64)
    raw = torch.from_numpy(np.asarray(Image.open(data.pairs[0].image)).copy())
    assert torch.equal(label > 0, raw > 0) and int(label.max()) <= 10
    with pytest.raises(FileExistsError, match="exists; remove it or choose another folder"):
        mosaic.generate(tmp_path / "a", spec)


# ----------------------------------------------------------------------------- the task and the engine
def seg_config(root: Path, mode: str, student: str = "deeplabv3_resnet18", **sections) -> Config:
    """A tiny segmentation run on `root` (Cityscapes format), networks at width 1/16, on CPU."""
    data = {
        "task": "segmentation",
        "data": {"name": "cityscapes", "root": str(root), "batch_size": 2},
        "segmentation": {"crop_size": [32, 48], "scale_range": [0.5, 2.0], "width_mult": 0.0625},
        "optim": {"name": "sgd", "lr": 0.01},
        "schedule": {"name": "poly", "power": 0.9},
        "train": {"epochs": 1, "device": "cpu", "progress": False, "log_every": 1},
        "output": {"dir": str(root / "run"), "tensorboard": False},
    }
    if mode == "train":
        data["model"] = {"name": student}
    else:
        data["teacher"] = {"name": "deeplabv3_resnet101", "checkpoint": str(root / "teacher.pt")}
        data["student"] = {"name": student}
        data["levels"] = [{"student": "@logits", "teacher": "@logits", "method": "diffkd", "options": {"distance": "dist"}}]
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return config_from_dict(data)


def test_teacher_width_mult_sizes_the_teacher_only(tmp_path):
    cfg = seg_config(tmp_path, "distill", segmentation={"teacher_width_mult": 0.125})
    task = build_task(cfg)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    teacher, student = task.build_model(cfg.teacher), task.build_model(cfg.student)
    assert n_params(teacher) == n_params(seg_models.create("deeplabv3_resnet101", num_classes=19, width_mult=0.125))
    assert n_params(student) == n_params(seg_models.create("deeplabv3_resnet18", num_classes=19, width_mult=0.0625))
    unset = seg_config(tmp_path, "distill")  # null: the teacher follows width_mult
    assert n_params(build_task(unset).build_model(unset.teacher)) == n_params(
        seg_models.create("deeplabv3_resnet101", num_classes=19, width_mult=0.0625))


@pytest.mark.parametrize("key,value,message", [
    ("width_mult", 0.0, "segmentation.width_mult: must be more than 0, got 0.0"),
    ("teacher_width_mult", -1.0, "segmentation.teacher_width_mult: must be more than 0 (or null: width_mult), got -1.0"),
    ("aux_weight", -0.4, "segmentation.aux_weight: must be 0 or more (0 drops the aux head), got -0.4"),
])
def test_segmentation_sizes_out_of_range_are_refused(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        seg_config(tmp_path, "train", segmentation={key: value})


def test_task_loss_is_cross_entropy_plus_0_4_aux_with_ignored_pixels(tmp_path):
    task = build_task(seg_config(tmp_path, "train"))
    torch.manual_seed(0)
    out, aux = torch.randn(2, 19, 3, 4), torch.randn(2, 19, 3, 4)
    target = torch.randint(0, 19, (2, 3, 4))
    target[0, 0, :2] = 255

    def ce(logits: torch.Tensor) -> float:  # mean over kept pixels of -log softmax at the target class
        logp = logits.log_softmax(1).permute(0, 2, 3, 1)
        kept = target != 255
        return float(-logp[kept].gather(1, target[kept][:, None]).mean())

    assert float(task.loss({"out": out, "aux": aux}, target)) == pytest.approx(ce(out) + 0.4 * ce(aux), rel=1e-6)
    assert task.main_metric == "miou" and task.input_shape == (3, 64, 64)


def test_poly_schedule_follows_its_formula():
    from diffkd.config import ScheduleConfig
    from diffkd.engine.schedules import LRSchedule, Timeline

    schedule = LRSchedule(ScheduleConfig(name="poly", power=0.9, min_lr=1e-4), 0.02, Timeline(10, 4))
    for step in (0, 1, 17, 39):
        assert schedule.lr(step) == pytest.approx(1e-4 + (0.02 - 1e-4) * (1 - step / 40) ** 0.9)


@pytest.mark.integration
@pytest.mark.parametrize("student", ["deeplabv3_resnet18", "pspnet_resnet18", "deeplabv3_mobilenetv2"])
def test_one_diffkd_training_step_of_each_student_on_cityscapes_files(tmp_path, student):
    from torch.utils.data import default_collate

    from diffkd.engine.learner import DistillLearner

    write_cityscapes(tmp_path, "train", "aachen", 2, size=(56, 40))
    cfg = seg_config(tmp_path, "distill", student)
    task = build_task(cfg)
    torch.manual_seed(0)
    torch.save(task.build_model(cfg.teacher).state_dict(), tmp_path / "teacher.pt")
    learner = DistillLearner(cfg, task)
    data = task.build_dataset("train")
    inputs, targets = default_collate([data[0], data[1]])
    assert inputs.shape == (2, 3, 32, 48) and targets.shape == (2, 32, 48)
    teacher_before = {k: v.clone() for k, v in learner.module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in learner.student.state_dict().items()}
    optimizer = torch.optim.SGD(learner.trainable_parameters(), lr=0.01, momentum=0.9)
    learner.module.train()
    step = learner.compute(learner.module, inputs, targets)
    assert set(step.terms) == {"task", "diffkd_logits/kd", "diffkd_logits/diffusion"}
    assert torch.isfinite(step.total) and float(step.terms["diffkd_logits/kd"].detach()) > 0
    optimizer.zero_grad()
    step.total.backward()
    projector = learner.module.methods["diffkd_logits"].diffkd.projector.weight
    assert projector.grad is not None and float(projector.grad.abs().sum()) > 0
    optimizer.step()
    student_after, teacher_after = learner.student.state_dict(), learner.module.teacher.state_dict()
    assert any(not torch.equal(v, student_after[k]) for k, v in student_before.items())
    assert all(torch.equal(v, teacher_after[k]) for k, v in teacher_before.items())


# ----------------------------------------------------------------------------- recipes
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "segmentation"
CITYSCAPES_TRAIN_IMAGES = 2975
STUDENTS = {
    f"cityscapes_{stem}_{method}.yaml": student
    for stem, student in {
        "deeplabv3_r18": ("deeplabv3_resnet18", True),
        "deeplabv3_r18_scratch": ("deeplabv3_resnet18", False),
        "pspnet_r18": ("pspnet_resnet18", True),
        "deeplabv3_mbv2": ("deeplabv3_mobilenetv2", True),
    }.items()
    for method in ("diffkd", "cwd")
}
LEVEL = {"diffkd": ("diffkd", 1.0, {"distance": "dist"}), "cwd": ("cwd", 3.0, {"tau": 4.0})}  # (method, weight, options)


@pytest.mark.parametrize("name", ["cityscapes_teacher_deeplabv3_r101.yaml", *STUDENTS])
def test_cityscapes_recipes_follow_the_paper_setting(name):
    from diffkd.config import load_config

    cfg = load_config(RECIPES / name)
    assert (cfg.task, cfg.data.name, cfg.data.batch_size) == ("segmentation", "cityscapes", 16)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.02, 0.9, 5e-4)
    assert (cfg.schedule.name, cfg.schedule.power, cfg.schedule.min_lr) == ("poly", 0.9, 1e-4)
    s = cfg.segmentation
    assert (s.crop_size, s.scale_range, s.flip, s.aux_weight, s.width_mult) == ([512, 1024], [0.5, 2.0], True, 0.4, 1.0)
    iterations = cfg.train.epochs * (CITYSCAPES_TRAIN_IMAGES // cfg.data.batch_size)  # the last partial batch is dropped
    assert abs(iterations - 40_000) < CITYSCAPES_TRAIN_IMAGES // cfg.data.batch_size
    if cfg.model is not None:
        assert (cfg.model.name, cfg.model.pretrained) == ("deeplabv3_resnet101", True)
        return
    assert (cfg.student.name, cfg.student.pretrained) == STUDENTS[name]
    assert cfg.teacher.name == "deeplabv3_resnet101"
    [level] = cfg.levels
    assert (level.student, level.teacher) == ("classifier", "classifier")
    assert (level.method, level.weight, level.options) == LEVEL[name.removesuffix(".yaml").rsplit("_", 1)[1]]


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("mosaic_*.yaml")))
def test_mosaic_recipes_name_registered_models_and_methods(name):
    from diffkd.config import load_config
    from diffkd.methods import METHODS

    cfg = load_config(RECIPES / name)
    assert cfg.data.name == "fmnist_mosaic" and cfg.segmentation.crop_size == [64, 64]
    for spec in (cfg.model, cfg.teacher, cfg.student):
        assert spec is None or spec.name in seg_models.MODELS
    assert all(level.method in METHODS for level in cfg.levels)
