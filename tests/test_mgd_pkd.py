"""MGD and PKD, the feature methods YOLO users reach for: each checked against its formula written out
here element by element (docs/design.md §5), on a case worked out by hand, and trained one step."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffkd.methods import build_method
from diffkd.methods.mgd import MGD
from diffkd.methods.pkd import PKD, pkd_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------- MGD
def mgd_by_loops(student, teacher, mask, align, generator) -> float:
    """sum over (b, c, h, w) of (G(mask * align(s)) - t)^2, divided by B; align and G run as modules, the
    masking and the sum written out position by position."""
    b, _, h, w = student.shape
    aligned = align(student) if align is not None else student
    masked = aligned.clone()
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if mask[i, 0, y, x] == 0:
                    masked[i, :, y, x] = 0.0
    rebuilt = generator(masked)
    total = 0.0
    for i in range(b):
        for c in range(teacher.shape[1]):
            for y in range(h):
                for x in range(w):
                    total += (float(rebuilt[i, c, y, x]) - float(teacher[i, c, y, x])) ** 2
    return total / b


@pytest.mark.parametrize("student_channels", [3, 5])
def test_mgd_matches_its_formula_and_keeps_alpha_as_its_weight(student_channels):
    torch.manual_seed(0)
    s, t = torch.randn(2, student_channels, 4, 3), torch.randn(2, 5, 4, 3)
    method = build_method("mgd", s.shape, t.shape, alpha=3e-5)
    assert (method.align is None) == (student_channels == 5)
    mask = (torch.rand(2, 1, 4, 3) > 0.5).float()
    out = method(s, t, mask=mask)
    with torch.no_grad():
        expected = mgd_by_loops(s, t, mask, method.align, method.generator)
    assert out.terms["mgd"].item() == pytest.approx(expected, rel=1e-5)
    assert method.term_weights == {"mgd": 3e-5}  # applied by the weighting


def test_mgd_by_hand_with_an_identity_generator():
    """A generator that returns its input: the loss is the squared distance of the kept positions plus the
    teacher's squares where masked, over B."""
    method = MGD(1, 1)
    method.generator = nn.Identity()
    s = torch.tensor([[[[1.0, 2.0]]]])
    t = torch.tensor([[[[3.0, 5.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])  # keep x=0, mask x=1
    assert method(s, t, mask=mask).terms["mgd"].item() == pytest.approx((1 - 3) ** 2 + 5 ** 2)


def test_mgd_mask_drops_its_share_of_positions_the_same_for_every_channel():
    torch.manual_seed(1)
    method = MGD(4, 4, mask_ratio=0.65)
    mask = method.random_mask(torch.zeros(64, 4, 16, 16))
    assert mask.shape == (64, 1, 16, 16)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 1 - mask.mean().item() == pytest.approx(0.65, abs=0.01)


def test_mgd_trains_student_align_and_generator_not_the_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 6, 4, 4, requires_grad=True)
    method = build_method("mgd", s.shape, t.shape)
    method(s, t.detach()).terms["mgd"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert all(p.grad is not None for p in method.parameters())


def test_mgd_errors():
    with pytest.raises(ValueError, match="same size"):
        build_method("mgd", torch.Size([2, 3, 4, 4]), torch.Size([2, 3, 8, 8]))
    with pytest.raises(ValueError, match=r"\(B,C,H,W\) maps"):
        build_method("mgd", torch.Size([2, 3]), torch.Size([2, 3]))
    with pytest.raises(ValueError, match="mask_ratio"):
        build_method("mgd", torch.Size([2, 3, 4, 4]), torch.Size([2, 3, 4, 4]), mask_ratio=1.0)
    with pytest.raises(ValueError, match="valid options: mask_ratio, alpha"):
        build_method("mgd", torch.Size([2, 3, 4, 4]), torch.Size([2, 3, 4, 4]), lambda_mgd=0.5)


# ------------------------------------------------------------------------------------------- PKD
def pearson_by_loops(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def pkd_by_loops(s: torch.Tensor, t: torch.Tensor) -> float:
    """Per channel, the values over (batch, positions) standardised with the unbiased std + 1e-6; the mean over
    every element of the squared difference, halved."""
    b, c, h, w = s.shape
    total = 0.0
    for ch in range(c):
        values = []
        for x in (s, t):
            v = [float(x[i, ch, y, z]) for i in range(b) for y in range(h) for z in range(w)]
            mean = sum(v) / len(v)
            std = math.sqrt(sum((u - mean) ** 2 for u in v) / (len(v) - 1))
            values.append([(u - mean) / (std + 1e-6) for u in v])
        total += sum((p - q) ** 2 for p, q in zip(*values))
    return total / (b * c * h * w) / 2


def test_pkd_matches_its_formula_and_is_one_minus_the_pearson_correlation():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    assert pkd_loss(s, t).item() == pytest.approx(pkd_by_loops(s, t), rel=1e-5)
    # with n values per channel, MSE of standardised values / 2 = (n - 1) / n * (1 - r), averaged over channels
    n = 3 * 2 * 5
    r = [pearson_by_loops(s[:, c].flatten().tolist(), t[:, c].flatten().tolist()) for c in range(4)]
    assert pkd_loss(s, t).item() == pytest.approx(sum((n - 1) / n * (1 - x) for x in r) / 4, rel=1e-4)


def test_pkd_ignores_each_channels_scale_and_offset():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 4, 4)
    scale, shift = torch.tensor([2.0, 0.5, 7.0]).view(1, 3, 1, 1), torch.tensor([1.0, -3.0, 10.0]).view(1, 3, 1, 1)
    assert pkd_loss(t * scale + shift, t).item() == pytest.approx(0.0, abs=1e-6)
    assert pkd_loss(-t, t).item() == pytest.approx(2 * (2 * 16 - 1) / (2 * 16), rel=1e-4)  # r = -1


def test_pkd_connector_only_where_widths_differ_and_weight_is_its_own():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 8, 8)
    method = build_method("pkd", s.shape, t.shape)
    assert isinstance(method.connector[0], nn.Conv2d) and method.connector[0].bias is None
    assert isinstance(method.connector[1], nn.BatchNorm2d)
    out = method(s, t)
    assert method.term_weights == {"pkd": 6.0} and torch.isfinite(out.terms["pkd"])
    assert build_method("pkd", t.shape, t.shape, weight=1.0).connector is None
    assert isinstance(PKD(6, 6), PKD)
    with pytest.raises(ValueError, match=r"\(B,C,H,W\) maps"):
        build_method("pkd", torch.Size([2, 3]), torch.Size([2, 3]))
