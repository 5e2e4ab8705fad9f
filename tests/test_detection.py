"""Detection: detectors and their taps, COCO-format data and its errors, mosaics, COCO AP, regression KD.

The attention-weighted MSE used on FPN levels is checked against its formula in
tests/test_losses.py::test_attention_mse; here we only check that a DiffKD level uses it.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from diffkd.config import Config, ConfigError, config_from_dict, load_config
from diffkd.detection.coco import Categories, CocoDetectionSet, collate, find_split, hflip, open_coco, open_split
from diffkd.detection.evaluator import CocoAP, coco_box_ap, format_table
from diffkd.detection.models import available, build_detector, parse_name
from diffkd.detection.mosaics import MosaicSpec, ensure_mosaics
from diffkd.detection.pretrained import check_category_names, narrow_classes
from diffkd.boxes import from_torchvision
from diffkd.losses import NamedDistance, attention_mse_loss
from diffkd.methods import build_method
from diffkd.module import DiffKD
from diffkd.engine.learner import LEARNERS
from diffkd.taps import FeatureTaps
from diffkd.tasks import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}]


def write_split(root: Path, split: str, images: list[list[tuple[list[float], int]]], size: int = 64,
                categories: list[dict] | None = None) -> Path:
    """A COCO-format split: one image per entry (bright rectangles on noise), boxes given as xywh."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(len(images))
    doc = {"images": [], "annotations": [], "categories": categories or CATEGORIES}
    for image_id, boxes in enumerate(images, start=1):
        pixels = (torch.rand(size, size, 3, generator=generator) * 60).to(torch.uint8)
        for (x, y, w, h), category in boxes:
            pixels[int(y) : int(y + h), int(x) : int(x + w)] = 200 if category == 3 else 120
            doc["annotations"].append({
                "id": len(doc["annotations"]) + 1, "image_id": image_id, "category_id": category,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })  # fmt: skip
        Image.fromarray(pixels.numpy()).save(root / split / f"{image_id}.png")
        doc["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": size, "height": size})
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc))
    return path


TRAIN = [
    [([4, 6, 20, 20], 3), ([34, 30, 12, 28], 7)],
    [([30, 4, 24, 24], 3)],
    [],  # no annotations: skipped for training, kept for evaluation
    [([8, 36, 14, 22], 7), ([40, 40, 18, 18], 3)],
]


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    write_split(tmp_path, "train", TRAIN)
    write_split(tmp_path, "val", TRAIN[:3])
    return tmp_path


# ------------------------------------------------------------------------------------- models, taps
def test_names_parse_and_unknown_name_suggests():
    assert len(available()) == 18
    parsed = parse_name("fcos_resnext101_32x8d_fpn")
    assert (parsed.family_name, parsed.backbone) == ("fcos", "resnext101_32x8d")
    with pytest.raises(ValueError, match="closest: retinanet_resnet50_fpn"):
        parse_name("retinanet_resnet05_fpn")


@pytest.mark.parametrize(
    "name, strides",
    [("retinanet_resnet18_fpn", (8, 16, 32, 64, 128)), ("fasterrcnn_resnet18_fpn", (4, 8, 16, 32, 64))],
)
def test_taps_resolve_fpn_levels_by_key(name: str, strides: tuple[int, ...]):
    torch.manual_seed(0)
    model = build_detector(name, 3, min_size=128, max_size=128).eval()
    taps = parse_name(name).level_taps()
    assert taps[0] == "backbone['0']"
    with FeatureTaps(model, dict(zip(taps, taps))) as captured, torch.no_grad():
        features = model.backbone(torch.rand(2, 3, 128, 128))
        shapes = {t: captured[t].shape for t in taps}
    for (key, feature), tap, stride in zip(features.items(), taps, strides):
        assert tap == f"backbone[{key!r}]"
        assert shapes[tap] == feature.shape == (2, 256, 128 // stride, 128 // stride)


@pytest.mark.parametrize("family, anchors", [("retinanet", 9), ("fcos", 1)])
def test_regression_tap_gives_b_n_4(family: str, anchors: int):
    torch.manual_seed(0)
    name = f"{family}_resnet18_fpn"
    model = build_detector(name, 3, min_size=64, max_size=64).eval()
    spec = parse_name(name).family.regression
    with FeatureTaps(model, {"reg": spec}) as captured, torch.no_grad():
        model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)])
        cells = sum((64 // s) ** 2 for s in (8, 16, 32, 64)) + 1  # P7 of a 64 px image is 1x1
        assert captured["reg"].shape == (2, cells * anchors, 4)
    assert parse_name("fasterrcnn_resnet50_fpn").family.regression is None
    assert "own RPN proposals" in parse_name("fasterrcnn_resnet50_fpn").family.regression_note


def test_small_canvas_is_not_upscaled():
    model = build_detector("fcos_resnet18_fpn", 3, min_size=96, max_size=96).eval()
    images, _ = model.transform([torch.rand(3, 96, 96)])
    assert images.tensors.shape[-2:] == (96, 96)


def test_narrowing_a_classifier_keeps_the_chosen_rows():
    torch.manual_seed(0)
    keep = [0, 3, 5, 7]
    model = build_detector("fcos_resnet18_fpn", 8, min_size=64, max_size=64).eval()
    features = list(model.backbone(torch.rand(1, 3, 64, 64)).values())
    before = model.head.classification_head(features)
    narrow_classes(model, "fcos", keep)
    assert torch.allclose(model.head.classification_head(features), before[..., keep])
    model = build_detector("fasterrcnn_resnet18_fpn", 8, min_size=64, max_size=64)
    x = torch.randn(3, 1024)
    scores, deltas = model.roi_heads.box_predictor(x)
    narrow_classes(model, "fasterrcnn", keep)
    scores2, deltas2 = model.roi_heads.box_predictor(x)
    assert torch.allclose(scores2, scores[:, keep])
    assert torch.allclose(deltas2.view(3, -1, 4), deltas.view(3, -1, 4)[:, keep])


def test_pretrained_category_names_must_match():
    coco_like = ["__background__", "person", "bicycle", "car"]
    check_category_names(Categories((1, 3), ("person", "car")), coco_like, "m")
    with pytest.raises(ValueError, match="category ids do not match.*id 2 is 'car' in the file but 'bicycle'"):
        check_category_names(Categories((1, 2), ("person", "car")), coco_like, "m")


# ------------------------------------------------------------------------------------- methods
def test_regression_l1_is_mean_absolute_difference():
    s = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]]])
    t = torch.tensor([[[1.0, 1.0, 0.0, 3.0], [0.0, 3.0, 1.0, 1.0]]])
    method = build_method("regression_l1", s.shape, t.shape)
    expected = (1 + 0 + 2 + 0 + 1 + 2 + 0 + 0) / 8
    assert method(s, t).terms["regression_l1"].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="same shape"):
        build_method("regression_l1", torch.Size([1, 10, 4]), torch.Size([1, 12, 4]))


def test_fpn_level_diffkd_uses_attention_mse():
    torch.manual_seed(0)
    level = DiffKD(256, 256, distance=NamedDistance("attention_mse", 0.5))
    assert sum(p.numel() for p in level.parameters()) == 694_722  # one FPN level, no AE (docs/design.md §2)
    out = level(torch.randn(2, 256, 8, 8), torch.randn(2, 256, 8, 8))
    assert out.kd_loss.item() == pytest.approx(attention_mse_loss(out.denoised, out.target, tau=0.5).item(), rel=1e-6)


# ------------------------------------------------------------------------------------- data
def test_split_reads_targets_with_contiguous_labels(coco_root: Path):
    train = CocoDetectionSet(open_split(coco_root, "train"), train=True)
    assert train.categories == Categories((3, 7), ("square", "bar"))
    assert train.categories.num_classes == 3
    assert len(train) == 3  # the image without annotations is skipped for training
    image, target = train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert torch.equal(target["boxes"], torch.tensor([[4.0, 6, 24, 26], [34, 30, 46, 58]]))
    assert torch.equal(target["labels"], torch.tensor([1, 2]))  # category 3 -> 1, category 7 -> 2
    assert int(target["image_id"]) == 1
    evaluation = CocoDetectionSet(open_split(coco_root, "test"), train=False)
    assert len(evaluation) == 3 and evaluation[2][1]["boxes"].shape == (0, 4)  # kept for evaluation
    images, targets = collate([train[0], train[1]])
    assert len(images) == len(targets) == 2 and targets[1]["labels"].tolist() == [1]


def test_flip_mirrors_boxes():
    image = torch.zeros(3, 4, 10)
    image[..., 1] = 1
    flipped, target = hflip(image, {"boxes": torch.tensor([[1.0, 0, 3, 2]]), "labels": torch.tensor([1])})
    assert flipped[0, 0].tolist() == [0] * 8 + [1, 0]
    assert target["boxes"].tolist() == [[7.0, 0, 9, 2]]


def test_missing_annotation_file_names_what_was_looked_for(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"no annotation file for the test split.*instances_val2017\.json"):
        find_split(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="annotation file .*nothing.json does not exist"):
        open_coco(tmp_path, tmp_path / "nothing.json")


def test_malformed_annotation_files(tmp_path: Path):
    path = tmp_path / "a.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="a.json is not valid JSON"):
        open_coco(tmp_path, path)
    path.write_text(json.dumps({"images": [], "categories": CATEGORIES}))
    with pytest.raises(ValueError, match="has no annotations list"):
        open_coco(tmp_path, path)


def test_annotation_with_unknown_category_is_refused(coco_root: Path):
    path = coco_root / "annotations" / "instances_train.json"
    doc = json.loads(path.read_text())
    doc["annotations"][1]["category_id"] = 5
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"categories \[3, 7\]: \[annotation 2 \(image 1\): category_id 5\]"):
        CocoDetectionSet(open_split(coco_root, "train"), train=True)


def test_train_and_val_categories_must_match(coco_root: Path):
    write_split(coco_root, "val", TRAIN[1:2], categories=[{"id": 3, "name": "square"}, {"id": 8, "name": "bar"}])
    train = Categories.from_coco(CATEGORIES)
    val = CocoDetectionSet(open_split(coco_root, "test"), train=False).categories
    with pytest.raises(ValueError, match=r"category ids do not match.*only in the first \[7 'bar'\]; only in the second \[8 'bar'\]"):
        train.check_same(val, "train", "val")


def test_empty_and_corrupt_image_files(coco_root: Path):
    (coco_root / "train" / "2.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1 image file\(s\) listed in .* are empty \(0 bytes\): \[.*train/2\.png\]"):
        CocoDetectionSet(open_split(coco_root, "train"), train=True)
    (coco_root / "train" / "2.png").write_bytes(b"not a png at all")
    train = CocoDetectionSet(open_split(coco_root, "train"), train=True)
    with pytest.raises(ValueError, match=r"image file .*train/2\.png \(image id 2\) cannot be read as an image"):
        train[1]
    (coco_root / "train" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) .* do not exist: \[.*train/2\.png\]"):
        CocoDetectionSet(open_split(coco_root, "train"), train=True)


# ------------------------------------------------------------------------------------- evaluation
def gt_coco(tmp_path: Path, images: list[list[tuple[list[float], int]]]):
    return open_coco(tmp_path, write_split(tmp_path, "val", images, size=64)).coco


def add(ap: CocoAP, image_id: int, boxes_xyxy: list[list[float]], scores: list[float], labels: list[int]) -> None:
    """One image's detections, as a detector in eval mode returns them."""
    detection = {"boxes": torch.tensor(boxes_xyxy).reshape(-1, 4), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}
    ap.update([detection], [{"image_id": torch.tensor(image_id)}])


def local(t: torch.Tensor) -> torch.Tensor:
    """The sum over one process."""
    return t


def test_ap_is_one_when_predictions_equal_the_ground_truth(tmp_path: Path):
    images = [[([4, 6, 20, 20], 3), ([30, 30, 40, 40], 7)], [([10, 10, 12, 30], 7)]]  # small, medium, small
    ap = CocoAP(gt_coco(tmp_path, images), category_ids=[3, 7])
    for image_id, boxes in enumerate(images, start=1):
        xyxy = [[x, y, x + w, y + h] for (x, y, w, h), _ in boxes]
        add(ap, image_id, xyxy, [1.0] * len(boxes), [1 if c == 3 else 2 for _, c in boxes])
    metrics = ap.compute(local)
    assert {k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm")} == pytest.approx(dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm"), 100.0))
    assert math.isnan(metrics["APl"])  # no large object in the ground truth
    assert "| ours | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | - |" in format_table({"ours": metrics})


def test_ap_of_a_hand_computed_case(tmp_path: Path):
    # Two ground-truth boxes of one class. Detections by score: exact hit on box A (0.9), a false
    # positive (0.8), then box B hit with IoU 0.72 (0.7): a true positive for IoU thresholds
    # 0.50 ... 0.70 (5 of 10), a false positive for 0.75 ... 0.95.
    # TP case: precision/recall points (1, 0.5), (0.5, 0.5), (2/3, 1.0); interpolated precision is
    # 1 for recall <= 0.5 (51 of the 101 recall points) and 2/3 above (50 points).
    # FP case: precision 1 up to recall 0.5 (51 points), 0 beyond.
    gt = gt_coco(tmp_path, [[([0, 0, 10, 10], 3), ([30, 30, 10, 10], 3)]])
    ap = CocoAP(gt, category_ids=[3, 7])
    add(ap, 1, [[0, 0, 10, 10], [50, 50, 60, 60], [30, 30, 40, 37.2]], [0.9, 0.8, 0.7], [1, 1, 1])
    tp_case, fp_case = (51 + 50 * 2 / 3) / 101, 51 / 101
    metrics = ap.compute(local)
    assert metrics["AP50"] == pytest.approx(100 * tp_case, abs=1e-6)
    assert metrics["AP75"] == pytest.approx(100 * fp_case, abs=1e-6)
    assert metrics["AP"] == pytest.approx(100 * (5 * tp_case + 5 * fp_case) / 10, abs=1e-6)
    assert metrics["APs"] == pytest.approx(metrics["AP"])  # both boxes are small (area 100 < 32^2)
    assert coco_box_ap(gt, [], [1])["AP"] == 0.0  # no detections at all


# ------------------------------------------------------------------------------------- mosaics
def test_mosaics_are_deterministic_and_boxes_are_item_extents(tmp_path: Path):
    spec = MosaicSpec(canvas=64, train_images=6, val_images=2, max_scale=2.0, seed=3)
    first, second = ensure_mosaics(tmp_path / "a", spec), ensure_mosaics(tmp_path / "b", spec)
    for name in ("annotations/instances_train.json", "annotations/instances_val.json", "train/000004.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    doc = json.loads((first / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in doc["categories"]] == list(range(1, 11)) and doc["categories"][9]["name"] == "Ankle boot"
    for image in doc["images"]:
        pixels = torch.from_numpy(__import__("numpy").array(Image.open(first / "train" / image["file_name"])))
        covered = torch.zeros_like(pixels, dtype=torch.bool)
        for a in (a for a in doc["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = (int(v) for v in a["bbox"])
            crop = pixels[y : y + h, x : x + w]
            # the box is tight: each of its four border lines holds a nonzero pixel
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
            covered[y : y + h, x : x + w] = True
        assert not pixels[~covered].any()  # nothing drawn outside the boxes
    assert ensure_mosaics(first, spec) == first  # reused as it is
    with pytest.raises(ValueError, match="holds mosaics of another spec .*seed: 3 there, 4 asked"):
        ensure_mosaics(first, MosaicSpec(canvas=64, train_images=6, val_images=2, max_scale=2.0, seed=4))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no mosaics.json"):
        ensure_mosaics(tmp_path / "other", spec)


def test_detections_are_gathered_with_a_sum_over_processes(monkeypatch: pytest.MonkeyPatch):
    # Pretend to be rank 1 of 2; rank 0 holds rows a (2 rows), we hold b (1 row). The fake all-reduce
    # adds what rank 0 contributes: its count in slot 0, its rows at the start of the buffer.
    from diffkd.detection import evaluator

    a, b = torch.arange(14, dtype=torch.float64).view(2, 7), torch.full((1, 7), -1.0, dtype=torch.float64)
    monkeypatch.setattr(evaluator, "_rank_and_world", lambda: (1, 2))
    rank0 = iter([torch.tensor([2.0, 0.0], dtype=torch.float64), torch.cat([a, torch.zeros(1, 7, dtype=torch.float64)])])
    gathered = evaluator.gather_rows(b, lambda t: t + next(rank0))
    assert torch.equal(gathered, torch.cat([a, b]))


# ------------------------------------------------------------------------------------- the task plug-in
# Faster R-CNN samples fewer RoIs here so one CPU step stays short; the architecture is unchanged.
SMALL_RCNN = {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50, "rpn_pre_nms_top_n_train": 100,
              "rpn_post_nms_top_n_train": 50, "box_batch_size_per_image": 32}
LEVELS = {"fasterrcnn": ["0", "1", "2", "3", "pool"], "retinanet": ["0", "1", "2", "p6", "p7"], "fcos": ["0", "1", "2", "p6", "p7"]}


def detection_config(root: Path, tmp_path: Path, family: str, **sections: Any) -> Config:
    """Distil <family>_resnet18_fpn into itself on the test's COCO files, resized to 32 px, batch 2, CPU."""
    name = f"{family}_resnet18_fpn"
    levels = [{"name": f"p{i}", "student": f"backbone[{key!r}]", "teacher": f"backbone[{key!r}]", "method": "diffkd",
               "options": {"distance": "attention_mse", "tau": 0.5, "kd_weight": 5.0}} for i, key in enumerate(LEVELS[family])]
    regression = parse_name(name).family.regression
    if regression is not None:
        levels.append({"name": "regression_kd", "student": regression, "teacher": regression, "method": "regression_l1"})
    data = {
        "task": "detection",
        "data": {"name": "coco", "root": str(root), "batch_size": 2},
        "detection": {"min_size": 32, "max_size": 32, "options": SMALL_RCNN if family == "fasterrcnn" else {}},
        "teacher": {"name": name, "checkpoint": str(tmp_path / "teacher.pt")},
        "student": {"name": name},
        "levels": levels,
        "train": {"device": "cpu", "progress": False},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        **sections,
    }
    return config_from_dict(data)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["fasterrcnn", "retinanet", "fcos"])
def test_one_distillation_step_per_detector_family(coco_root: Path, tmp_path: Path, family: str):
    torch.manual_seed(0)
    cfg = detection_config(coco_root, tmp_path, family)
    task = build_task(cfg)
    torch.save(task.build_model(cfg.teacher).state_dict(), tmp_path / "teacher.pt")
    learner = LEARNERS["distill"](cfg, task)
    train = task.build_dataset("train")
    inputs, targets = task.to_device(task.collate_fn([train[0], train[1]]), torch.device("cpu"))
    assert task.batch_size(inputs) == 2
    learner.module.train()
    out = learner.compute(learner.module, inputs, targets)
    expected = {"task", *(f"p{i}/{t}" for i in range(5) for t in ("kd", "diffusion"))}
    assert set(out.terms) == expected | ({"regression_kd"} if family != "fasterrcnn" else set())
    assert out.total.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-5)
    out.total.backward()
    student_grads = [p.grad for p in learner.student.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in student_grads)
    assert all(p.grad is None for p in learner.module.teacher.parameters())  # the teacher learns nothing
    level = learner.module.methods["p0"].diffkd
    assert level.noise_predictor.layers[-2].weight.grad.abs().sum() > 0


@pytest.mark.integration
def test_fgd_step_through_the_engine_on_resized_images(coco_root: Path, tmp_path: Path):
    """FGD's declared input `boxes` reaches it from the student's transform through the learner; the 64 px
    images are resized to 32 px, and the boxes in the frame of the padded batch."""
    torch.manual_seed(0)
    levels = [{"name": f"fgd_{key}", "student": f"backbone[{key!r}]", "teacher": f"backbone[{key!r}]", "method": "fgd",
               "options": {"family": "fcos"}} for key in LEVELS["fcos"]]
    cfg = detection_config(coco_root, tmp_path, "fcos", levels=levels)
    task = build_task(cfg)
    torch.save(task.build_model(cfg.teacher).state_dict(), tmp_path / "teacher.pt")
    learner = LEARNERS["distill"](cfg, task)
    train = task.build_dataset("train")
    inputs, targets = task.to_device(task.collate_fn([train[0], train[1]]), torch.device("cpu"))
    learner.module.train()
    out = learner.compute(learner.module, inputs, targets)
    assert set(out.terms) == {"task", *(f"fgd_{k}/{t}" for k in LEVELS["fcos"] for t in ("fg", "bg", "attention", "global"))}
    assert all(torch.isfinite(v) for v in out.terms.values())
    boxes = from_torchvision(learner.module.student_taps.output("fgd_0/boxes"))
    assert boxes.frame == (32, 32)
    assert torch.allclose(boxes.per_image[0], targets[0]["boxes"] * 0.5)  # 64 px images, resized by 1/2


def test_task_errors(coco_root: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="data.name: the detection task reads coco, fashion_mosaics, got 'cifar100'"):
        build_task(detection_config(coco_root, tmp_path, "fcos", data={"name": "cifar100"}))
    with pytest.raises(ConfigError, match="data.root: required for data.name=coco"):
        build_task(detection_config(coco_root, tmp_path, "fcos", data={"name": "coco"})).root
    task = build_task(detection_config(coco_root, tmp_path, "fcos", student={"name": "fcos_resnet18_fpn", "num_classes": 91}))
    with pytest.raises(ConfigError, match=r"num_classes of 'fcos_resnet18_fpn' is 91, but the annotation files have 2 categories"):
        task.build_model(task.cfg.student)
    write_split(coco_root, "val", TRAIN[1:2], categories=[{"id": 3, "name": "square"}, {"id": 8, "name": "bar"}])
    task = build_task(detection_config(coco_root, tmp_path, "fcos"))
    with pytest.raises(ValueError, match="category ids do not match between .*instances_train.json and .*instances_val.json"):
        task.build_dataset("train")


@functools.cache
def small_detector(family: str) -> torch.nn.Module:
    """A 64 px ResNet-18 detector of a family: the same module tree as its recipes' models above the backbone body."""
    return build_detector(f"{family}_resnet18_fpn", 3, min_size=64, max_size=64).eval()


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipes_parse_and_their_taps_exist(path: Path):
    cfg = load_config(path)
    assert cfg.task == "detection"
    names = [spec.name for spec in (cfg.model, cfg.teacher, cfg.student) if spec is not None]
    families = {parse_name(name).family_name for name in names}
    assert len(families) == 1  # teacher and student of one family: same anchors, same FPN keys
    if cfg.levels:
        model = small_detector(families.pop())
        taps = {f"{lv.name}/{side}": getattr(lv, side) for lv in cfg.levels for side in ("student", "teacher")}
        with torch.no_grad(), FeatureTaps(model, taps) as captured:
            model([torch.rand(3, 64, 64)])
            assert all(captured[name].shape[0] == 1 for name in taps)
        kd = [lv for lv in cfg.levels if lv.method == "diffkd"]
        if path.stem.endswith("_diffkd"):  # the FGD recipes are checked in tests/test_fgd.py
            assert len(kd) == 5 and all(lv.options == {"distance": "attention_mse", "tau": 0.5, "kd_weight": 5.0} for lv in kd)
        else:
            assert not kd


def test_benchmark_methods_build_their_configs(tmp_path: Path):
    """Every benchmark method's overrides apply to its recipe; diffkd_norm keeps the paper's kd weight 5."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import detection as bench

    args = bench.parse_args(["--out", str(tmp_path)])
    configs = {
        name: bench.make_config(file, args, tmp_path / name, tmp_path / "data", 0, 1,
                                tmp_path / "teacher" if mode == "distill" else None, extra)
        for name, (file, mode, extra) in bench.METHODS.items()
    }
    kd = [lv.options for lv in configs["diffkd_norm"].levels if lv.method == "diffkd"]
    assert len(kd) == 5 and all(o["normalize_target"] is True and o["kd_weight"] == 5.0 for o in kd)
    assert all("normalize_target" not in lv.options for lv in configs["diffkd"].levels)


@pytest.mark.slow
def test_benchmark_end_to_end_at_a_tiny_size(tmp_path: Path):
    """The whole pipeline through the engine and the mosaic recipes: generate, train the teacher, train the
    student alone, distil with DiffKD, evaluate with COCO AP, resume the finished runs, write the report."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import detection as bench

    args = ["--out", str(tmp_path), "--canvas", "64", "--train-images", "8", "--val-images", "4", "--student-images", "8",
            "--test-images", "4", "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "4", "--seeds", "0", "--device", "cpu"]
    assert bench.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    runs = [results["teacher"], results["methods"]["student"]["0"], results["methods"]["diffkd"]["0"]]
    assert all(set(r["final"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"} for r in runs)
    assert runs[2]["extra_parameters"] == 5 * 694_722  # five FPN levels of 256 channels, no AE
    diffkd_terms = [k for k in runs[2]["history"][0] if k.startswith("loss_diffkd_p3")]
    assert diffkd_terms == ["loss_diffkd_p3/kd", "loss_diffkd_p3/diffusion"] and "loss_regression_kd" in runs[2]["history"][0]
    assert "| diffkd |" in (tmp_path / "results.md").read_text()
    assert bench.main(args) == 0  # finished runs are reused, not retrained
