"""Schedule, add_noise, DDIM step and chain against formulas written here."""
import copy
import math

import pytest
import torch

from diffkd.diffusion import (
    DDIM,
    Bottleneck,
    NoisePredictor,
    NoiseSchedule,
    VectorBatchNorm,
)
from diffkd.folded import batch_norm_with, folded_chain, linear_steps, scaled_prediction

# docs/design.md §3: abar at t = 400, 300, 200, 100, 0
EXPECTED_ABAR = {400: 0.193572, 300: 0.394011, 200: 0.656347, 100: 0.895141, 0: 0.9999}


def abar_by_hand(t: int) -> float:
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    return math.prod(1 - b for b in betas[: t + 1])


def test_schedule_values():
    s = NoiseSchedule()
    for t, value in EXPECTED_ABAR.items():
        assert s.alphas_cumprod[t].item() == pytest.approx(value, abs=1e-6)
        assert s.alphas_cumprod[t].item() == pytest.approx(abar_by_hand(t), rel=1e-5)
    assert s.alphas_cumprod.dtype == torch.float32


def test_schedule_stays_float32_and_out_of_state_dict():
    s = NoiseSchedule().to(torch.bfloat16)
    assert s.alphas_cumprod.dtype == torch.float32
    assert s.alphas_cumprod[0].item() == pytest.approx(0.9999, abs=1e-6)
    assert "alphas_cumprod" not in s.state_dict()


@pytest.mark.parametrize(
    "steps,expected",
    [(5, [400, 300, 200, 100, 0]), (1, [0]), (2, [250, 0]), (3, [332, 166, 0]), (8, [434, 372, 310, 248, 186, 124, 62, 0])],
)
def test_inference_timesteps_follow_nfe_rule(steps, expected):
    assert NoiseSchedule().inference_timesteps(steps) == expected


def test_add_noise_formula():
    torch.manual_seed(0)
    s = NoiseSchedule()
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    out = s.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        a = abar_by_hand(ti)
        assert torch.allclose(out[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-5)


def test_one_ddim_step_matches_formula_and_fused_coefficients():
    torch.manual_seed(0)
    ddim = DDIM(NoiseSchedule(), 5)
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a_t, a_prev = abar_by_hand(300), abar_by_hand(200)
    x0_hat = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
    expected = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev) * e
    by_hand = x
    for t, t_prev in [(400, 300), (300, 200), (200, 100), (100, 0), (0, None)]:  # the whole chain, eps fixed
        a_t, a_p = abar_by_hand(t), 1.0 if t_prev is None else abar_by_hand(t_prev)
        by_hand = math.sqrt(a_p) * (by_hand - math.sqrt(1 - a_t) * e) / math.sqrt(a_t) + math.sqrt(1 - a_p) * e
    assert torch.allclose(ddim(x, lambda x, t: e), by_hand, atol=1e-5)
    t, a, b, c = linear_steps(ddim)[1][:4]
    assert (t, c) == (300, 0.0)
    assert torch.allclose(a * x + b * e, expected, atol=1e-5)
    # after t = 0 the chain lands on x0_hat itself (abar_prev = 1)
    t0, a0, b0 = linear_steps(ddim)[-1][:3]
    a_0 = abar_by_hand(0)
    assert t0 == 0
    assert torch.allclose(a0 * x + b0 * e, (x - math.sqrt(1 - a_0) * e) / math.sqrt(a_0), atol=1e-5)


@pytest.mark.parametrize("steps", range(1, 11))
def test_chain_recovers_x0_with_oracle_noise(steps):
    torch.manual_seed(steps)
    s = NoiseSchedule()
    x0, eps = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    t_start = s.inference_timesteps(steps)[0]
    a = abar_by_hand(t_start)
    x_start = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    out = DDIM(s, steps)(x_start, lambda x, t: eps)
    assert torch.allclose(out, x0, atol=1e-5)


def test_noise_predictor_adds_time_embedding_row():
    p = NoisePredictor(4, "conv").eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        by_int = p(x, 300)
        by_tensor = p(x, torch.tensor([300, 300]))
        manual = p.layers(x + p.time_embedding.weight[300].view(1, 4, 1, 1))
    assert torch.allclose(by_int, manual) and torch.allclose(by_tensor, manual)


def test_vector_path_equals_1x1_map_path():
    """The mlp kind runs on (B,C) vectors; it must compute what it would on (B,C,1,1) maps."""
    torch.manual_seed(0)
    vec = NoisePredictor(6, "mlp")
    maps = NoisePredictor(6, "mlp")
    maps.load_state_dict(vec.state_dict())
    x = torch.randn(5, 6)
    out_vec, out_map = vec(x, 300), maps(x[:, :, None, None], 300)
    assert torch.allclose(out_vec, out_map.flatten(1), atol=1e-5)
    for a, b in zip(vec.state_dict().values(), maps.state_dict().values()):  # same BN statistics
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_folded_noise_prediction_equals_the_reference():
    """The fast path noises and adds the time embedding in the same passes: the same eps_hat."""
    from diffkd.folded import FoldedPath
    from diffkd.module import ReferencePath

    torch.manual_seed(0)
    s, predictor = NoiseSchedule(), NoisePredictor(4, "conv").eval()
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([7, 400, 990])
    with torch.no_grad():
        by_hand = predictor.layers(s.add_noise(x0, eps, t) + predictor.time_embedding(t).view(3, 4, 1, 1))
        folded = FoldedPath(DDIM(s, 5), "conv", 2).predict_noise(predictor, s, x0, eps, t)
        reference = ReferencePath(DDIM(s, 5)).predict_noise(predictor, s, x0, eps, t)
    assert torch.allclose(folded, by_hand, atol=1e-5) and torch.allclose(reference, by_hand, atol=1e-5)


# ------------------------------------------------------------------ the folded chain (fast path)
def _batch_norm_by_hand(x, weight, bias, eps=1e-5):
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("momentum,track", [(0.1, True), (None, True), (0.1, False)])
def test_vector_batchnorm_behaves_as_batchnorm2d(momentum, track):
    """VectorBatchNorm reimplements BatchNorm2d's forward (to take another affine): same outputs,
    running statistics and batch counter, in training and in eval."""
    torch.manual_seed(0)
    ours, torchs = VectorBatchNorm(5, momentum=momentum, track_running_stats=track), torch.nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track)
    with torch.no_grad():
        for m in (ours, torchs):
            m.weight.copy_(torch.linspace(0.5, 2, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3) * 3 + 1
        out = ours(x)
        assert torch.allclose(out, torchs(x), atol=1e-6)
    assert torch.allclose(out, _batch_norm_by_hand(x, ours.weight, ours.bias), atol=1e-5)
    for (name, a), b in zip(ours.named_buffers(), torchs.buffers()):
        assert torch.equal(a, b), name
    ours.eval(), torchs.eval()
    assert torch.allclose(ours(x), torchs(x), atol=1e-6)
    w, b = torch.randn(5), torch.randn(5)
    ours.train()
    assert torch.allclose(batch_norm_with(ours, x, w, b), _batch_norm_by_hand(x, w, b), atol=1e-5)


def _chain_pair(kind, last=None):
    torch.manual_seed(0)
    predictor = NoisePredictor(8, kind)
    if last is not None:
        predictor.layers[-1] = last
    twin = copy.deepcopy(predictor)
    x = torch.randn(6, 8, 3, 3) if kind == "conv" else torch.randn(6, 8)
    return predictor, twin, x


@pytest.mark.parametrize("kind,last", [("conv", None), ("mlp", None), ("conv", torch.nn.BatchNorm2d(8))])
def test_folded_chain_equals_reference_chain(kind, last):
    """folded_chain (state carries the next embedding, a*x + b*eps folded into the last layer)
    gives the reference chain's output, input and parameter gradients and BN statistics. The third
    case has a last layer it cannot fold into (as after SyncBatchNorm conversion): applied after."""
    predictor, twin, x = _chain_pair(kind, last)
    ddim = DDIM(NoiseSchedule(), 5)
    x_ref, x_fold = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = ddim(x_ref, predictor)
    folded = folded_chain(x_fold + twin.embed(ddim.timesteps[0], x.dim()), twin, linear_steps(ddim))
    assert torch.allclose(folded, ref, atol=1e-5)
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    (folded * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    assert torch.allclose(x_fold.grad, x_ref.grad, atol=1e-5)
    for (name, p), q in zip(predictor.named_parameters(), twin.parameters()):
        assert torch.allclose(q.grad, p.grad, atol=1e-4, rtol=1e-4), name
    for (name, a), b in zip(predictor.named_buffers(), twin.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_scaled_output_formula():
    torch.manual_seed(0)
    predictor = NoisePredictor(8, "conv")
    h, shift = torch.randn(4, 8, 3, 3), torch.randn(1, 8, 1, 1)
    twin = copy.deepcopy(predictor)
    assert torch.allclose(scaled_prediction(twin, h, -0.3, shift), -0.3 * predictor.layers(h) + shift, atol=1e-5)


def test_bottleneck_residual_keeps_float32_under_autocast():
    """The residual is added in place only when dtypes match: under bf16 autocast a float32 input
    still gives a float32 sum, as the out-of-place add did."""
    block, x = Bottleneck(8), torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.float32
    torch.manual_seed(0)
    block = Bottleneck(8)
    assert torch.allclose(block(x), block.block(x) + x, atol=1e-6)
