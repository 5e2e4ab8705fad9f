"""KD, DIST, DKD and attention-MSE against formulas written out element by element here."""
import math

import pytest
import torch

from diffkd.losses import NamedDistance, attention_mse_loss, dist_loss, dkd_loss, kd_loss

S = [[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 2.5, 1.0], [-1.0, 0.0, 1.0, 3.0]]
T = [[2.0, 1.0, 0.0, -0.5], [0.0, 0.1, 3.0, 0.2], [0.5, -0.5, 2.0, 1.0]]
Y = [0, 2, 3]


def softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / den


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd(tau):
    expected = tau**2 * sum(kl(softmax(t, tau), softmax(s, tau)) for s, t in zip(S, T)) / len(S)
    assert kd_loss(torch.tensor(S), torch.tensor(T), tau).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau,beta,gamma", [(1.0, 1.0, 1.0), (2.0, 0.5, 2.0)])
def test_dist(tau, beta, gamma):
    ys = [softmax(s, tau) for s in S]
    yt = [softmax(t, tau) for t in T]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / len(S)
    cols = range(len(S[0]))
    intra = 1 - sum(pearson([r[j] for r in ys], [r[j] for r in yt]) for j in cols) / len(S[0])
    expected = tau**2 * (beta * inter + gamma * intra)
    got = dist_loss(torch.tensor(S), torch.tensor(T), beta=beta, gamma=gamma, tau=tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dist_on_maps_treats_every_pixel_as_a_sample():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    rows_s = [s[b, :, i, j].tolist() for b in range(2) for i in range(3) for j in range(4)]
    rows_t = [t[b, :, i, j].tolist() for b in range(2) for i in range(3) for j in range(4)]
    ys, yt = [softmax(r) for r in rows_s], [softmax(r) for r in rows_t]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    intra = 1 - sum(pearson([r[c] for r in ys], [r[c] for r in yt]) for c in range(5)) / 5
    assert dist_loss(s, t).item() == pytest.approx(inter + intra, rel=1e-5)


def test_kd_and_dist_on_sequences_treat_every_position_as_a_sample():
    """Frame-wise logits (B,C,L), channel-first as taps hand them out: B*L samples of C classes."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    rows_s = [s[b, :, i].tolist() for b in range(2) for i in range(7)]
    rows_t = [t[b, :, i].tolist() for b in range(2) for i in range(7)]
    tau = 2.0
    expected_kd = tau**2 * sum(kl(softmax(r, tau), softmax(q, tau)) for q, r in zip(rows_s, rows_t)) / len(rows_s)
    assert kd_loss(s, t, tau).item() == pytest.approx(expected_kd, rel=1e-5)
    ys, yt = [softmax(r) for r in rows_s], [softmax(r) for r in rows_t]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    intra = 1 - sum(pearson([r[c] for r in ys], [r[c] for r in yt]) for c in range(5)) / 5
    assert dist_loss(s, t).item() == pytest.approx(inter + intra, rel=1e-5)
    with pytest.raises(ValueError, match=r"expected logits of shape \(B,K\), \(B,C,L\) or \(B,C,H,W\), got \(2, 5, 3, 4, 1\)"):
        kd_loss(torch.zeros(2, 5, 3, 4, 1), torch.zeros(2, 5, 3, 4, 1))


@pytest.mark.parametrize("alpha,beta,tau", [(1.0, 8.0, 4.0), (0.5, 0.5, 1.0)])
def test_dkd(alpha, beta, tau):
    tckd = nckd = 0.0
    for s, t, y in zip(S, T, Y):
        ps, pt = softmax(s, tau), softmax(t, tau)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        rest_s = softmax([v for j, v in enumerate(s) if j != y], tau)
        rest_t = softmax([v for j, v in enumerate(t) if j != y], tau)
        nckd += kl(rest_t, rest_s)
    expected = tau**2 * (alpha * tckd + beta * nckd) / len(S)
    got = dkd_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), alpha=alpha, beta=beta, tau=tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_attention_mse():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)
    tau, total = 0.5, 0.0
    for b in range(2):
        spatial_logits = [sum(abs(t[b, c, i, j].item()) for c in range(3)) / 3 / tau for i in range(2) for j in range(3)]
        spatial = [6 * w for w in softmax(spatial_logits)]
        channel_logits = [sum(abs(v) for v in t[b, c].flatten().tolist()) / 6 / tau for c in range(3)]
        channel = [3 * w for w in softmax(channel_logits)]
        for c in range(3):
            for i in range(2):
                for j in range(3):
                    total += (s[b, c, i, j].item() - t[b, c, i, j].item()) ** 2 * spatial[i * 3 + j] * channel[c]
    assert attention_mse_loss(s, t).item() == pytest.approx(total / s.numel(), rel=1e-5)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"student and teacher shapes differ: \(2, 3\) vs \(2, 4\)"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"targets of shape \(2,\)"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_dkd_refuses_targets_that_are_not_class_indices(dtype):
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    targets = torch.tensor([0, 1.7, 2, 3]).to(dtype)
    with pytest.raises(ValueError) as info:
        dkd_loss(s, t, targets)
    assert str(info.value) == (
        f"dkd_loss: targets must be integer class indices, got dtype {dtype}; pass the class labels as a torch.long tensor"
    )


def test_a_diffkd_level_uses_the_distance_s_own_temperature():
    """attention_mse defaults to its own tau 0.5 (not the KL's 1); a distance without a temperature refuses one."""
    from diffkd import DiffKD

    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    level = DiffKD(4, 4, distance="attention_mse")
    assert level.distance(s, t).item() == pytest.approx(attention_mse_by_hand(s, t, 0.5), rel=1e-5)
    assert DiffKD(4, 4, distance="kl", kind="mlp").distance(s[:, :, 0, 0], t[:, :, 0, 0]).item() == pytest.approx(
        kd_loss(s[:, :, 0, 0], t[:, :, 0, 0], tau=1.0).item())
    warmer = DiffKD(4, 4, distance=NamedDistance("attention_mse", 2.0))  # another temperature: a distance object
    assert warmer.distance(s, t).item() == pytest.approx(attention_mse_by_hand(s, t, 2.0), rel=1e-5)
    with pytest.raises(ValueError, match=r"^distance 'mse' has no temperature, but tau=2.0 was given: drop tau$"):
        NamedDistance("mse", 2.0)


def attention_mse_by_hand(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    b, c, h, w = t.shape
    total = 0.0
    for i in range(b):
        mag = t[i].abs()
        spatial = torch.softmax(mag.mean(0).flatten() / tau, 0).view(h, w) * h * w
        channel = torch.softmax(mag.mean((1, 2)) / tau, 0) * c
        total += float(((s[i] - t[i]) ** 2 * spatial[None] * channel[:, None, None]).sum())
    return total / (b * c * h * w)
