"""DiffKD beyond the paper (issue 17): kd warm-up, normalised targets, DPM-Solver++(2M), logit
standardization. Each against formulas or hand values written here, plus the fast path with all on."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diffkd import DiffKD, Distiller, Level
from diffkd.diffusion import DDIM, DPMSolver2M, NoiseSchedule
from diffkd.folded import folded_chain, linear_steps
from diffkd.losses import dkd_loss, kd_loss, standardize_logits
from diffkd.methods import build_method
from diffkd.methods.diffkd import level_distance
from diffkd.methods.dkd import DKD
from diffkd.normalizer import NormalizedDistance, StandardizedDistance, TargetNormalizer
from conftest import weighted_terms
from test_diffusion import _chain_pair


def variant(student_channels: int, teacher_channels: int, latent_channels: int | None = None, *,
            distance: str = "mse", tau: float | None = None, normalize_target: bool = False, standardize: bool = False,
            **options) -> DiffKD:
    """A level with the method's distance options composed as the method composes them (methods.diffkd)."""
    measure = level_distance(distance, tau, normalize_target, standardize, latent_channels or teacher_channels)
    return DiffKD(student_channels, teacher_channels, latent_channels, distance=measure, **options)


# ------------------------------------------------------------------ 1. kd warm-up, per step
def test_kd_warmup_ramps_the_kd_weight_per_step():
    """The method declares its weights and the kd term's warm-up; the weighting applies them at each progress."""
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 4, 4), torch.randn(3, 6, 4, 4)
    method = build_method("diffkd", s.shape, t.shape, latent_channels=8, kd_weight=3.0, diffusion_weight=0.5,
                          ae_weight=2.0, kd_warmup_epochs=2)
    out = method(s, t)
    assert out.terms["kd"] > 0  # computed (and logged) during the ramp too
    for epoch, ramp in [(0.0, 0.0), (0.25, 0.125), (1.0, 0.5), (1.75, 0.875), (2.0, 1.0), (3.6, 1.0)]:
        weighted = weighted_terms(method, out, epoch)
        expected = 3.0 * ramp * out.terms["kd"] + 0.5 * out.terms["diffusion"] + 2.0 * out.terms["ae"]
        assert torch.allclose(sum(weighted.values()), expected, atol=1e-6), epoch


def test_kd_warmup_reaches_the_method_terms_through_the_distiller():
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    d = Distiller(teacher, student, [Level("", "", "diffkd", distance="kl", kd_weight=2.0, kd_warmup_epochs=4)],
                  input_shape=(6,))
    x = torch.randn(4, 6)
    out = d(x, progress=(1.0, 10))  # a quarter of the way: weight 2 * 0.25
    torch.manual_seed(1)
    full = d(x, progress=(4.0, 10)).losses["diffkd_output/kd"]  # the full weight, same inputs and noise draws
    torch.manual_seed(1)
    quarter = d(x, progress=(torch.tensor(1.0, dtype=torch.float64), 10))  # as the engine passes it
    assert torch.allclose(quarter.losses["diffkd_output/kd"], 0.25 * full, atol=1e-6)
    assert quarter.weights["diffkd_output/kd"].item() == 0.5 and out.weights["diffkd_output/kd"] == 0.5
    assert "diffkd_output/diffusion" in out.losses


def test_kd_warmup_without_progress_is_an_error_in_training_only():
    teacher, student = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    d = Distiller(teacher, student, [Level("", "", "diffkd", distance="kl", kd_warmup_epochs=1)], input_shape=(6,))
    with pytest.raises(ValueError, match=r"term 'kd' follows training \(Warmup\(epochs=1.0\)\), so each step needs the "
                                         r"training progress"):
        d(torch.randn(2, 6))
    assert torch.isfinite(d.eval()(torch.randn(2, 6)).loss)


def test_dkd_ramp_keeps_its_per_epoch_steps():
    """DKD reads the same per-step progress, but its ramp moves per whole epoch: (epoch + 1) / warm-up."""
    dkd = DKD(warmup_epochs=4)
    s, t, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 2, 4])
    full = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    for epoch, ramp in [(0.0, 0.25), (0.9, 0.25), (1.0, 0.5), (2.5, 0.75), (3.99, 1.0), (7.0, 1.0)]:
        assert torch.allclose(weighted_terms(dkd, dkd(s, t, y), epoch)["dkd"], ramp * full), epoch
        tensor_epoch = torch.tensor(epoch, dtype=torch.float64)  # what the engine passes: the same values
        assert dkd.schedules["dkd"](tensor_epoch).item() == pytest.approx(ramp)


# ------------------------------------------------------------------ 2. normalised targets
def test_target_normalizer_statistics_by_hand():
    torch.manual_seed(0)
    norm = TargetNormalizer(3)
    assert list(norm.parameters()) == []
    batches = [torch.randn(4, 3, 2, 5) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1) + 2.0 for _ in range(2)]
    running_mean, running_var = [0.0] * 3, [1.0] * 3
    for target in batches:
        denoised = torch.randn_like(target)
        got_d, got_t = norm(denoised, target)
        for c in range(3):
            values = target[:, c].flatten().tolist()
            n = len(values)
            mean = sum(values) / n
            var = sum((v - mean) ** 2 for v in values) / n
            std = math.sqrt(var + 1e-5)
            assert torch.allclose(got_t[:, c], (target[:, c] - mean) / std, atol=1e-5)
            assert torch.allclose(got_d[:, c], (denoised[:, c] - mean) / std, atol=1e-5)
            running_mean[c] = 0.9 * running_mean[c] + 0.1 * mean
            running_var[c] = 0.9 * running_var[c] + 0.1 * var * n / (n - 1)
    assert torch.allclose(norm.running_mean, torch.tensor(running_mean), atol=1e-5)
    assert torch.allclose(norm.running_var, torch.tensor(running_var), atol=1e-4)
    norm.eval()  # eval: the running statistics, and they stay put
    x = torch.randn(2, 3, 2, 2)
    _, got = norm(x, x)
    expected = (x - torch.tensor(running_mean).view(1, 3, 1, 1)) / (torch.tensor(running_var).view(1, 3, 1, 1) + 1e-5).sqrt()
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(norm.running_mean, torch.tensor(running_mean), atol=1e-5)


def test_normalized_target_gradient_routes():
    torch.manual_seed(0)
    level = variant(8, 12, latent_channels=16, normalize_target=True)
    assert list(level.distance.parameters()) == []
    assert {"distance.normalizer.running_mean", "distance.normalizer.running_var"} <= level.state_dict().keys()
    s = torch.randn(4, 8, 5, 5, requires_grad=True)
    t = torch.randn(4, 12, 5, 5, requires_grad=True)
    out = level(s, t)
    # the distance is MSE between both sides mapped with the target's detached batch statistics
    z = out.target.float()
    mean = z.mean(dim=(0, 2, 3), keepdim=True)
    std = (z.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    by_hand = F.mse_loss((out.denoised - mean) / std, (z - mean) / std)
    assert torch.allclose(out.kd_loss, by_hand, atol=1e-6)
    g_module = torch.autograd.grad(out.kd_loss, out.denoised, retain_graph=True)[0]
    g_hand = torch.autograd.grad(by_hand, out.denoised, retain_graph=True)[0]
    assert torch.allclose(g_module, g_hand, atol=1e-8)  # no gradient through the statistics
    assert torch.autograd.grad(out.kd_loss, s, retain_graph=True)[0].abs().sum() > 0
    ae = list(level.autoencoder.parameters())
    assert all(g is None for g in torch.autograd.grad(out.kd_loss, ae, retain_graph=True, allow_unused=True))
    out.loss.backward()
    assert t.grad is None


def _kd_after_teacher_rescaling(normalize: bool, scale: torch.Tensor) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """kd loss and student gradient for teacher t and for teacher scale * t (the denoised side of the
    second level scaled alike, through its output projection's BatchNorm affine)."""
    torch.manual_seed(0)
    level = variant(6, 10, normalize_target=normalize)
    rescaled = copy.deepcopy(level)
    with torch.no_grad():
        bn = rescaled.output_projection[1]
        bn.weight.mul_(scale)
        bn.bias.mul_(scale)
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 6, 5, 5, generator=g), torch.randn(4, 10, 5, 5, generator=g) * 2 + 1
    noises = dict(start_noise=torch.randn(4, 10, 5, 5, generator=g), diffusion_noise=torch.randn(4, 10, 5, 5, generator=g),
                  diffusion_timesteps=torch.tensor([5, 300, 600, 900]))
    results = []
    for lv, teacher in ((level, t), (rescaled, t * scale.view(1, -1, 1, 1))):
        student = s.clone().requires_grad_()
        kd = lv(student, teacher, **noises).kd_loss
        results.append((kd.item(), torch.autograd.grad(kd, student)[0]))
    return results[0][0], results[1][0], results[0][1], results[1][1]


def test_normalized_target_makes_the_kd_loss_free_of_the_teacher_scale():
    scale = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 0.5, 7.0, 1000.0])  # var far above eps 1e-5
    kd, kd_rescaled, grad, grad_rescaled = _kd_after_teacher_rescaling(True, scale)
    assert kd_rescaled == pytest.approx(kd, rel=1e-4)
    assert (grad_rescaled - grad).abs().max() <= 1e-3 * grad.abs().max()
    plain, plain_rescaled, _, _ = _kd_after_teacher_rescaling(False, scale)
    assert plain_rescaled > 100 * plain  # without it the loss follows the feature's magnitude


# ------------------------------------------------------------------ 3. DPM-Solver++(2M)
def _solver_by_design(x, predictor, timesteps, abar):
    """docs/design.md §3 written out: DDIM first step, the 2M update after, the data prediction to sigma 0."""
    alpha = [math.sqrt(abar[t]) for t in timesteps] + [1.0]
    sigma = [math.sqrt(1 - abar[t]) for t in timesteps] + [0.0]
    lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1])]
    x0_hats = []
    for i, t in enumerate(timesteps):
        x0_hats.append((x - sigma[i] * predictor(x, t)) / alpha[i])
        if i == len(timesteps) - 1:
            return x0_hats[-1]
        h = lam[i + 1] - lam[i]
        if i == 0:
            data = x0_hats[-1]
        else:
            r = (lam[i] - lam[i - 1]) / h
            data = (1 + 1 / (2 * r)) * x0_hats[-1] - (1 / (2 * r)) * x0_hats[-2]
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * (math.exp(-h) - 1) * data


def _a_predictor(x, t):  # a fixed nonlinear stand-in for the network, different per timestep
    return torch.tanh(x * (0.5 + t / 1000)) + 0.1 * math.cos(t)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_dpm_solver_chain_matches_its_formulas(steps):
    schedule = NoiseSchedule()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    calls = []

    def counted(x, t):
        calls.append(t)
        return _a_predictor(x, t)

    got = DPMSolver2M(schedule, steps)(x, counted)
    assert calls == schedule.inference_timesteps(steps)  # one evaluation per timestep: NFE = steps
    abar = [a for a in schedule.abar_values]
    expected = _solver_by_design(x, _a_predictor, schedule.inference_timesteps(steps), abar)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    ddim = DDIM(schedule, steps)(x, _a_predictor)
    if steps <= 2:  # no step has a second-order correction: DDIM, to float32 rounding (the chain's state)
        assert torch.allclose(got, ddim, rtol=0, atol=1e-6)
    else:
        assert (got - ddim).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 3, 5, 8])
def test_dpm_solver_with_an_oracle_stays_on_the_trajectory_and_recovers_x0(steps):
    torch.manual_seed(steps)
    schedule = NoiseSchedule()
    abar = schedule.abar_values
    x0, eps = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    seen = []

    def oracle(x, t):  # the exact noise of x for this x0
        seen.append((t, x))
        return (x - math.sqrt(abar[t]) * x0) / math.sqrt(1 - abar[t])

    timesteps = schedule.inference_timesteps(steps)
    x_start = math.sqrt(abar[timesteps[0]]) * x0 + math.sqrt(1 - abar[timesteps[0]]) * eps
    out = DPMSolver2M(schedule, steps)(x_start, oracle)
    assert torch.allclose(out, x0, atol=1e-5)
    assert [t for t, _ in seen] == timesteps
    for t, x in seen:  # every state is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        assert torch.allclose(x, math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps, atol=1e-4)


@pytest.mark.parametrize("kind,last", [("conv", None), ("mlp", None), ("conv", torch.nn.BatchNorm2d(8))])
def test_folded_dpm_solver_chain_equals_reference_chain(kind, last):
    predictor, twin, x = _chain_pair(kind, last)
    solver = DPMSolver2M(NoiseSchedule(), 5)
    x_ref, x_fold = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = solver(x_ref, predictor)
    folded = folded_chain(x_fold + twin.embed(solver.timesteps[0], x.dim()), twin, linear_steps(solver))
    assert torch.allclose(folded, ref, atol=1e-5)
    weights = torch.linspace(-1, 1, ref.numel()).view_as(ref)
    (ref * weights).sum().backward()
    (folded * weights).sum().backward()
    assert torch.allclose(x_fold.grad, x_ref.grad, atol=1e-5)
    for (name, p), q in zip(predictor.named_parameters(), twin.parameters()):
        assert torch.allclose(q.grad, p.grad, atol=1e-4, rtol=1e-4), name


def test_dpm_solver_level_keeps_the_paper_preset_parameters():
    assert sum(p.numel() for p in DiffKD(256, 256, sampler="dpm_solver++").parameters()) == 694_722


# ------------------------------------------------------------------ 4. logit standardization
def test_standardized_kd_on_a_hand_example():
    z = torch.tensor([[1.0, 2.0, 3.0]])  # mean 2, unbiased std 1
    assert torch.allclose(standardize_logits(z), torch.tensor([[-1.0, 0.0, 1.0]]) / (1 + 1e-7))
    # teacher [3, 2, 1] -> [1, 0, -1]; student [1, 2, 3] -> [-1, 0, 1]; tau 1:
    # KL = sum p (log p - log q) = 2 (p_0 - p_2) = 2 (e - 1/e) / (e + 1 + 1/e)
    expected = 2 * (math.e - 1 / math.e) / (math.e + 1 + 1 / math.e)
    got = kd_loss(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]]), tau=1.0, standardize=True)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # z-scoring takes out each sample's shift and scale
    shifted = kd_loss(torch.tensor([[10.0, 20.0, 30.0]]), torch.tensor([[7.0, 5.0, 3.0]]), tau=1.0, standardize=True)
    assert shifted.item() == pytest.approx(expected, rel=1e-5)


def _z_by_hand(row):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (1e-7 + std) for v in row]


def test_standardized_kd_against_an_independent_formula():
    torch.manual_seed(0)
    s, t, tau = torch.randn(4, 7) * 3, torch.randn(4, 7), 2.0
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs, zt = [v / tau for v in _z_by_hand(srow)], [v / tau for v in _z_by_hand(trow)]
        ls = [v - math.log(sum(math.exp(u) for u in zs)) for v in zs]
        lt = [v - math.log(sum(math.exp(u) for u in zt)) for v in zt]
        total += sum(math.exp(p) * (p - q) for p, q in zip(lt, ls))
    assert kd_loss(s, t, tau=tau, standardize=True).item() == pytest.approx(tau**2 * total / 4, rel=1e-5)
    kd = build_method("kd", s.shape, t.shape, tau=tau, standardize=True)
    assert kd(s, t).terms["kd"].item() == pytest.approx(tau**2 * total / 4, rel=1e-5)


def test_standardized_dkd_is_dkd_on_z_scored_logits():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 6) * 4, torch.randn(5, 6) + 2, torch.tensor([0, 1, 5, 3, 3])
    zs = torch.tensor([_z_by_hand(r) for r in s.tolist()])
    zt = torch.tensor([_z_by_hand(r) for r in t.tolist()])
    expected = dkd_loss(zs, zt, y, alpha=1.0, beta=2.0, tau=2.0)
    assert torch.allclose(dkd_loss(s, t, y, alpha=1.0, beta=2.0, tau=2.0, standardize=True), expected, atol=1e-5)
    method = build_method("dkd", s.shape, t.shape, beta=2.0, tau=2.0, warmup_epochs=0, standardize=True)
    assert torch.allclose(method(s, t, y).terms["dkd"], expected, atol=1e-5)


def test_standardized_diffkd_logits_level():
    torch.manual_seed(0)
    level = variant(6, 6, kind="mlp", distance="kl", tau=2.0, standardize=True)
    out = level(torch.randn(4, 6), torch.randn(4, 6) * 5)
    zs = torch.tensor([_z_by_hand(r) for r in out.denoised.tolist()]) / 2.0
    zt = torch.tensor([_z_by_hand(r) for r in out.target.tolist()]) / 2.0
    expected = 4.0 * (F.softmax(zt, 1) * (F.log_softmax(zt, 1) - F.log_softmax(zs, 1))).sum(1).mean()
    assert out.kd_loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ bad values
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: build_method("diffkd", torch.Size([2, 4, 3, 3]), torch.Size([2, 6, 3, 3]), kd_warmup_epochs=-1),
         "kd_warmup_epochs must be a number of epochs >= 0 (0: none), got -1"),
        (lambda: DiffKD(4, 6, sampler="dpm_solver"), "unknown sampler 'dpm_solver' (did you mean 'dpm_solver++'?)"),
        (lambda: DiffKD(4, 6, sampler="ddpm"), "unknown sampler 'ddpm' (did you mean 'ddim'?)"),
        (lambda: NormalizedDistance("kl", 5),
         "normalize_target=True rescales each channel, which changes the class distributions NamedDistance('kl', tau=1)"),
        (lambda: NormalizedDistance("dist", 5), "NamedDistance('dist', tau=1) compares"),
        (lambda: StandardizedDistance("mse"),
         "standardize=True z-scores logits before the KL: it needs distance='kl', got NamedDistance('mse')"),
        (lambda: build_method("diffkd", torch.Size([2, 5]), torch.Size([2, 5]), normalize_target=True),
         "NamedDistance('kl', tau=1) compares"),
    ],
)
def test_bad_variant_options(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ fast path == reference, everything on
ALL_ON = {
    "maps": dict(kind="conv", latent_channels=16, normalize_target=True, sampler="dpm_solver++"),
    "maps, attention_mse": dict(kind="conv", distance="attention_mse", normalize_target=True, sampler="dpm_solver++"),
    "sequences": dict(kind="conv", dims=1, normalize_target=True, sampler="dpm_solver++"),
    "vectors": dict(kind="mlp", distance="kl", standardize=True, sampler="dpm_solver++"),
    "vectors, mse": dict(kind="mlp", normalize_target=True, sampler="dpm_solver++"),
}


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", ALL_ON)
def test_fast_path_matches_reference_with_every_option_on(dtype, tolerance, case):
    options = ALL_ON[case]
    torch.manual_seed(0)
    channels = (12, 24) if options["kind"] == "conv" else (10, 10)
    fast = variant(*channels, **options)
    reference = variant(*channels, fast=False, **options)
    reference.load_state_dict(fast.state_dict())
    exact = variant(*channels, fast=False, **options)  # the reference in float32: what bf16 rounding is measured against
    exact.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(1)
    if options["kind"] == "conv":
        width, space = options.get("latent_channels") or 24, (5, 6) if options.get("dims", 2) == 2 else (7,)
        s, t = torch.randn(4, 12, *space, generator=g), torch.randn(4, 24, *space, generator=g) * 3
        shape = (4, width, *space)
    else:
        s, t, shape = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g) * 3, (4, 10)
    noises = dict(start_noise=torch.randn(shape, generator=g), diffusion_noise=torch.randn(shape, generator=g),
                  diffusion_timesteps=torch.tensor([3, 500, 999, 42]))
    results = []
    for level in (fast, reference):
        student = s.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = level(student, t, **noises)
        out.loss.backward()
        grads = {name: p.grad for name, p in level.named_parameters() if p.grad is not None}
        results.append((out, student.grad, grads, dict(level.named_buffers())))
    (out_f, grad_f, params_f, buffers_f), (out_r, grad_r, params_r, buffers_r) = results

    def close(a, b):
        return (a.float() - b.float()).abs().max().item() <= tolerance * max(1.0, b.float().abs().max().item())

    assert close(out_f.loss, out_r.loss) and out_f.loss > 0
    for name in ("kd_loss", "diffusion_loss"):
        assert close(getattr(out_f, name), getattr(out_r, name)), name
    gap = (out_f.denoised.float() - out_r.denoised.float()).abs().max().item()
    if dtype == torch.bfloat16:
        # bf16 rounding in the 5-step chain alone moves the reference by about 1 % of its scale (more with
        # DPM-Solver++'s extrapolation): the fast path must stay within that rounding of it.
        rounding = (exact(s.clone(), t, **noises).denoised - out_r.denoised.float()).abs().max().item()
        assert gap <= max(tolerance * max(1.0, out_r.denoised.float().abs().max().item()), 1.5 * rounding), (gap, rounding)
    else:
        assert close(out_f.denoised, out_r.denoised), "denoised"
    assert close(grad_f, grad_r)
    assert params_f.keys() == params_r.keys()
    for name in params_r:
        assert close(params_f[name], params_r[name]), name
    for name, buffer in buffers_r.items():  # BatchNorm and target statistics move alike
        assert close(buffers_f[name], buffer), name


@pytest.mark.integration
def test_torch_compile_sees_one_graph_with_the_variants_on():
    import torch._dynamo

    torch._dynamo.reset()
    level = variant(6, 10, 8, normalize_target=True, sampler="dpm_solver++")
    report = torch._dynamo.explain(level)(torch.randn(2, 6, 5, 5), torch.randn(2, 10, 5, 5))
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons


def test_the_normalized_distance_reads_the_statistics_its_level_holds_and_checkpoints():
    """normalize_target wraps the distance; the statistics are the level's buffers (its distance's), also in a copy."""
    level = variant(4, 6, normalize_target=True)
    assert dict(level.named_buffers())["distance.normalizer.running_mean"] is level.distance.normalizer.running_mean
    twin = copy.deepcopy(level)
    assert twin.distance.normalizer is not level.distance.normalizer
    twin(torch.randn(3, 4, 2, 2), torch.randn(3, 6, 2, 2) * 5 + 3)  # a training step moves the copy's statistics only
    assert not torch.equal(twin.distance.normalizer.running_mean, level.distance.normalizer.running_mean)
    level.load_state_dict(twin.state_dict())
    assert torch.equal(level.distance.normalizer.running_mean, twin.distance.normalizer.running_mean)
