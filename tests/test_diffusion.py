"""Schedule, add_noise, DDIM step and chain against formulas written here."""
import math

import pytest
import torch

from diffkd.diffusion import NoisePredictor, NoiseSchedule, ddim_step, denoise

# DESIGN.md §1: abar at t = 400, 300, 200, 100, 0
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
    s = NoiseSchedule()
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a_t, a_prev = abar_by_hand(300), abar_by_hand(200)
    x0_hat = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
    expected = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev) * e
    assert torch.allclose(ddim_step(x, e, a_t, a_prev), expected, atol=1e-5)
    t, a, b = s.ddim_coefficients(5)[1]
    assert t == 300
    assert torch.allclose(a * x + b * e, expected, atol=1e-5)
    # after t = 0 the chain lands on x0_hat itself (abar_prev = 1)
    t0, a0, b0 = s.ddim_coefficients(5)[-1]
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
    out = denoise(x_start, lambda x, t: eps, s.ddim_coefficients(steps))
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
