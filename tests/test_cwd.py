"""CWD (Shu et al., ICCV 2021): its loss against the formula written with plain loops, a case computed by hand,
maps of different sizes, its errors, the recipes, and one training step of a segmentation pair built by names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffkd import Distiller, Level
from diffkd.config import load_config
from diffkd.methods import build_method
from diffkd.segmentation import models as seg_models

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "segmentation"
CWD_RECIPES = sorted(RECIPES.glob("*_cwd.yaml"))


def loop_cwd(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    """tau^2 sum_{n,c} sum_hw p_T (log p_T - log p_S) / (N C), with p = softmax over the H*W positions of one channel."""
    n, c, h, w = s.shape
    total = 0.0
    for i in range(n):
        for k in range(c):
            zs = sum(math.exp(float(s[i, k, y, x]) / tau) for y in range(h) for x in range(w))
            zt = sum(math.exp(float(t[i, k, y, x]) / tau) for y in range(h) for x in range(w))
            for y in range(h):
                for x in range(w):
                    p_s = math.exp(float(s[i, k, y, x]) / tau) / zs
                    p_t = math.exp(float(t[i, k, y, x]) / tau) / zt
                    total += p_t * (math.log(p_t) - math.log(p_s))
    return tau**2 * total / (n * c)


def test_cwd_equals_its_formula_written_with_loops():
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=generator) * 3, torch.randn(2, 3, 4, 5, generator=generator) * 3
    for tau in (4.0, 1.0):
        out = build_method("cwd", s.shape, t.shape, tau=tau)(s, t)
        assert set(out.terms) == {"cwd"}
        assert out.terms["cwd"].item() == pytest.approx(loop_cwd(s, t, tau), rel=1e-5)


def test_cwd_on_a_case_computed_by_hand():
    # One channel of two positions. Teacher logits (0, 0): p_T = (1/2, 1/2). Student logits (0, 4 ln 3) at
    # tau 4: (0, ln 3) -> p_S = (1/4, 3/4). KL = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3);
    # times tau^2 = 16, over N C = 1: 8 ln(4/3) = 2.30146.
    teacher = torch.tensor([[[[0.0, 0.0]]]])
    student = torch.tensor([[[[0.0, 4 * math.log(3.0)]]]])
    out = build_method("cwd", student.shape, teacher.shape)(student, teacher)  # the default tau is 4
    assert out.terms["cwd"].item() == pytest.approx(8 * math.log(4 / 3), rel=1e-6)
    assert out.terms["cwd"].item() == pytest.approx(2.30146, abs=1e-5)
    assert build_method("cwd", teacher.shape, teacher.shape)(teacher, teacher).terms["cwd"].item() == 0.0


def test_a_student_map_of_another_size_is_resized_to_the_teachers_first():
    generator = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 2, 3, 4, generator=generator), torch.randn(1, 2, 6, 8, generator=generator)
    method = build_method("cwd", s.shape, t.shape)
    resized = F.interpolate(s, size=(6, 8), mode="bilinear", align_corners=False)
    assert method(s, t).terms["cwd"].item() == pytest.approx(loop_cwd(resized, t, 4.0), rel=1e-5)
    assert method(s, t).terms["cwd"].item() != pytest.approx(loop_cwd(s, t[..., ::2, ::2], 4.0), rel=1e-3)


def test_cwd_errors_say_what_to_fix():
    with pytest.raises(ValueError, match=r"same channels .* got student \(2, 19, 8, 8\) and teacher \(2, 21, 8, 8\)"):
        build_method("cwd", torch.Size([2, 19, 8, 8]), torch.Size([2, 21, 8, 8]))
    with pytest.raises(ValueError, match="cwd compares two maps"):
        build_method("cwd", torch.Size([2, 19]), torch.Size([2, 19]))
    with pytest.raises(ValueError, match="tau must be positive, got 0"):
        build_method("cwd", torch.Size([2, 19, 8, 8]), torch.Size([2, 19, 8, 8]), tau=0)


@pytest.mark.integration
@pytest.mark.parametrize("path", CWD_RECIPES, ids=lambda p: p.name)
def test_cwd_recipes_use_the_authors_setting_and_take_a_step(path: Path):
    """Each CWD recipe: the logits map, tau 4, weight 3; its student and teacher built by name (width 1/8, 32 px),
    the level sized from the probed taps; one SGD step changes the student and leaves the teacher as it was."""
    cfg = load_config(path)
    [level] = cfg.levels
    assert (level.student, level.teacher, level.method, level.weight, level.options) == (
        "classifier", "classifier", "cwd", 3.0, {"tau": 4.0})  # fmt: skip
    torch.manual_seed(0)
    teacher, student = (seg_models.create(spec.name, num_classes=19, width_mult=0.125) for spec in (cfg.teacher, cfg.student))
    distiller = Distiller(teacher, student, [Level(level.student, level.teacher, level.method, level.weight, **level.options)],
                          input_shape=(3, 32, 32))
    assert distiller.extra_parameters() == 0  # CWD has no modules of its own
    images, labels = torch.rand(2, 3, 32, 32), torch.randint(0, 19, (2, 32, 32))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    distiller.train()
    out = distiller(images, labels)
    assert set(out.losses) == {"cwd_classifier"} and out.losses["cwd_classifier"].item() > 0
    loss = F.cross_entropy(out.student["out"], labels) + out.loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    distiller.close()
