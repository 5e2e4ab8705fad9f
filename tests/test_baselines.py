"""The paper's baselines RKD, PKT, VID, CRD, ReviewKD and SRRL.

Each loss is checked against its formula written out here with plain loops (docs/design.md §5),
and on a case small enough to work out by hand. Each method is built from the probed taps of a
torchvision pair by names alone and takes one optimizer step. Plus the general interfaces they
brought: levels with several taps, a frozen teacher module by path, sample indices.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import spawn_processes, weighted_terms
from diffkd import models
from diffkd.distiller import Distiller, Level
from diffkd.methods import Method, build_method
from diffkd.methods.crd import CRD, draw_negatives, nce_loss
from diffkd.methods.reviewkd import ReviewKD, hcl_loss
from diffkd.methods.rkd import RKD
from diffkd.methods.vid import VID


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ------------------------------------------------------------------------------------------- RKD
def rkd_by_loops(s: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    """RKD's distance and angle losses (unweighted), element by element."""
    n = len(s)

    def distances(e):
        d = [[math.dist(e[i].tolist(), e[j].tolist()) if i != j else 0.0 for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def angles(e):
        def unit(i, j):
            v = e[j] - e[i]
            return v / max(float(v.norm()), 1e-12)

        return [[[float(unit(i, j) @ unit(i, k)) for k in range(n)] for j in range(n)] for i in range(n)]

    ds, dt = distances(s), distances(t)
    a_s, a_t = angles(s), angles(t)
    distance = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    angle = sum(smooth_l1(a_s[i][j][k] - a_t[i][j][k]) for i in range(n) for j in range(n) for k in range(n)) / n**3
    return distance, angle


def test_rkd_matches_its_formula_on_pooled_maps():
    torch.manual_seed(0)
    s, t = torch.randn(5, 6, 3, 3), 3 * torch.randn(5, 10, 2, 2)
    rkd = RKD()
    out = weighted_terms(rkd, rkd(s, t))
    distance, angle = rkd_by_loops(s.double().mean((2, 3)), t.double().mean((2, 3)))
    assert out["distance"].item() == pytest.approx(25 * distance, rel=1e-5)
    assert out["angle"].item() == pytest.approx(50 * angle, rel=1e-5)


def test_rkd_by_hand():
    # distances: student 0, 1, 2 -> (1, 2, 1) / mean 4/3 = (0.75, 1.5, 0.75); teacher 0, 1, 3 -> (1, 3, 2) / 2 =
    # (0.5, 1.5, 1). Differences 0.25, 0, -0.25, each twice in the 3x3 matrix: 4 * 0.5 * 0.25^2 / 9 = 1/72.
    # Same order on the line, so every angle cosine is +-1 on both sides: angle loss 0.
    rkd = RKD()
    out = weighted_terms(rkd, rkd(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0.0], [1.0], [3.0]])))
    assert out["distance"].item() == pytest.approx(25 / 72, rel=1e-5)
    assert out["angle"].item() == pytest.approx(0.0, abs=1e-7)
    # angles: student (0,0), (1,0), (0,1); teacher (0,0), (1,0), (1,1). Cosines at corner 0 between the
    # other two: 0 vs 1/sqrt2; at corner 1: 1/sqrt2 vs 0; at corner 2: 1/sqrt2 vs 1/sqrt2. Four entries
    # (j,k and k,j) differ by 1/sqrt2: 4 * 0.5 * 0.5 / 27 = 1/27.
    out = weighted_terms(rkd, rkd(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])))
    assert out["angle"].item() == pytest.approx(50 / 27, rel=1e-5)


def test_rkd_teacher_side_has_no_gradient_and_needs_two_samples():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    sum(RKD()(s, t).terms.values()).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="rkd relates the samples of a batch, so it needs at least 2, got a batch of 1"):
        RKD()(torch.randn(1, 3), torch.randn(1, 3))


# ------------------------------------------------------------------------------------------- PKT
def pkt_by_loops(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    n = len(s)

    def conditional(x):
        x = [row / (float(row.norm()) + eps) for row in x]
        k = [[(float(x[i] @ x[j]) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[k[i][j] / sum(k[i]) for j in range(n)] for i in range(n)]

    ps, pt = conditional(s), conditional(t)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def test_pkt_matches_its_formula_and_by_hand():
    torch.manual_seed(1)
    s, t = torch.randn(6, 4, 5), torch.randn(6, 9)  # a (B,C,L) sequence against a vector
    got = build_method("pkt", s.shape, t.shape)(s, t).terms["pkt"].item()
    assert got == pytest.approx(pkt_by_loops(s.double().mean(2), t.double()), rel=1e-5)
    # student (1,0), (0,1): kernel (cos+1)/2 = [[1, .5], [.5, 1]] -> rows [[2/3, 1/3], [1/3, 2/3]]; teacher
    # (1,0), (1,0): all ones -> 1/2 everywhere. Each row: .5 log(.5 / (2/3)) + .5 log(.5 / (1/3)) = .5 log(9/8);
    # mean over the 4 entries: log(9/8) / 4.
    got = build_method("pkt", (2, 2), (2, 2))(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert got.terms["pkt"].item() == pytest.approx(math.log(9 / 8) / 4, abs=1e-6)


def test_pooled_methods_refuse_a_tap_without_channels():
    with pytest.raises(ValueError, match=r"pkt needs a \(B,C\) vector, a \(B,C,L\) sequence or a \(B,C,H,W\) map"):
        build_method("pkt", torch.Size([4]), torch.Size([4, 3]))


# ------------------------------------------------------------------------------------------- VID
def vid_pair_by_loops(pair, s: torch.Tensor, t: torch.Tensor) -> float:
    """0.5 ((mu - t)^2 / var + log var) averaged over every (b, c, h, w), mu from the pair's regressor."""
    mu = pair.regressor(s).detach().double()
    var = (torch.log1p(torch.exp(pair.log_scale.double())) + 1e-5).tolist()
    b, c, h, w = t.shape
    total = sum(0.5 * ((float(mu[i, j, y, x]) - float(t[i, j, y, x])) ** 2 / var[j] + math.log(var[j]))
                for i in range(b) for j in range(c) for y in range(h) for x in range(w))
    return total / (b * c * h * w)


def test_vid_matches_its_formula_with_pooling_and_pairs_summed():
    torch.manual_seed(2)
    students = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 2, 2)]
    teachers = [torch.randn(2, 5, 4, 4), torch.randn(2, 6, 4, 4)]
    vid = build_method("vid", [x.shape for x in students], [x.shape for x in teachers])
    with torch.no_grad():
        for pair in vid.pairs:
            pair.log_scale.uniform_(-1, 2)
    expected = (vid_pair_by_loops(vid.pairs[0], F.avg_pool2d(students[0], 2), teachers[0])  # student 8x8 -> 4x4
                + vid_pair_by_loops(vid.pairs[1], students[1], F.avg_pool2d(teachers[1], 2)))  # teacher 4x4 -> 2x2
    assert vid(students, teachers).terms["vid"].item() == pytest.approx(expected, rel=1e-5)


def test_vid_by_hand():
    # mu = 0.5 * relu(1 * relu(1 * 2)) = 1, t = 3, variance 5 at the start: 0.5 (4 / 5 + log 5).
    vid = VID([(1, 1)])
    with torch.no_grad():
        for conv, w in zip((m for m in vid.pairs[0].regressor if isinstance(m, nn.Conv2d)), (1.0, 1.0, 0.5)):
            conv.weight.fill_(w)
    assert vid.pairs[0].variance().item() == pytest.approx(5.0, rel=1e-6)
    got = vid(torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 3.0)).terms["vid"].item()
    assert got == pytest.approx(0.5 * (4 / 5 + math.log(5)), rel=1e-6)


def test_vid_refuses_vectors_and_uneven_lists():
    with pytest.raises(ValueError, match=r"vid needs \(B,C,H,W\) maps, but the student tap has shape \(2, 8\)"):
        build_method("vid", torch.Size([2, 8]), torch.Size([2, 8, 4, 4]))
    with pytest.raises(ValueError, match="vid pairs the taps in order, but there are 2 student and 1 teacher taps"):
        build_method("vid", [torch.Size([2, 8, 4, 4])] * 2, [torch.Size([2, 8, 4, 4])])


# ------------------------------------------------------------------------------------------- CRD
def crd_by_loops(f_s, f_t, mem_s, mem_t, contrast, z, n, temperature=0.07) -> float:
    """L_s + L_t of the NCE, from embeddings, the two banks, the contrast rows (positive first) and Z."""
    b, k1 = contrast.shape
    mass = (k1 - 1) / n
    total = 0.0
    for f, memory, zz in ((f_s, mem_t, z[0]), (f_t, mem_s, z[1])):
        side = 0.0
        for i in range(b):
            for j in range(k1):
                p = math.exp(float(memory[contrast[i, j]] @ f[i]) / temperature) / zz
                side += math.log(p / (p + mass + 1e-7)) if j == 0 else math.log(mass / (p + mass + 1e-7))
        total += -side / b
    return total


@pytest.mark.parametrize("dataset_size,negatives", [(6, 8), (50, 4)])  # scoring every row / gathering the draws
def test_crd_matches_its_formula_and_sets_z_once(dataset_size, negatives):
    torch.manual_seed(3)
    crd = CRD(5, 7, dataset_size, feat_dim=3, negatives=negatives, negative_sampling="uniform")
    s, t = torch.randn(4, 5, 2, 2), torch.randn(4, 7)
    indices = torch.tensor([1, 4, 0, 5])
    with torch.no_grad():
        e_s = crd.embed_student(s.mean((2, 3)))
        e_s = e_s / e_s.norm(dim=1, keepdim=True)
        e_t = crd.embed_teacher(t)
        e_t = e_t / e_t.norm(dim=1, keepdim=True)
    mem_s, mem_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    torch.manual_seed(7)
    contrast = torch.cat([indices[:, None], torch.randint(dataset_size, (4, negatives))], dim=1)
    scores = [[math.exp(float(m[contrast[i, j]] @ f[i]) / 0.07) for i in range(4) for j in range(negatives + 1)]
              for f, m in ((e_s, mem_t), (e_t, mem_s))]
    z = [sum(side) / len(side) * dataset_size for side in scores]

    torch.manual_seed(7)
    got = crd(s, t, None, indices=indices).terms["crd"].item()
    assert got == pytest.approx(crd_by_loops(e_s, e_t, mem_s, mem_t, contrast, z, dataset_size), rel=1e-4)
    assert crd.normalizers.tolist() == pytest.approx(z, rel=1e-5)
    crd(s, t, None, indices=indices)
    assert crd.normalizers.tolist() == pytest.approx(z, rel=1e-5)  # kept after the first forward


def test_nce_and_memory_update_by_hand():
    # 4 rows, 2 negatives: m Pn = 2 / 4 = 0.5. P = (0.5 | 0.5, 0.25):
    # -[log(0.5 / 1) + log(0.5 / 1) + log(0.5 / 0.75)] = log 2 + log 2 + log 1.5 = log 6.
    assert nce_loss(torch.tensor([[0.5, 0.5, 0.25]]), 4).item() == pytest.approx(math.log(6), rel=1e-6)
    # momentum 0.5: row (1, 0) and feature (0, 1) -> (0.5, 0.5) -> normalised (1/sqrt2, 1/sqrt2).
    crd = CRD(2, 2, 3, feat_dim=2, negatives=2, negative_sampling="uniform")
    with torch.no_grad():
        crd.memory_student.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
        for head in (crd.embed_student, crd.embed_teacher):
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
    before_t = crd.memory_teacher.clone()
    crd(torch.tensor([[0.0, 5.0]]), torch.tensor([[3.0, 4.0]]), None, indices=torch.tensor([2]))
    r = 1 / math.sqrt(2)
    assert crd.memory_student.tolist() == [[1.0, 0.0], [1.0, 0.0], pytest.approx([r, r], rel=1e-6)]
    assert torch.equal(crd.memory_teacher[:2], before_t[:2])  # other rows untouched
    mixed = 0.5 * before_t[2] + 0.5 * torch.tensor([0.6, 0.8])  # teacher feature (3, 4) embedded = (0.6, 0.8)
    assert crd.memory_teacher[2].tolist() == pytest.approx((mixed / mixed.norm()).tolist(), rel=1e-6)


def test_crd_memory_moves_at_the_batch_indices_with_its_momentum():
    torch.manual_seed(4)
    crd = CRD(6, 6, 10, feat_dim=4, negatives=5, momentum=0.3)
    s, t, indices = torch.randn(3, 6), torch.randn(3, 6), torch.tensor([7, 2, 9])
    before = crd.memory_student.clone(), crd.memory_teacher.clone()
    with torch.no_grad():
        f_s = F.normalize(crd.embed_student(s), dim=1)
        f_t = F.normalize(crd.embed_teacher(t), dim=1)
    crd(s, t, torch.tensor([0, 1, 2]), indices=indices)
    for memory, old, f in ((crd.memory_student, before[0], f_s), (crd.memory_teacher, before[1], f_t)):
        for row in range(10):
            if row in indices.tolist():
                mixed = 0.3 * old[row] + 0.7 * f[indices.tolist().index(row)]
                assert memory[row].tolist() == pytest.approx((mixed / mixed.norm()).tolist(), rel=1e-5)
            else:
                assert torch.equal(memory[row], old[row])
    assert crd.labels.tolist() == [-1, -1, 1, -1, -1, -1, -1, 0, -1, 2]
    crd.eval()  # an evaluation forward changes nothing
    state = {k: v.clone() for k, v in crd.state_dict().items()}
    crd(s, t, torch.tensor([0, 1, 2]), indices=torch.tensor([0, 1, 3]))
    assert all(torch.equal(v, crd.state_dict()[k]) for k, v in state.items())


def test_crd_negatives_avoid_the_anchors_class():
    torch.manual_seed(5)
    row_labels = torch.tensor([0, 1, 2, 0, 1, 2, -1, 0])
    anchors = torch.tensor([0, 2])
    draw = draw_negatives(2, 4000, 8, torch.device("cpu"), row_labels, anchors)
    assert not (row_labels[draw] == anchors[:, None]).any()
    allowed = [{1, 2, 4, 5, 6}, {0, 1, 3, 4, 6, 7}]
    assert [set(row.tolist()) for row in draw] == allowed  # all other-class and unknown rows come up
    with pytest.raises(RuntimeError, match="set negative_sampling='uniform'"):
        draw_negatives(1, 10, 3, torch.device("cpu"), torch.tensor([0, 0, 0]), torch.tensor([0]))


def test_crd_errors():
    crd = CRD(4, 4, 10, negatives=3)
    s = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"crd needs each sample's dataset index: call the distiller as d\(inputs, targets, indices=\.\.\.\)"):
        crd(s, s, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\) \(dataset_size\), got 3\.\.10"):
        crd(s, s, torch.tensor([0, 1]), indices=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"crd draws negatives from other classes, so it needs the \(2,\) class labels"):
        crd(s, s, torch.rand(2, 5), indices=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="negative_sampling must be one of other_classes, uniform"):
        CRD(4, 4, 10, negative_sampling="random")
    with pytest.raises(ValueError, match=r"method 'crd' needs the training set's size: pass dataset_size=len\(train_set\)"):
        build_method("crd", torch.Size([2, 4]), torch.Size([2, 4]))


# ------------------------------------------------------------------------------------------- ReviewKD
def hcl_by_loops(s: torch.Tensor, t: torch.Tensor) -> float:
    """One level of HCL: full-size MSE (weight 1), then 4x4, 2x2, 1x1 means (weights 1/2, 1/4, 1/8) when smaller."""
    s, t = s.detach(), t.detach()
    def pooled(x, size):
        b, c, h, w = x.shape
        return [[[[float(x[i, j, y * h // size:(y + 1) * h // size, z * w // size:(z + 1) * w // size].mean())
                   for z in range(size)] for y in range(size)] for j in range(c)] for i in range(b)]

    def mse(a, b):
        flat_a, flat_b = torch.tensor(a).flatten(), torch.tensor(b).flatten()
        return float(((flat_a - flat_b) ** 2).mean())

    loss, total, weight = mse(s.tolist(), t.tolist()), 1.0, 1.0
    for size in (4, 2, 1):
        if size < s.shape[-2]:
            weight /= 2
            loss += weight * mse(pooled(s, size), pooled(t, size))
            total += weight
    return loss / total


def test_hcl_matches_its_formula_and_by_hand():
    torch.manual_seed(6)
    student = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 1, 1)]
    teacher = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 1, 1)]
    expected = sum(hcl_by_loops(s, t) for s, t in zip(student, teacher))
    assert hcl_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    # [[1, 2], [3, 4]] against 0: MSE 30 / 4 = 7.5; the 1x1 mean 2.5 -> 6.25 at weight 1/2; (7.5 + 3.125) / 1.5.
    got = hcl_loss([torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])], [torch.zeros(1, 1, 2, 2)])
    assert got.item() == pytest.approx(10.625 / 1.5, rel=1e-6)


def abf_by_hand(abf, x, residual, out_size):
    """ABF written out: conv1 + BN (batch statistics), attention fusion, nearest resize, conv2 + BN."""
    def conv_bn(conv_bn_pair, v, padding):
        conv, bn = conv_bn_pair
        v = F.conv2d(v, conv.weight, padding=padding)
        mean, var = v.mean((0, 2, 3), keepdim=True), v.var((0, 2, 3), unbiased=False, keepdim=True)
        return (v - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)

    x = conv_bn(abf.conv1, x, 0)
    if residual is not None:
        residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
        conv = abf.attention[0]
        z = torch.sigmoid(F.conv2d(torch.cat([x, residual], 1), conv.weight, conv.bias))
        x = x * z[:, 0:1] + residual * z[:, 1:2]
    if x.shape[-2:] != out_size:
        x = F.interpolate(x, size=out_size, mode="nearest")
    return conv_bn(abf.conv2, x, 1), x


def test_reviewkd_matches_abf_and_hcl_written_out():
    torch.manual_seed(8)
    students = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)]
    teachers = [torch.randn(3, 5, 8, 8), torch.randn(3, 7, 2, 2)]
    method = build_method("reviewkd", [x.shape for x in students], [x.shape for x in teachers], warmup_epochs=4)
    assert method.schedules["reviewkd"](0.5) == 0.25  # the weighting reads it at each step's progress
    # deepest first: the pooled student vector (6x1x1) -> teacher pooled (7), then stage 2 -> teacher 7x2x2
    # (the student's 4x4 is resized to the teacher's 2x2), then stage 1 -> 5x8x8
    levels = [students[1].mean((2, 3), keepdim=True), students[1], students[0]]
    sizes = [(1, 1), (2, 2), (8, 8)]
    outputs, residual = [], None
    for abf, x, size in zip(method.abfs, levels, sizes):
        out, residual = abf_by_hand(abf, x, residual, size)
        outputs.insert(0, out)
    targets = [teachers[0], teachers[1], teachers[1].mean((2, 3), keepdim=True)]
    expected = 0.25 * sum(hcl_by_loops(o, t) for o, t in zip(outputs, targets))
    assert method.abfs[0].conv1[0].out_channels == 6  # mid = min(512, deepest student width)
    ramped = 0.25 * method(students, teachers).terms["reviewkd"]  # at epoch 0.5 of a 4-epoch ramp
    assert ramped.item() == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------- SRRL
def test_srrl_by_hand():
    # connector: 1x1 conv weight 1, BN at its initial statistics (eval: x / sqrt(1 + eps)), ReLU: student
    # map [1, 3] -> mean 2; teacher map [0, 2] -> mean 1: L_FM = 1. Head y = (x, 2x): (2, 4) vs (1, 2),
    # L_SR = (1 + 4) / 2 = 2.5.
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [2.0]]))
    method = build_method("srrl", (1, 1, 2, 1), (1, 1, 2, 1), teacher_head=head).eval()
    with torch.no_grad():
        method.connector[0].weight.fill_(1.0)
    out = method(torch.tensor([[[[1.0], [3.0]]]]), torch.tensor([[[[0.0], [2.0]]]])).terms
    scale = 1 / math.sqrt(1 + 1e-5)
    assert out["feature"].item() == pytest.approx((2 * scale - 1) ** 2, rel=1e-6)
    assert out["softmax_regression"].item() == pytest.approx(((2 * scale - 1) ** 2 + (4 * scale - 2) ** 2) / 2, rel=1e-6)
    assert out["feature"].item() == pytest.approx(1.0, rel=1e-4) and out["softmax_regression"].item() == pytest.approx(2.5, rel=1e-4)


def test_srrl_matches_its_formula():
    torch.manual_seed(9)
    head = nn.Linear(5, 3)
    method = build_method("srrl", (4, 2, 3, 3), (4, 5, 2, 2), teacher_head=head)
    s, t = torch.randn(4, 2, 3, 3), torch.randn(4, 5, 2, 2)
    c = method.connector(s).detach()
    pc = [[float(c[b, j].mean()) for j in range(5)] for b in range(4)]
    pt = [[float(t[b, j].mean()) for j in range(5)] for b in range(4)]
    l_fm = sum((pc[b][j] - pt[b][j]) ** 2 for b in range(4) for j in range(5)) / 20
    ys, yt = head(torch.tensor(pc)), head(torch.tensor(pt))
    l_sr = sum((float(ys[b, k]) - float(yt[b, k])) ** 2 for b in range(4) for k in range(3)) / 12
    out = method(s, t).terms
    assert out["feature"].item() == pytest.approx(l_fm, rel=1e-5)
    assert out["softmax_regression"].item() == pytest.approx(l_sr, rel=1e-5)


# ------------------------------------------------------------------------------------------- by names, one step
_MODELS: dict[str, nn.Module] = {}


def fresh(name: str) -> nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = models.create(name, num_classes=10)
    return copy.deepcopy(_MODELS[name])


STAGES = ["layer1", "layer2", "layer3", "layer4"]
BY_NAME = {
    "rkd": [Level("@feature", "@feature", "rkd")],
    "pkt": [Level("@feature", "@feature", "pkt", weight=30000.0)],
    "vid": [Level(STAGES, STAGES, "vid")],
    "crd": [Level("@feature", "@feature", "crd", weight=0.8, negatives=64)],
    "reviewkd": [Level(STAGES, STAGES, "reviewkd")],
    "srrl": [Level("@feature", "@feature", "srrl", teacher_head="fc")],
}


def named_levels(levels: list[Level], teacher: str, student: str) -> list[Level]:
    """'@feature' resolved through the model registry (what `diffkd distill` does for configs)."""
    def resolve(spec, name):
        if isinstance(spec, list):
            return [resolve(x, name) for x in spec]
        return models.default_taps(name).feature if spec == "@feature" else spec

    return [Level(resolve(lv.student, student), resolve(lv.teacher, teacher), lv.method, lv.weight, **lv.options)
            for lv in levels]


@pytest.mark.integration
@pytest.mark.parametrize("method", list(BY_NAME))
def test_built_from_torchvision_names_one_step_trains_student_and_method_only(method):
    teacher, student = fresh("resnet34"), fresh("resnet18")
    d = Distiller(teacher, student, named_levels(BY_NAME[method], "resnet34", "resnet18"), input_shape=(3, 64, 64),
                  dataset_size=100)
    snap = {k: v.detach().clone() for k, v in d.state_dict().items()}
    teacher_before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    d.train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    out = d(x, y, indices=torch.tensor([3, 50, 7, 99]), progress=(0.5, 10))  # reviewkd's warm-up follows it
    assert torch.isfinite(out.loss)
    (F.cross_entropy(out.student, y) + out.loss).backward()
    opt.step()
    changed = {k for k, v in snap.items() if not torch.equal(v, d.state_dict()[k])}
    assert any(k.startswith("student.") for k in changed)
    method_params = {f"methods.{k}": p for k, p in d.methods.named_parameters()}
    assert (method_params == {}) == (method in ("rkd", "pkt"))  # RKD and PKT learn nothing of their own
    assert [k for k, p in method_params.items() if p.grad is None or not p.grad.abs().sum()] == []
    assert set(method_params) <= changed
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert teacher.training is False and not any(k.startswith("teacher") for k in d.state_dict())


def test_crd_in_a_distiller_has_its_bank_in_the_state_dict_sized_from_taps_and_data():
    d = Distiller(fresh("resnet34"), fresh("resnet18"), [Level("layer4", "avgpool", "crd")], input_shape=(3, 64, 64),
                  dataset_size=37)
    state = d.state_dict()
    assert state["methods.crd_layer4.memory_student"].shape == (37, 128)
    assert state["methods.crd_layer4.embed_teacher.weight"].shape == (128, 512)  # avgpool's (B,512,1,1) pooled
    assert {"methods.crd_layer4.normalizers", "methods.crd_layer4.labels"} <= state.keys()
    with pytest.raises(ValueError, match=r"level 'crd_layer4' needs each sample's dataset index: call the distiller as "
                                         r"d\(inputs, targets, indices=\.\.\.\)"):
        d(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------- levels with several taps
def test_epoch_ramps_move_with_the_progress_the_engine_gives_the_distiller():
    """The engine gives the Distiller the progress of every step: ReviewKD's and DKD's ramps follow it, per epoch."""
    d = Distiller(fresh("resnet34"), fresh("resnet18"), [Level(STAGES, STAGES, "reviewkd", warmup_epochs=4),
                                                          Level("fc", "fc", "dkd", warmup_epochs=4)], input_shape=(3, 32, 32))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for epoch, ramp in [(0.0, 0.25), (0.9, 0.25), (1.0, 0.5), (2.5, 0.75), (3.99, 1.0), (7.0, 1.0)]:
        out = d(x, y, progress=(epoch, 10))
        assert [out.weights["reviewkd_layer1"], out.weights["dkd_fc"]] == [ramp, ramp], epoch


def test_reviewkd_errors_name_the_taps():
    t, s = fresh("resnet34"), fresh("resnet18")
    with pytest.raises(ValueError) as info:
        Distiller(t, s, [Level(STAGES, STAGES[1:], "reviewkd")], input_shape=(3, 64, 64))
    message = str(info.value)
    assert "level 'reviewkd_layer1' (['layer1', 'layer2', 'layer3', 'layer4'] -> ['layer2', 'layer3', 'layer4'])" in message
    assert "reviewkd pairs the taps in order, but there are 4 student and 3 teacher taps" in message
    with pytest.raises(ValueError) as info:
        Distiller(t, s, [Level(["layer1", "layer3", "layer2"], STAGES[:3], "reviewkd")], input_shape=(3, 64, 64))
    message = str(info.value)
    assert "['layer1', 'layer3', 'layer2']" in message
    assert ("reviewkd fuses stages listed shallow to deep, but student tap 2 (2, 128, 8, 8) is larger than student "
            "tap 1 (2, 256, 4, 4); list the taps from the shallowest to the deepest") in message
    with pytest.raises(ValueError, match=r"reviewkd reads map captures, but the teacher tap 1 is 'vector'"):
        Distiller(t, s, [Level(["layer3", "layer4"], ["layer3", "fc"], "reviewkd")], input_shape=(3, 64, 64))


def test_lists_of_taps_are_refused_by_single_tap_methods_and_must_not_be_empty():
    t, s = fresh("resnet34"), fresh("resnet18")
    with pytest.raises(ValueError, match=r"method 'mse' takes one student tap and one teacher tap, not lists; give single "
                                         r"taps \(methods that take lists: reviewkd, vid\)"):
        Distiller(t, s, [Level(["layer3", "layer4"], ["layer3", "layer4"], "mse")], input_shape=(3, 64, 64))
    with pytest.raises(ValueError, match="vid pairs student and teacher taps: give one tap on each side or a list on each"):
        Distiller(t, s, [Level(["layer3"], "layer3", "vid")], input_shape=(3, 64, 64))
    with pytest.raises(ValueError, match="level 'vid_layer3': the list of teacher taps is empty; give at least one tap"):
        Distiller(t, s, [Level(["layer3"], [], "vid")], input_shape=(3, 64, 64))
    with pytest.raises(ValueError, match=r"tap 'vid_layer3\[1\]': unknown module path 'layer9'"):
        Distiller(t, s, [Level(["layer3", "layer9"], ["layer3", "layer4"], "vid")], input_shape=(3, 64, 64))


def test_a_multi_tap_level_gets_its_captures_in_order():
    t, s = fresh("resnet34"), fresh("resnet18")
    d = Distiller(t, s, [Level(["layer2", "layer4"], ["layer3", "layer4"], "vid")], input_shape=(3, 64, 64))
    assert [(p.regressor[0].in_channels, p.regressor[0].out_channels) for p in d.methods["vid_layer2"].pairs] == [(128, 256), (512, 512)]
    x = torch.randn(2, 3, 64, 64)
    out = d(x)
    with torch.no_grad():
        feats = {}
        hooks = [getattr(m, n).register_forward_hook(lambda _m, _i, o, key=(k, n): feats.__setitem__(key, o))
                 for k, m in (("s", s), ("t", t)) for n in ("layer2", "layer3", "layer4")]
        s(x), t(x)
        for h in hooks:
            h.remove()
        vid = d.methods["vid_layer2"]
        expected = vid.pairs[0](feats["s", "layer2"], feats["t", "layer3"]) + vid.pairs[1](feats["s", "layer4"], feats["t", "layer4"])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------- a frozen teacher module by path
def test_teacher_head_is_frozen_unregistered_follows_the_teacher_and_passes_gradient():
    t, s = fresh("resnet34"), fresh("resnet18")
    d = Distiller(t, s, [Level("layer4", "layer4", "srrl", teacher_head="fc")], input_shape=(3, 64, 64))
    method = d.methods["srrl_layer4"]
    assert method.teacher_head is t.fc
    assert not any("teacher_head" in k or "fc" in k.split(".")[2:3] for k in d.methods.state_dict())
    trainable = {id(p) for p in d.trainable_parameters()}
    assert not any(id(p) in trainable for p in t.fc.parameters())
    d.train()
    assert method.training and not method.teacher_head.training
    before = t.fc.weight.detach().clone()
    out = d(torch.randn(2, 3, 64, 64))
    out.losses["srrl_layer4/softmax_regression"].backward()
    assert s.layer4[1].conv2.weight.grad.abs().sum() > 0  # through the frozen head to the student
    assert t.fc.weight.grad is None and torch.equal(t.fc.weight, before)
    d.to(torch.float64)
    assert method.teacher_head.weight.dtype == torch.float64 and t.fc.weight.dtype == torch.float64


def test_teacher_head_errors():
    t, s = fresh("resnet34"), fresh("resnet18")
    with pytest.raises(ValueError) as info:
        Distiller(t, s, [Level("layer4", "layer4", "srrl", teacher_head="fcc")], input_shape=(3, 64, 64))
    assert ("option 'teacher_head' (a module path of the teacher): unknown module path 'fcc' in ResNet; closest paths: 'fc'"
            in str(info.value))
    with pytest.raises(ValueError, match=r"srrl needs teacher_head=<module path of the teacher's classifier>, e\.g\. "
                                         r"teacher_head='fc'"):
        Distiller(t, s, [Level("layer4", "layer4", "srrl")], input_shape=(3, 64, 64))
    with pytest.raises(ValueError, match=r"srrl: teacher_head \(Linear\) does not take the teacher tap's pooled \(B, 256\) "
                                         r"vector"):
        Distiller(t, s, [Level("layer4", "layer3", "srrl", teacher_head="fc")], input_shape=(3, 64, 64))


# ------------------------------------------------------------------------------------------- CRD under DDP
def _crd_ddp_worker(rank: int, world: int, port: int, results) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial bank and heads in both processes
    crd = CRD(3, 3, 8, feat_dim=2, negatives=4)
    before = crd.memory_student.clone()
    torch.manual_seed(10 + rank)  # each process its own samples
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    indices = torch.tensor([0, 1]) + 4 * rank
    crd(s, t, torch.tensor([rank, 2]), indices=indices)
    banks = [torch.zeros_like(crd.memory_student) for _ in range(world)]
    dist.all_gather(banks, crd.memory_student)
    changed = sorted({int(i) for i in (banks[0] != before).any(1).nonzero().flatten()})
    results[rank] = (torch.equal(banks[0], banks[1]), changed, crd.labels.tolist(), crd.normalizers.tolist())
    dist.destroy_process_group()


@pytest.mark.integration
def test_crd_under_ddp_updates_every_process_bank_with_the_global_batch():
    results = spawn_processes(_crd_ddp_worker)
    (same0, rows0, labels0, z0), (same1, rows1, labels1, z1) = results[0], results[1]
    assert same0 and same1 and rows0 == rows1 == [0, 1, 4, 5]  # both processes' rows, in both banks
    assert labels0 == labels1 == [0, 2, -1, -1, 1, 2, -1, -1]
    assert z0 == z1  # Z from the mean over processes


def test_an_unknown_option_lists_the_options_a_level_may_give():
    with pytest.raises(ValueError, match=r"method 'crd' got an unknown option 'negative' \(did you mean 'negatives'\?\); "
                                         r"valid options: feat_dim, negatives, temperature, momentum, negative_sampling"):
        build_method("crd", torch.Size([2, 4]), torch.Size([2, 4]), dataset_size=10, negative=5)
    with pytest.raises(ValueError, match=r"method 'reviewkd' got an unknown option 'warmup'.*valid options: "
                                         r"max_mid_channels, warmup_epochs"):
        build_method("reviewkd", [torch.Size([2, 4, 4, 4])], [torch.Size([2, 4, 4, 4])], warmup=3)
