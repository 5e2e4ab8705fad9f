"""FGD (Yang et al., CVPR 2022): its loss against the formula written with plain loops, a case computed by
hand, the masks of a hand-made box layout, the boxes' frame on a resized and padded batch, its errors, the
recipes, and one training step of a detector pair built from the probed taps."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from diffkd import Distiller, Level
from diffkd.config import load_config
from diffkd.boxes import Boxes, from_torchvision
from diffkd.detection.models import build_detector, parse_name
from diffkd.methods import build_method
from diffkd.methods.fgd import FAMILY_WEIGHTS, box_masks
from conftest import weighted_terms

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
FGD_RECIPES = sorted(CONFIGS.rglob("*_fgd.yaml"))
COCO_FGD_RECIPES = sorted(CONFIGS.glob("coco/*_fgd.yaml"))
# Faster R-CNN samples fewer RoIs here so one CPU step stays short; the architecture is unchanged.
SMALL_RCNN = {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "box_batch_size_per_image": 32}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def image_list(batch: int, height: int, width: int, boxes: list[torch.Tensor]):
    """What a torchvision detector's transform returns: (ImageList of the padded batch, resized targets)."""
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(batch, 3, height, width), [(height, width)] * batch)
    return images, [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]


# ------------------------------------------------------------------------------------- the formula, by loops
def loop_masks(boxes: list[list[list[float]]], h: int, w: int, in_h: int, in_w: int) -> tuple[list, list]:
    """The masks pixel by pixel: inclusive floored/ceiled boxes, 1/area, max over boxes; normalised background."""
    fg_all, bg_all = [], []
    for image_boxes in boxes:
        fg = [[0.0] * w for _ in range(h)]
        for x1, y1, x2, y2 in image_boxes:
            left, top = math.floor(x1 * w / in_w), math.floor(y1 * h / in_h)
            right, bottom = math.ceil(x2 * w / in_w), math.ceil(y2 * h / in_h)
            weight = 1.0 / ((bottom - top + 1) * (right - left + 1))
            for y in range(h):
                for x in range(w):
                    if top <= y <= bottom and left <= x <= right:
                        fg[y][x] = max(fg[y][x], weight)
        empty = sum(1 for y in range(h) for x in range(w) if fg[y][x] == 0)
        bg = [[(1.0 / empty if fg[y][x] == 0 else 0.0) for x in range(w)] for y in range(h)]
        fg_all.append(fg)
        bg_all.append(bg)
    return fg_all, bg_all


def loop_attention(f: torch.Tensor, temperature: float) -> tuple[list, list]:
    """Spatial and channel attention of one (C, H, W) map, from sums written out."""
    c, h, w = f.shape
    pixel = [[sum(abs(float(f[k, y, x])) for k in range(c)) / c for x in range(w)] for y in range(h)]
    z = sum(math.exp(pixel[y][x] / temperature) for y in range(h) for x in range(w))
    spatial = [[h * w * math.exp(pixel[y][x] / temperature) / z for x in range(w)] for y in range(h)]
    chan = [sum(abs(float(f[k, y, x])) for y in range(h) for x in range(w)) / (h * w) for k in range(c)]
    zc = sum(math.exp(v / temperature) for v in chan)
    channel = [c * math.exp(v / temperature) / zc for v in chan]
    return spatial, channel


@torch.no_grad()
def loop_gcblock(block: torch.nn.Module, f: torch.Tensor) -> list:
    """GcBlock of one (C, H, W) map with the block's parameters, scalar by scalar."""
    c, h, w = f.shape
    mw, mb = block.mask.weight.view(-1), float(block.mask.bias)
    logits = [[sum(float(mw[k]) * float(f[k, y, x]) for k in range(c)) + mb for x in range(w)] for y in range(h)]
    z = sum(math.exp(v) for row in logits for v in row)
    context = [sum(math.exp(logits[y][x]) / z * float(f[k, y, x]) for y in range(h) for x in range(w)) for k in range(c)]
    conv1, norm, _, conv2 = block.transform
    half = conv1.out_channels
    hidden = [sum(float(conv1.weight[j, k]) * context[k] for k in range(c)) + float(conv1.bias[j]) for j in range(half)]
    mean = sum(hidden) / half
    var = sum((v - mean) ** 2 for v in hidden) / half
    hidden = [max(0.0, (v - mean) / math.sqrt(var + norm.eps) * float(norm.weight.view(-1)[j]) + float(norm.bias.view(-1)[j]))
              for j, v in enumerate(hidden)]
    added = [sum(float(conv2.weight[k, j]) * hidden[j] for j in range(half)) + float(conv2.bias[k]) for k in range(c)]
    return [[[float(f[k, y, x]) + added[k] for x in range(w)] for y in range(h)] for k in range(c)]


def loop_fgd(method, s: torch.Tensor, t: torch.Tensor, boxes: list[list[list[float]]], in_hw: tuple[int, int]) -> dict[str, float]:
    """Every FGD term from the paper's sums, one pixel and one channel at a time."""
    b, c, h, w = t.shape
    fg, bg = loop_masks(boxes, h, w, *in_hw)
    l_fg = l_bg = l_at = l_rela = 0.0
    for n in range(b):
        spatial_t, channel_t = loop_attention(t[n], method.temperature)
        spatial_s, channel_s = loop_attention(s[n], method.temperature)
        out_s, out_t = loop_gcblock(method.student_context, s[n]), loop_gcblock(method.teacher_context, t[n])
        for k in range(c):
            for y in range(h):
                for x in range(w):
                    sq = (float(s[n, k, y, x]) - float(t[n, k, y, x])) ** 2
                    l_fg += fg[n][y][x] * spatial_t[y][x] * channel_t[k] * sq
                    l_bg += bg[n][y][x] * spatial_t[y][x] * channel_t[k] * sq
                    l_rela += (out_s[k][y][x] - out_t[k][y][x]) ** 2
        l_at += sum(abs(channel_s[k] - channel_t[k]) for k in range(c))
        l_at += sum(abs(spatial_s[y][x] - spatial_t[y][x]) for y in range(h) for x in range(w))
    w = method.term_weights
    return {"fg": w["fg"] * l_fg / b, "bg": w["bg"] * l_bg / b, "attention": w["attention"] * l_at / b,
            "global": w["global"] * l_rela / b}


def test_fgd_equals_its_formula_written_with_loops():
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 3, 5, generator=generator), torch.randn(2, 4, 3, 5, generator=generator) * 2
    boxes = [[[1.0, 2.0, 9.5, 7.0], [6.0, 0.5, 18.0, 5.0]], [[12.2, 3.3, 19.9, 11.9]]]  # in a 12 x 20 input frame
    method = build_method("fgd", s.shape, t.shape, fg_weight=1.0, bg_weight=0.5, attention_weight=0.25, global_weight=2.0,
                          temperature=0.8)
    with torch.no_grad():  # give the zero-initialised last convs of the GcBlocks some weight, so they count
        for block in (method.student_context, method.teacher_context):
            block.transform[-1].weight.normal_(generator=generator)
            block.transform[-1].bias.normal_(generator=generator)
    out = method(s, t, boxes=from_torchvision(image_list(2, 12, 20, [torch.tensor(b) for b in boxes])))
    expected = loop_fgd(method, s, t, boxes, (12, 20))
    assert set(out.terms) == set(expected)
    terms = weighted_terms(method, out)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name


def test_fgd_on_a_case_computed_by_hand():
    # One image, 2 channels, a 1 x 4 level of a 4 x 16 input (scale 1/4). The teacher is 1 everywhere: its
    # spatial and channel attention are uniform, 1 each. The student is 0 (channel 0) and 2 (channel 1):
    # uniform spatial attention too, channel attention 2 softmax([0, 2] / 0.5) = 2 [1, e^4] / (1 + e^4),
    # so L_at = |C_s - C_t| summed = 2 (e^4 - 1) / (e^4 + 1) = 2 tanh 2. Every squared difference is 1.
    # The box (0, 0, 2, 2) scales to (0, 0, 0.5, 0.5): floored/ceiled to (0, 0, 1, 1), so it covers the
    # columns 0 and 1 with weight 1 / ((1 - 0 + 1)(1 - 0 + 1)) = 1/4: L_fg = 2 channels x 2 pixels x 1/4 = 1.
    # The background is columns 2 and 3, 1/2 each: L_bg = 2 x 2 x 1/2 = 2. The GcBlocks start as the identity
    # (last conv zero), so L_global = sum (F_s - F_t)^2 = 8.
    teacher = torch.ones(1, 2, 1, 4)
    student = torch.tensor([[[[0.0, 0, 0, 0]], [[2.0, 2, 2, 2]]]])
    method = build_method("fgd", student.shape, teacher.shape, fg_weight=1.0, bg_weight=1.0, attention_weight=1.0,
                          global_weight=1.0, temperature=0.5)
    out = method(student, teacher, boxes=Boxes([torch.tensor([[0.0, 0.0, 2.0, 2.0]])], (4, 16)))
    assert out.terms["fg"].item() == pytest.approx(1.0)
    assert out.terms["bg"].item() == pytest.approx(2.0)
    assert out.terms["attention"].item() == pytest.approx(2 * math.tanh(2.0), rel=1e-6)
    assert out.terms["global"].item() == pytest.approx(8.0)


# ------------------------------------------------------------------------------------- masks and box frames
def test_masks_of_a_hand_made_box_layout():
    # A 6 x 8 level of a 12 x 16 input (scale 1/2). Box A (1, 1, 4.4, 6) -> (0.5, 0.5, 2.2, 3) -> rows 0..3,
    # cols 0..3 (floor, ceil), weight 1/16. Box B (4, 4, 8, 6) -> (2, 2, 4, 3) -> rows 2..3, cols 2..4,
    # weight 1/6, which wins where they overlap (rows 2..3, cols 2..3). 18 pixels are covered, so the
    # other 30 have background 1/30. A second image without boxes is background everywhere, 1/48.
    a, b = 1 / 16, 1 / 6
    expected_fg = torch.tensor([
        [a, a, a, a, 0, 0, 0, 0],
        [a, a, a, a, 0, 0, 0, 0],
        [a, a, b, b, b, 0, 0, 0],
        [a, a, b, b, b, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ])  # fmt: skip
    fg, bg = box_masks([torch.tensor([[1.0, 1.0, 4.4, 6.0], [4.0, 4.0, 8.0, 6.0]]), torch.zeros(0, 4)], (6, 8), (12, 16))
    assert torch.allclose(fg[0], expected_fg)
    assert torch.allclose(bg[0], torch.where(expected_fg == 0, 1 / 30, 0.0))
    assert torch.equal(fg[1], torch.zeros(6, 8)) and torch.allclose(bg[1], torch.full((6, 8), 1 / 48))
    fg, bg = box_masks([torch.tensor([[0.0, 0.0, 16.0, 12.0]])], (6, 8), (12, 16))  # a box over everything
    assert torch.all(fg[0] > 0) and torch.equal(bg[0], torch.zeros(6, 8))  # no background: left at 0, not NaN


@functools.cache
def resizing_detector(seed: int) -> torch.nn.Module:
    """A ResNet-18 FCOS whose transform resizes to min side 32, max side 64 and pads to a multiple of 32."""
    torch.manual_seed(seed)
    return build_detector("fcos_resnet18_fpn", 3, min_size=32, max_size=64)


@pytest.mark.integration
def test_boxes_are_scaled_into_the_resized_padded_frame():
    # Image 1 is 40 x 50: scale min(32/40, 64/50) = 0.8 -> 32 x 40. Image 2 is 20 x 40: scale
    # min(32/20, 64/40) = 1.6 -> 32 x 64. The batch is padded to 32 x 64, so P3 (stride 8) is 4 x 8 and a
    # box in input pixels maps to the level by (resize factor) x 8/64 horizontally and x 4/32 vertically.
    teacher, student = resizing_detector(0), resizing_detector(1)
    distiller = Distiller(teacher, student, [Level("backbone['0']", "backbone['0']", "fgd", name="p3",
                                                   family="fcos")], input_shape=(3, 32, 64))
    images = [torch.rand(3, 40, 50), torch.rand(3, 20, 40)]
    boxes = [torch.tensor([[5.0, 10.0, 25.0, 30.0]]), torch.tensor([[2.0, 1.0, 12.0, 9.0], [20.0, 5.0, 38.0, 15.0]])]
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    distiller.train()
    out = distiller((images, targets), targets)
    captured_images, captured_targets = distiller.student_taps.output("p3/boxes")
    assert tuple(captured_images.tensors.shape[-2:]) == (32, 64)
    for factor, original, resized in zip((0.8, 1.6), boxes, captured_targets):
        assert torch.allclose(resized["boxes"], original * factor)
    # The fg term from masks built by hand from the original boxes, the resize factors and the padded frame.
    s = distiller.student_taps["p3"].detach()
    t = distiller.teacher_taps["p3"].detach()
    assert s.shape[-2:] == (4, 8)
    in_frame = [[[v * factor for v in box] for box in b.tolist()] for factor, b in zip((0.8, 1.6), boxes)]
    fg, _ = loop_masks(in_frame, 4, 8, 32, 64)
    method = distiller.methods["p3"]
    expected = 0.0
    for n in range(2):
        spatial_t, channel_t = loop_attention(t[n], method.temperature)
        expected += sum(fg[n][y][x] * spatial_t[y][x] * channel_t[k] * float(s[n, k, y, x] - t[n, k, y, x]) ** 2
                        for k in range(s.shape[1]) for y in range(4) for x in range(8))
    assert out.losses["p3/fg"].item() == pytest.approx(method.term_weights["fg"] * expected / 2, rel=1e-4)
    # The boxes taken in input pixels (no resize, no padding) would give other masks: the frame matters here.
    unscaled, _ = loop_masks([b.tolist() for b in boxes], 4, 8, 32, 64)
    assert unscaled != fg
    distiller.close()


# ------------------------------------------------------------------------------------- errors
def test_fgd_errors_say_what_to_fix():
    shape = torch.Size([2, 8, 4, 4])
    with pytest.raises(ValueError, match="same size"):
        build_method("fgd", shape, torch.Size([2, 8, 2, 2]), family="fcos")
    with pytest.raises(ValueError, match="family must be one of retinanet, fasterrcnn, fcos, got 'yolo'"):
        build_method("fgd", shape, shape, family="yolo")
    with pytest.raises(ValueError, match="give family .* or all of bg_weight, global_weight"):
        build_method("fgd", shape, shape, fg_weight=1.0, attention_weight=1.0, temperature=0.5)
    with pytest.raises(ValueError, match=r"method 'fgd' got an unknown option 'alpha'; valid options: family, fg_weight"):
        build_method("fgd", shape, shape, family="fcos", alpha=1.0)
    method = build_method("fgd", shape, shape, family="retinanet", temperature=1.0)
    assert (method.term_weights["fg"], method.temperature) == (FAMILY_WEIGHTS["retinanet"][0], 1.0)  # one overridden
    plain_targets = [{"boxes": torch.zeros(0, 4)}] * 2
    with pytest.raises(ValueError, match=r"fgd needs its input `boxes` as diffkd.boxes.Boxes, got list"):
        method(torch.randn(shape), torch.randn(shape), boxes=plain_targets)
    with pytest.raises(ValueError, match="fgd needs its input `boxes` .* got NoneType"):
        method(torch.randn(shape), torch.randn(shape), plain_targets)  # the batch's own targets are not read
    # the torchvision edge: a transform output becomes Boxes, anything else is refused there
    with pytest.raises(ValueError, match=r"fgd needs its input `boxes`: diffkd.boxes.Boxes, or the \(ImageList, targets\)"):
        from_torchvision(plain_targets)
    with pytest.raises(ValueError, match="ran without targets"):
        from_torchvision((image_list(2, 16, 16, [])[0], None))
    with pytest.raises(ValueError, match="1 images have boxes but the feature batch holds 2"):
        method(torch.randn(shape), torch.randn(shape), boxes=from_torchvision(image_list(1, 16, 16, [torch.zeros(0, 4)])))


def test_student_channels_get_a_1x1_align_conv():
    method = build_method("fgd", torch.Size([1, 8, 4, 4]), torch.Size([1, 16, 4, 4]), family="fcos")
    assert (method.align.in_channels, method.align.out_channels, method.align.bias is not None) == (8, 16, True)
    assert build_method("fgd", torch.Size([1, 16, 4, 4]), torch.Size([1, 16, 4, 4]), family="fcos").align is None


# ------------------------------------------------------------------------------------- recipes and a training step
@pytest.mark.parametrize("path", FGD_RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_fgd_recipes_follow_the_authors_setting(path: Path):
    cfg = load_config(path)
    family = parse_name(cfg.student.name).family_name
    assert parse_name(cfg.teacher.name).family_name == family
    expected_keys = ["0", "1", "2", "3"] if family == "fasterrcnn" else ["0", "1", "2", "p6", "p7"]  # the authors' levels
    assert [lv.student for lv in cfg.levels] == [f"backbone['{k}']" for k in expected_keys]
    assert all(lv.teacher == lv.student and lv.method == "fgd" and lv.inputs is None and lv.weight == 1.0
               and lv.options == {"family": family} for lv in cfg.levels)
    if cfg.data.name == "coco":
        assert (cfg.train.epochs, cfg.train.clip_grad_norm, cfg.data.batch_size) == (24, 35.0, 16)


def recipe_distiller(path: Path, stand_in: bool) -> Distiller:
    """The Distiller a recipe builds, its levels taken from the file as the engine takes them; with stand_in, ResNet-18
    detectors of the same family (the same taps above the backbone body) instead of the recipe's R101 / R50."""
    cfg = load_config(path)
    names = [cfg.teacher.name, cfg.student.name]
    if stand_in:
        names = [f"{parse_name(cfg.student.name).family_name}_resnet18_fpn"] * 2
    options = SMALL_RCNN if names[0].startswith("fasterrcnn") else {}
    teacher, student = (build_detector(name, 3, min_size=64, max_size=64, **options) for name in names)
    levels = [Level(lv.student, lv.teacher, lv.method, lv.weight, lv.name, inputs=lv.inputs, **lv.options) for lv in cfg.levels]
    return Distiller(teacher, student, levels, input_shape=(3, 64, 64))


def one_step_changes_student_and_method_only(distiller: Distiller) -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 24.0, 26.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 4.0, 54.0, 28.0], [8.0, 36.0, 22.0, 58.0]]), "labels": torch.tensor([2, 1])}]
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    methods_before = {k: v.clone() for k, v in distiller.methods.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    distiller.train()
    out = distiller((images, targets), targets)
    level = distiller.levels[0].name
    assert {f"{level}/{term}" for term in ("fg", "bg", "attention", "global")} <= set(out.losses)
    loss = sum(v.float() for v in out.student.values()) + out.loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(v, distiller.student.state_dict()[k]) for k, v in student_before.items())
    assert all(torch.equal(v, distiller.teacher.state_dict()[k]) for k, v in teacher_before.items())
    changed = {k for k, v in methods_before.items() if not torch.equal(v, distiller.methods.state_dict()[k])}
    for side in ("student_context", "teacher_context"):  # both GcBlocks learn from the first step: their last conv
        assert {f"{level}.{side}.transform.3.weight", f"{level}.{side}.transform.3.bias"} <= changed  # leaves zero
    distiller.close()


@pytest.mark.integration
@pytest.mark.parametrize("path", COCO_FGD_RECIPES, ids=lambda p: p.name)
def test_one_step_of_each_coco_fgd_recipe_on_resnet18_stand_ins(path: Path):
    one_step_changes_student_and_method_only(recipe_distiller(path, stand_in=True))


@pytest.mark.integration
def test_one_step_of_the_mosaic_fgd_pair_built_by_names():
    one_step_changes_student_and_method_only(recipe_distiller(CONFIGS / "mosaics" / "fcos_r50_r18_fgd.yaml", stand_in=False))


@pytest.mark.slow
@pytest.mark.parametrize("path", COCO_FGD_RECIPES, ids=lambda p: p.name)
def test_one_step_of_each_coco_fgd_recipe_with_its_own_models(path: Path):
    one_step_changes_student_and_method_only(recipe_distiller(path, stand_in=False))
