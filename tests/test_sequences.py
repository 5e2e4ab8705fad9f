"""1-D features (B,C,L): DiffKD's conv kind along L, the mse baseline, and a Distiller between 1-D nets."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffkd import DiffKD
from diffkd.diffusion import DDIM, NoiseSchedule
from diffkd.folded import linear_steps
from diffkd.distiller import Distiller, Level
from diffkd.methods import build_method
from diffkd.visualize import choose_level


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def level_params_by_hand(student: int, teacher: int, latent: int | None = None, taps: int = 3) -> int:
    """docs/design.md §2 box by box; `taps` is the spatial kernel size of the bottlenecks' middle
    conv: 3 for the 1-D kind (kernel 3), 9 for the 2-D kind (3x3)."""
    c = latent or teacher

    def pointwise(cin, cout):  # 1x1 conv with bias
        return cin * cout + cout

    def bn(n):
        return 2 * n

    def bottleneck(ch, r):
        m = max(1, ch // r)
        return pointwise(ch, m) + bn(m) + (m * m * taps + m) + bn(m) + pointwise(m, ch) + bn(ch)

    projector = pointwise(student, c)
    autoencoder = pointwise(teacher, c) + bn(c) + pointwise(c, teacher) if latent else 0
    predictor = 1280 * c + 2 * bottleneck(c, 4) + pointwise(c, c) + bn(c)
    anm = bottleneck(c, 8) + (c * 2 + 2)
    output = pointwise(c, c) + bn(c)
    return projector + autoencoder + predictor + anm + output


@pytest.mark.parametrize("args", [(64, 128), (256, 256), (8, 12, 16), (512, 512, 1024)])
def test_parameter_count_of_a_1d_level(args):
    assert n_params(DiffKD(*args, dims=1)) == level_params_by_hand(*args)
    # the same formula with a 3x3 kernel gives the 2-D kind's counts (docs/design.md §2's fingerprints)
    assert n_params(DiffKD(*args)) == level_params_by_hand(*args, taps=9)
    assert level_params_by_hand(64, 128, taps=9) == 248_802 and level_params_by_hand(512, 512, 1024, taps=9) == 7_644_418


def test_1d_level_has_the_2d_parameter_names():
    one, two = DiffKD(8, 12, 16, dims=1).state_dict(), DiffKD(8, 12, 16).state_dict()
    assert list(one) == list(two)
    differing = [k for k in one if one[k].shape != two[k].shape]
    assert differing and all(k.endswith("block.3.weight") for k in differing)  # only the 3-tap convs
    assert all(one[k].shape[-1] == 3 and one[k].dim() == 3 for k in differing)


def _as_2d(state_1d: dict) -> dict:
    """The 2-D level's weights that compute the 1-D level on (B,C,1,L): each 3-tap kernel becomes the
    middle row of a 3x3 kernel (the other rows only ever see the zero padding of a height-1 map)."""
    out = {}
    for key, value in state_1d.items():
        if key.endswith("block.3.weight"):
            square = torch.zeros(*value.shape[:2], 3, 3)
            square[:, :, 1, :] = value
            value = square
        out[key] = value
    return out


@pytest.mark.parametrize("fast", [True, False])
def test_1d_level_equals_the_2d_level_on_height_one_maps(fast):
    """A sequence is a 1xL map: with embedded kernels, the 1-D level (conv1d along L, BN over B and L,
    ANM pooled over L, linear resize of a shorter student) gives what the 2-D reference gives."""
    torch.manual_seed(0)
    one = DiffKD(6, 10, 8, dims=1, fast=fast)
    two = DiffKD(6, 10, 8, fast=False)
    with torch.no_grad():  # move BN affines off their defaults so they matter
        for p in one.parameters():
            p.add_(0.05 * torch.randn_like(p))
    two.load_state_dict(_as_2d(one.state_dict()))
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 6, 7, generator=g), torch.randn(3, 10, 12, generator=g)  # the student is shorter
    noises = {"start_noise": torch.randn(3, 8, 12, generator=g), "diffusion_noise": torch.randn(3, 8, 12, generator=g),
              "diffusion_timesteps": torch.tensor([0, 400, 999])}
    s1, s2 = s.clone().requires_grad_(), s[:, :, None, :].clone().requires_grad_()
    out1 = one(s1, t, **noises)
    out2 = two(s2, t[:, :, None, :], **noises)
    assert out1.denoised.shape == (3, 8, 12)
    assert torch.allclose(out1.denoised, out2.denoised.squeeze(2), atol=1e-5)
    assert torch.allclose(out1.gamma, out2.gamma, atol=1e-6)
    for name in ("kd_loss", "diffusion_loss", "ae_loss", "loss"):
        assert getattr(out1, name).item() == pytest.approx(getattr(out2, name).item(), rel=1e-5, abs=1e-7), name
    (out1.loss).backward()
    (out2.loss).backward()
    assert torch.allclose(s1.grad, s2.grad.squeeze(2), atol=1e-5)


def test_student_sequence_is_resized_linearly_after_the_projector():
    torch.manual_seed(0)
    level = DiffKD(4, 6, dims=1)
    s = torch.randn(2, 4, 5)
    w, b = level.projector.weight.flatten(1), level.projector.bias
    projected = torch.einsum("oc,bcl->bol", w, s) + b[None, :, None]
    # linear interpolation, half-pixel centres (align_corners=False), by hand for 5 -> 9 positions
    expected = torch.empty(2, 6, 9)
    for j in range(9):
        x = min(max((j + 0.5) * 5 / 9 - 0.5, 0.0), 4.0)
        lo = math.floor(x)
        hi, frac = min(lo + 1, 4), x - lo
        expected[:, :, j] = (1 - frac) * projected[:, :, lo] + frac * projected[:, :, hi]
    assert torch.allclose(level.project_student(s, torch.Size([9])), expected, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_ddim_chain_with_an_oracle_recovers_x0_on_a_sequence(steps):
    """As for maps: starting from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, the level's chain with the
    true eps lands on x0, and so does the folded chain of the 1-D noise predictor."""
    torch.manual_seed(steps)
    level = DiffKD(8, 8, dims=1, inference_steps=steps)
    x0, eps = torch.randn(2, 8, 20), torch.randn(2, 8, 20)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    t_start = level.sampler.timesteps[0]
    abar = math.prod(1 - b for b in betas[: t_start + 1])
    x_start = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    assert torch.allclose(level.sampler(x_start, lambda x, t: eps), x0, atol=1e-4)
    assert linear_steps(level.sampler) == linear_steps(DDIM(NoiseSchedule(), steps))


# ------------------------------------------------------------------ fast path vs reference, on sequences
SEQUENCE_CASES = {"plain": {}, "AE": {"latent_channels": 16}, "no ANM": {"adaptive_noise": False}}


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", SEQUENCE_CASES)
def test_fast_path_matches_reference_on_sequences(dtype, tolerance, case):
    torch.manual_seed(0)
    options = SEQUENCE_CASES[case]
    fast, reference = DiffKD(12, 24, dims=1, **options), DiffKD(12, 24, dims=1, fast=False, **options)
    reference.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(1)
    width = options.get("latent_channels") or 24
    s, t = torch.randn(4, 12, 30, generator=g), torch.randn(4, 24, 30, generator=g)
    noises = (torch.randn(4, width, 30, generator=g), torch.randn(4, width, 30, generator=g), torch.tensor([3, 500, 999, 42]))
    results = []
    for level in (fast, reference):
        s_in = s.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = level(s_in, t, start_noise=noises[0], diffusion_noise=noises[1], diffusion_timesteps=noises[2])
        out.loss.backward()
        results.append((out, s_in.grad, {n: p.grad for n, p in level.named_parameters() if p.grad is not None}))
    (out_f, grad_f, params_f), (out_r, grad_r, params_r) = results

    def close(a, b):
        return (a.float() - b.float()).abs().max().item() <= tolerance * max(1.0, b.float().abs().max().item())

    for name in ("loss", "kd_loss", "diffusion_loss", "denoised", "gamma", "ae_loss"):
        if getattr(out_r, name) is None:
            assert getattr(out_f, name) is None, name
        else:
            assert close(getattr(out_f, name), getattr(out_r, name)), name
    assert close(grad_f, grad_r) and params_f.keys() == params_r.keys()
    for name in params_r:
        assert close(params_f[name], params_r[name]), name
    for name, buffer in reference.named_buffers():
        assert close(dict(fast.named_buffers())[name], buffer), name


def test_recompute_gives_the_same_step_on_sequences():
    torch.manual_seed(0)
    plain, recomputing = DiffKD(8, 16, 12, dims=1), DiffKD(8, 16, 12, dims=1, recompute=True)
    recomputing.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 8, 25, generator=g), torch.randn(4, 16, 25, generator=g)
    noises = {"start_noise": torch.randn(4, 12, 25, generator=g), "diffusion_noise": torch.randn(4, 12, 25, generator=g),
              "diffusion_timesteps": torch.tensor([1, 200, 600, 999])}
    grads = []
    for level in (plain, recomputing):
        s_in = s.clone().requires_grad_()
        out = level(s_in, t, **noises)
        out.loss.backward()
        grads.append((out.loss.detach(), s_in.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), recomputing.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    for (name, a), b in zip(plain.named_buffers(), recomputing.buffers()):
        assert torch.equal(a, b), name


def _grads(loss, params):
    gs = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return [g for g in gs if g is not None and g.abs().sum() > 0]


def test_gradient_routes_on_sequences():
    torch.manual_seed(0)
    level = DiffKD(8, 12, latent_channels=16, dims=1)
    s = torch.randn(4, 8, 15, requires_grad=True)
    t = torch.randn(4, 12, 15, requires_grad=True)
    out = level(s, t)
    ae = list(level.autoencoder.parameters())
    kd_only = [*level.projector.parameters(), *level.noise_matcher.parameters(), *level.output_projection.parameters()]
    assert _grads(out.kd_loss, ae) == [] and _grads(out.diffusion_loss, ae) == []
    assert len(_grads(out.ae_loss, ae)) == len(ae)
    assert _grads(out.diffusion_loss, kd_only) == [] and len(_grads(out.kd_loss, level.noise_matcher.parameters())) > 0
    assert len(_grads(out.diffusion_loss, level.noise_predictor.parameters())) > 0
    assert len(_grads(out.kd_loss, level.noise_predictor.parameters())) > 0
    assert len(_grads(out.kd_loss, [s])) == 1 and _grads(out.diffusion_loss, [s]) == [] and _grads(out.ae_loss, [s]) == []
    out.loss.backward()
    assert t.grad is None


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: DiffKD(4, 6, dims=1)(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)), "expects student (B,C,L) (dims=1), got (2, 4, 3, 3)"),
        (lambda: DiffKD(4, 6)(torch.randn(2, 4, 9), torch.randn(2, 6, 9)), "expects student (B,C,H,W), got (2, 4, 9)"),
        (lambda: DiffKD(4, 6, dims=3), "dims must be 2 ((B,C,H,W) maps) or 1 ((B,C,L) sequences), got 3"),
        (lambda: DiffKD(4, 4, kind="mlp", dims=1), "kind='mlp' takes vectors, drop dims=1"),
    ],
)
def test_bad_input_errors(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


# ------------------------------------------------------------------ methods on sequences
def test_diffkd_and_mse_methods_size_themselves_from_sequence_shapes():
    level = build_method("diffkd", torch.Size([2, 8, 50]), torch.Size([2, 16, 100])).diffkd
    assert (level.kind, level.dims, level.student_channels, level.teacher_channels) == ("conv", 1, 8, 16)
    torch.manual_seed(0)
    mse = build_method("mse", torch.Size([2, 3, 4]), torch.Size([2, 5, 8]))
    s, t = torch.randn(2, 3, 4), torch.randn(2, 5, 8)
    w, b = mse.connector.weight[:, :, 0], mse.connector.bias
    projected = torch.einsum("oc,bcl->bol", w, s) + b[None, :, None]
    # 4 -> 8 positions, half-pixel centres: position j reads x = (j + 0.5) / 2 - 0.5, clamped to [0, 3]
    resized = torch.stack([
        (1 - (x - math.floor(x))) * projected[:, :, math.floor(x)] + (x - math.floor(x)) * projected[:, :, min(math.floor(x) + 1, 3)]
        for x in (min(max((j + 0.5) / 2 - 0.5, 0.0), 3.0) for j in range(8))
    ], dim=2)
    assert mse(s, t).terms["mse"].item() == pytest.approx(((resized - t) ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize(
    "method,student,teacher,message",
    [
        ("diffkd", (2, 8, 5), (2, 8, 5, 5), "diffkd needs two maps (B,C,H,W), two sequences (B,C,L) or two vectors (B,K)"),
        ("mse", (2, 8, 5), (2, 8), "mse needs two maps (B,C,H,W), two sequences (B,C,L) or two vectors (B,K)"),
        ("dkd", (2, 8, 5), (2, 8, 5), "dkd needs logits (B,K), got a tap of shape (2, 8, 5)"),
    ],
)
def test_methods_name_the_shapes_they_take(method, student, teacher, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_method(method, torch.Size(student), torch.Size(teacher))


def test_feature_methods_refuse_raw_captures_and_regression_l1_takes_them():
    shape = torch.Size([2, 36, 4])
    for method in ("diffkd", "mse", "kd", "dist"):
        with pytest.raises(ValueError, match=f"{method} reads map, sequence, vector captures, but the student tap is 'raw'"):
            build_method(method, shape, shape, layouts=("raw", "raw"))
    build_method("regression_l1", shape, shape, layouts=("raw", "raw"))


# ------------------------------------------------------------------ end to end: a Distiller between 1-D nets
class SignalNet(nn.Module):
    """Conv1d stack on (B, 2, 100) signals, pooled, then a linear classifier."""

    def __init__(self, width: int, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2), nn.ReLU(),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=2))


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_distiller_between_1d_conv_models_by_names_alone():
    torch.manual_seed(0)
    teacher, student = SignalNet(16), SignalNet(8)
    levels = [Level("features.3", "features.3", "diffkd"), Level("features", "features", "mse"),
              Level("head", "head", "kd")]
    d = Distiller(teacher, student, levels, input_shape=(2, 100))
    inner = d.methods["diffkd_features_3"].diffkd
    assert (inner.kind, inner.dims, inner.student_channels, inner.teacher_channels) == ("conv", 1, 8, 16)
    assert isinstance(d.methods["mse_features"].connector, nn.Conv1d)
    assert d.student_taps.taps["diffkd_features_3"].layout is None  # no layout given: Conv1d says it
    teacher_before, student_before, methods_before = snapshot(d.teacher), snapshot(d.student), snapshot(d.methods)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05)
    d.train()
    x, y = torch.randn(4, 2, 100), torch.randint(0, 3, (4,))
    out = d(x, y)
    assert d.student_taps.layouts() == {name: "sequence" for name in ("diffkd_features_3", "mse_features")} | {"kd_head": "vector"}
    assert d.student_taps["diffkd_features_3"].shape == (4, 8, 50)
    (F.cross_entropy(out.student, y) + out.loss).backward()
    opt.step()
    assert all(torch.equal(v, d.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(not torch.equal(v, d.student.state_dict()[k]) for k, v in student_before.items())
    changed = [k for k, v in methods_before.items() if not torch.equal(v, d.methods.state_dict()[k])]
    for box in ("diffkd_features_3.diffkd.noise_predictor.", "diffkd_features_3.diffkd.projector.", "mse_features.connector."):
        assert any(k.startswith(box) for k in changed), box
    assert set(out.losses) >= {"diffkd_features_3/kd", "diffkd_features_3/diffusion", "mse_features", "kd_head"}


class Tokeniser(nn.Module):
    """A block whose rank-3 output could be read either way."""

    def forward(self, x):
        return x.transpose(1, 2) * 1.0


def test_distiller_refuses_an_ambiguous_rank3_tap_and_takes_it_with_a_layout():
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Conv1d(2, 6, 3), Tokeniser()), nn.Sequential(nn.Conv1d(2, 4, 3), Tokeniser())
    with pytest.raises(ValueError) as info:
        Distiller(teacher, student, [Level("1", "1", "mse")], input_shape=(2, 20))
    assert "set layout='tokens' for (B, N, C) or layout='sequence' for (B, C, L)" in str(info.value)
    tap = {"path": "1", "layout": "tokens", "tokens_to_map": False}
    d = Distiller(teacher, student, [Level(tap, tap, "mse")], input_shape=(2, 20))
    assert isinstance(d.methods["mse_1"].connector, nn.Conv1d) and d.methods["mse_1"].connector.in_channels == 4


def test_visualize_skips_sequence_levels_with_a_message(capsys):
    torch.manual_seed(0)
    teacher, student = SignalNet(8), SignalNet(4)
    d = Distiller(teacher, student, [Level("features.3", "features.3", "diffkd")], input_shape=(2, 20))
    with pytest.raises(ValueError, match=r"no DiffKD level on a feature map .*sequence levels \['diffkd_features_3'\] .* skipped"):
        choose_level(d, None, "run")

    class Mixed(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.conv2d, self.conv1d = nn.Conv2d(1, width, 3, padding=1), nn.Conv1d(width, width, 1)

        def forward(self, x):
            return self.conv1d(self.conv2d(x).flatten(2))

    d = Distiller(Mixed(6), Mixed(4), [Level("conv1d", "conv1d", "diffkd"), Level("conv2d", "conv2d", "diffkd")],
                  input_shape=(1, 4, 4))
    assert choose_level(d, None, "run") == "diffkd_conv2d"
    assert "skipping DiffKD sequence levels ['diffkd_conv1d']" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"no DiffKD feature-map level 'diffkd_conv1d'; choose one of \['diffkd_conv2d'\]"):
        choose_level(d, "diffkd_conv1d", "run")
