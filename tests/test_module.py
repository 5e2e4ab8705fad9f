"""The DiffKD module: fingerprints, gradient routes, precision, shapes, errors, official weights."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffkd import DiffKD
from diffkd.methods import build_method

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # the layouts of docs/design.md §7


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "args,kwargs,expected",
    [
        ((512, 512, 1024), {}, 7_644_418),
        ((512, 512), {}, 2_112_386),
        ((1024, 2048, 1024), {}, 11_315_970),
        ((1000, 1000), {"kind": "mlp"}, 23_323_002),
        ((256, 256), {}, 694_722),
        ((64, 128), {}, 248_802),
        ((100, 100), {"kind": "mlp"}, 352_302),
    ],
)
def test_parameter_fingerprints(args, kwargs, expected):
    assert n_params(DiffKD(*args, **kwargs)) == expected


# ------------------------------------------------------------------ gradient routes (docs/design.md §1)
def grads_of(loss, params):
    gs = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return [g for g in gs if g is not None and g.abs().sum() > 0]


def test_gradient_routes():
    torch.manual_seed(0)
    level = DiffKD(8, 12, latent_channels=16)
    s = torch.randn(4, 8, 5, 5, requires_grad=True)
    t = torch.randn(4, 12, 5, 5, requires_grad=True)
    out = level(s, t)
    ae = list(level.autoencoder.parameters())
    kd_only = [*level.projector.parameters(), *level.noise_matcher.parameters(), *level.output_projection.parameters()]
    predictor = list(level.noise_predictor.parameters())

    assert not out.target.requires_grad
    # the autoencoder learns from L_ae only
    assert grads_of(out.kd_loss, ae) == [] and grads_of(out.diffusion_loss, ae) == []
    assert len(grads_of(out.ae_loss, ae)) == len(ae)
    # projector, ANM and output projection learn from L_kd only
    assert grads_of(out.diffusion_loss, kd_only) == []
    assert len(grads_of(out.kd_loss, kd_only)) > 0
    assert len(grads_of(out.kd_loss, level.noise_matcher.parameters())) > 0
    # the noise predictor learns from both L_diff and L_kd (through the chain)
    assert len(grads_of(out.diffusion_loss, predictor)) > 0
    assert len(grads_of(out.kd_loss, predictor)) > 0
    # the student gets L_kd through z_s and through gamma; the teacher gets nothing
    assert len(grads_of(out.kd_loss, [s])) == 1
    gamma_grad = torch.autograd.grad(out.kd_loss, out.gamma, retain_graph=True)[0]
    assert gamma_grad.abs().sum() > 0
    assert torch.autograd.grad(out.gamma.sum(), s, retain_graph=True)[0].abs().sum() > 0
    assert grads_of(out.diffusion_loss, [s]) == [] and grads_of(out.ae_loss, [s]) == []
    out.loss.backward()
    assert t.grad is None


def test_without_adaptive_noise_chain_starts_from_projected_student():
    torch.manual_seed(0)
    level = DiffKD(4, 6, adaptive_noise=False).eval()
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        out = level(s, t)
        z_s = level.projector(s)
        x = z_s
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).tolist()
        for step in (400, 300, 200, 100, 0):
            e = level.noise_predictor(x, step)
            a_t, a_prev = abar[step], abar[step - 100] if step else 1.0
            x = math.sqrt(a_prev) * (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t) + math.sqrt(1 - a_prev) * e
        expected = level.output_projection(x)
    assert out.gamma is None
    assert torch.allclose(out.denoised, expected, atol=1e-5)


def test_loss_is_the_sum_at_the_papers_weights_and_the_method_declares_its_own():
    torch.manual_seed(0)
    level = DiffKD(4, 6, latent_channels=16)
    out = level(torch.randn(3, 4, 4, 4), torch.randn(3, 6, 4, 4))
    assert torch.allclose(out.loss, out.kd_loss + out.diffusion_loss + out.ae_loss)  # l1 = l2 = l3 = 1
    assert torch.allclose(out.kd_loss, F.mse_loss(out.denoised, out.target))
    method = build_method("diffkd", torch.Size([3, 4, 4, 4]), torch.Size([3, 6, 4, 4]), latent_channels=16,
                          kd_weight=2.0, diffusion_weight=0.5, ae_weight=3.0)
    assert method.term_weights == {"kd": 2.0, "diffusion": 0.5, "ae": 3.0}  # applied by the weighting


# ------------------------------------------------------------------ precision and determinism
def test_bf16_autocast_cpu_is_finite():
    torch.manual_seed(0)
    level = DiffKD(16, 32, latent_channels=24)
    logits_level = DiffKD(10, 10, kind="mlp", distance="kl")
    s = torch.randn(4, 16, 7, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = level(s, torch.randn(4, 32, 7, 7))
        out2 = logits_level(torch.randn(4, 10, requires_grad=True), torch.randn(4, 10))
    total = out.loss + out2.loss
    assert torch.isfinite(total)
    for term in (out.kd_loss, out.diffusion_loss, out.ae_loss, out2.kd_loss, out2.diffusion_loss):
        assert torch.isfinite(term) and term.dtype == torch.float32
    total.backward()
    for p in [*level.parameters(), *logits_level.parameters(), s]:
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


def test_deterministic_under_manual_seed():
    def run():
        torch.manual_seed(123)
        level = DiffKD(4, 8)
        out = level(torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3))
        return out.loss.detach(), out.denoised.detach()

    (l1, d1), (l2, d2) = run(), run()
    assert torch.equal(l1, l2) and torch.equal(d1, d2)


# ------------------------------------------------------------------ fast path vs reference
def _paired_levels(kind, **options):
    """The default (fast) level and the reference (fast=False) with the same weights."""
    torch.manual_seed(0)
    channels = (12, 24) if kind == "conv" else (10, 10)
    fast = DiffKD(*channels, kind=kind, **options)
    reference = DiffKD(*channels, kind=kind, fast=False, **options)
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def _run(level, s, t, noises, dtype):
    s = s.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = level(s, t, start_noise=noises[0], diffusion_noise=noises[1], diffusion_timesteps=noises[2])
    out.loss.backward()
    grads = {name: p.grad for name, p in level.named_parameters() if p.grad is not None}
    return out, s.grad, grads


FAST_PATH_CASES = {
    "maps": {"kind": "conv"},
    "maps with AE": {"kind": "conv", "latent_channels": 16},
    "maps without ANM": {"kind": "conv", "adaptive_noise": False},
    "vectors": {"kind": "mlp", "distance": "kl"},
}


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", FAST_PATH_CASES)
def test_fast_path_matches_reference(dtype, tolerance, case):
    """Same weights, same noise: the fast path (channels-last maps, folded chain, in-place residuals)
    gives the reference's outputs, gradients and BatchNorm statistics."""
    options = FAST_PATH_CASES[case]
    fast, reference = _paired_levels(**options)
    g = torch.Generator().manual_seed(1)
    if options["kind"] == "conv":
        conv3x3 = fast.noise_predictor.layers[0].block[3].weight  # a 1x1 weight is the same in both layouts
        assert conv3x3.shape[-1] == 3 and conv3x3.is_contiguous(memory_format=torch.channels_last)
        assert not conv3x3.is_contiguous()
        width = options.get("latent_channels") or 24
        s, t = torch.randn(4, 12, 5, 6, generator=g), torch.randn(4, 24, 5, 6, generator=g)
        noise_shape = (4, width, 5, 6)
    else:
        s, t, noise_shape = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g), (4, 10)
    noises = (torch.randn(noise_shape, generator=g), torch.randn(noise_shape, generator=g), torch.tensor([3, 500, 999, 42]))
    out_f, grad_f, params_f = _run(fast, s, t, noises, dtype)
    out_r, grad_r, params_r = _run(reference, s, t, noises, dtype)
    if options["kind"] == "conv":
        assert out_f.denoised.is_contiguous(memory_format=torch.channels_last) and out_r.denoised.is_contiguous()

    def close(a, b):  # relative to the reference's scale, so bf16 rounding does not trip it
        return (a.float() - b.float()).abs().max().item() <= tolerance * max(1.0, b.float().abs().max().item())

    for name in ("loss", "kd_loss", "diffusion_loss", "denoised", "gamma", "ae_loss"):
        if getattr(out_r, name) is None:
            assert getattr(out_f, name) is None, name
        else:
            assert close(getattr(out_f, name), getattr(out_r, name)), name
    assert close(grad_f, grad_r)
    assert params_f.keys() == params_r.keys()
    for name in params_r:
        assert close(params_f[name], params_r[name]), name
    for name, buffer in reference.named_buffers():  # BatchNorm running statistics move alike
        assert close(dict(fast.named_buffers())[name], buffer), name


def test_autoencoder_reads_the_teacher_map_in_its_own_layout():
    """The fast path lays out the student side channels-last but not the wide teacher map: the
    autoencoder keeps default-layout weights, so a contiguous teacher stays contiguous there."""
    level = DiffKD(6, 40, latent_channels=8)
    assert level.autoencoder.encoder[0].weight.stride() == (40, 1, 1, 1)
    seen = []
    level.autoencoder.decoder.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous()))
    out = level(torch.randn(2, 6, 5, 5), torch.randn(2, 40, 5, 5))
    assert seen == [True] and out.target.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_torch_compile_sees_one_graph_without_breaks(kind):
    """The chain's schedule constants are Python floats fixed at construction, so dynamo traces a
    whole level (chain, ANM, noise draws, losses) as one graph."""
    import torch._dynamo

    torch._dynamo.reset()
    if kind == "conv":
        level, s, t = DiffKD(6, 10, 8), torch.randn(2, 6, 5, 5), torch.randn(2, 10, 5, 5)
    else:
        level, s, t = DiffKD(10, 10, kind="mlp", distance="kl"), torch.randn(3, 10), torch.randn(3, 10)
    report = torch._dynamo.explain(level)(s, t)
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons


# ------------------------------------------------------------------ shapes
def test_odd_sizes_channels_last_and_batch_of_two():
    level = DiffKD(6, 10)
    s = torch.randn(2, 6, 5, 3).to(memory_format=torch.channels_last)
    t = torch.randn(2, 10, 5, 3).to(memory_format=torch.channels_last)
    out = level(s, t)
    assert out.denoised.shape == (2, 10, 5, 3) and out.gamma.shape == (2,)
    out.loss.backward()


def test_student_map_resized_to_teacher_size():
    level = DiffKD(6, 10)
    out = level(torch.randn(2, 6, 4, 4), torch.randn(2, 10, 8, 8))
    assert out.denoised.shape == (2, 10, 8, 8)


@pytest.mark.parametrize("shape", [(3, 10), (3, 10, 1, 1)])
def test_mlp_kind_keeps_rank(shape):
    level = DiffKD(10, 10, kind="mlp", distance="kl")
    out = level(torch.randn(*shape), torch.randn(*shape))
    assert out.denoised.shape == shape and out.target.shape == shape


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: DiffKD(4, 6)(torch.randn(2, 4), torch.randn(2, 6, 3, 3)), "expects student (B,C,H,W), got (2, 4)"),
        (lambda: DiffKD(4, 6)(torch.randn(2, 5, 3, 3), torch.randn(2, 6, 3, 3)), "expects 4 student channels, got 5"),
        (lambda: DiffKD(4, 6)(torch.randn(2, 4, 3, 3), torch.randn(2, 7, 3, 3)), "expects 6 teacher channels, got 7"),
        (lambda: DiffKD(4, 6)(torch.randn(2, 4, 3, 3), torch.randn(3, 6, 3, 3)), "batch sizes differ: student 2, teacher 3"),
        (lambda: DiffKD(5, 5, kind="mlp")(torch.randn(1, 5), torch.randn(1, 5)), "needs a batch of at least 2"),
        (lambda: DiffKD(5, 5, kind="mlp")(torch.randn(2, 5, 2, 2), torch.randn(2, 5, 2, 2)), "expects student (B,K) or (B,K,1,1)"),
        (lambda: DiffKD(4, 6, distance="msee"), "unknown distance 'msee' (did you mean 'mse'?)"),
        (lambda: DiffKD(4, 6, kind="transformer"), "unknown kind 'transformer'"),
    ],
)
def test_bad_input_errors(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


def test_mlp_batch_of_one_is_fine_in_eval():
    level = DiffKD(5, 5, kind="mlp").eval()
    assert level(torch.randn(1, 5), torch.randn(1, 5)).denoised.shape == (1, 5)


# ------------------------------------------------------------------ official release compatibility
def official_fixture():
    return json.loads((FIXTURES / "official_diffkd_state_dict.json").read_text())["configs"]


def random_official_state_dict(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.2
    return sd


def reference_official_forward(sd, s, t, start_noise, ddim_noise, ddim_t, steps=5):
    """The official release's computation, written out functionally from the paper and its design
    (train-mode BN, diffusers-style DDIM with the model output recomputed from x0_hat)."""
    def conv(x, p):
        w = sd[p + ".weight"]
        return F.conv2d(x, w, sd[p + ".bias"], padding=w.shape[-1] // 2)

    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"].clone(), sd[p + ".running_var"].clone(),
                            sd[p + ".weight"], sd[p + ".bias"], True, 0.1, 1e-5)

    def bottleneck(x, p):
        y = F.relu(bn(conv(x, p + ".block.0"), p + ".block.1"))
        y = F.relu(bn(conv(y, p + ".block.3"), p + ".block.4"))
        return bn(conv(y, p + ".block.6"), p + ".block.7") + x

    conv_kind = "model.pred.0.block.0.weight" in sd

    def eps_model(x, step):
        emb = sd["model.time_embedding.weight"][step]
        x = x + emb.view(x.shape[0] if emb.dim() == 2 else 1, -1, 1, 1)
        if conv_kind:
            return bn(conv(bottleneck(bottleneck(x, "model.pred.0"), "model.pred.1"), "model.pred.2"), "model.pred.3")
        y = F.relu(bn(conv(x, "model.pred.0"), "model.pred.1"))
        y = bn(conv(y, "model.pred.3"), "model.pred.4")
        y = F.relu(bn(conv(y, "model.pred.5"), "model.pred.6"))
        return conv(y, "model.pred.8")

    def adapter(x):
        if conv_kind:
            f = bottleneck(x, "noise_adapter.feat.0").mean(dim=(2, 3))
        else:
            f = bn(conv(F.relu(bn(conv(x, "noise_adapter.feat.0"), "noise_adapter.feat.1")), "noise_adapter.feat.3"),
                   "noise_adapter.feat.4").flatten(1)
        return F.linear(f, sd["noise_adapter.pred.weight"], sd["noise_adapter.pred.bias"]).softmax(1)[:, 0]

    betas = torch.linspace(0.0001, 0.02, 1000)
    abar = torch.cumprod(1 - betas, 0)
    zs = conv(s, "trans")
    rec = None
    if "ae.encoder.0.weight" in sd:
        hidden = bn(conv(t, "ae.encoder.0"), "ae.encoder.1")
        rec = F.mse_loss(t, conv(hidden, "ae.decoder.0"))
        t = hidden.detach()
    gamma = adapter(zs).view(-1, 1, 1, 1)
    x = gamma * zs + (1 - gamma) * start_noise
    stride = 1000 // (2 * steps)
    for step in [stride * i for i in range(steps - 1, -1, -1)]:
        e = eps_model(x, step)
        a_t = abar[step]
        a_prev = abar[step - stride] if step - stride >= 0 else torch.tensor(1.0)
        x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        e = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5  # use_clipped_model_output
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e
    refined = bn(conv(x, "proj.0"), "proj.1")
    a = abar[ddim_t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * t + (1 - a).sqrt() * ddim_noise
    ddim_loss = F.mse_loss(eps_model(noisy, ddim_t), ddim_noise)
    return refined, t, ddim_loss, rec


@pytest.mark.parametrize("config", [
    "conv, student 64, teacher 128, latent 256 (AE on)",
    "conv, student 64, teacher 128, no AE",
    "mlp, 100 -> 100",
])
def test_official_state_dict_loads_and_matches_official_outputs(config):
    shapes = official_fixture()[config]
    sd = random_official_state_dict(shapes, seed=1)
    level = DiffKD.from_official_state_dict(sd)
    ours = {k: list(v.shape) for k, v in level.state_dict().items()}
    assert len(ours) == len(shapes)

    student_c, width = sd["trans.weight"].shape[1], sd["trans.weight"].shape[0]
    teacher_c = sd["ae.decoder.0.weight"].shape[0] if "ae.decoder.0.weight" in sd else width
    hw = (4, 4) if level.kind == "conv" else (1, 1)
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, student_c, *hw, generator=g), torch.randn(3, teacher_c, *hw, generator=g)
    start_noise, ddim_noise = torch.randn(3, width, *hw, generator=g), torch.randn(3, width, *hw, generator=g)
    ddim_t = torch.tensor([5, 480, 999])

    out = level(s, t, start_noise=start_noise, diffusion_noise=ddim_noise, diffusion_timesteps=ddim_t)
    refined, target, ddim_loss, rec = reference_official_forward(sd, s, t, start_noise, ddim_noise, ddim_t)
    assert torch.allclose(out.denoised, refined, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out.target, target, atol=1e-5)
    assert out.diffusion_loss.item() == pytest.approx(ddim_loss.item(), rel=1e-5)
    if rec is None:
        assert out.ae_loss is None
    else:
        assert out.ae_loss.item() == pytest.approx(rec.item(), rel=1e-5)


def test_official_fixture_keys_map_onto_ours():
    for config, shapes in official_fixture().items():
        level = DiffKD.from_official_state_dict(random_official_state_dict(shapes, seed=0))
        assert n_params(level) == sum(math.prod(s) for k, s in shapes.items()
                                      if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_from_official_rejects_foreign_state_dict():
    with pytest.raises(ValueError, match="not an official DiffKD state dict"):
        DiffKD.from_official_state_dict({"conv.weight": torch.zeros(1)})


# ------------------------------------------------------------------ recomputation (activation checkpointing)
def _saved_bytes(fn):
    """Bytes of distinct storages autograd keeps for backward while fn runs (parameters excluded)."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("fast", [True, False])
def test_recompute_gives_the_same_step_with_a_fraction_of_the_saved_activations(fast):
    torch.manual_seed(0)
    plain = DiffKD(8, 32, 16, fast=fast)
    recomputing = DiffKD(8, 32, 16, fast=fast, recompute=True)
    recomputing.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 8, 5, 5, generator=g), torch.randn(6, 32, 5, 5, generator=g)
    noises = (torch.randn(6, 16, 5, 5, generator=g), torch.randn(6, 16, 5, 5, generator=g), torch.tensor([1, 99, 250, 500, 750, 999]))
    results = {}
    for name, level in (("plain", plain), ("recompute", recomputing)):
        params = {p.untyped_storage().data_ptr() for p in level.parameters()}
        s_in = s.clone().requires_grad_()
        out, saved = _saved_bytes(lambda: level(s_in, t, start_noise=noises[0], diffusion_noise=noises[1], diffusion_timesteps=noises[2]))
        out.loss.backward()
        activations = sum(n for ptr, n in saved.items() if ptr not in params)
        results[name] = (out, s_in.grad, {n: p.grad for n, p in level.named_parameters()}, dict(level.named_buffers()), activations)
    (out_p, grad_p, params_p, buffers_p, bytes_p), (out_r, grad_r, params_r, buffers_r, bytes_r) = results["plain"], results["recompute"]
    assert torch.allclose(out_r.loss, out_p.loss, atol=1e-6) and torch.allclose(out_r.denoised, out_p.denoised, atol=1e-6)
    assert torch.allclose(grad_r, grad_p, atol=1e-6)
    for name in params_p:
        assert torch.allclose(params_r[name], params_p[name], atol=1e-5), name
    for name in buffers_p:  # statistics and batch counters move once, as without recomputation
        assert torch.equal(buffers_r[name], buffers_p[name]), name
    assert bytes_r < 0.4 * bytes_p, (bytes_r, bytes_p)


@pytest.mark.integration
def test_recompute_under_torch_compile_matches_eager():
    """Compiled, the checkpoint takes no buffer-restoring context (dynamo cannot trace one); the
    compiled rerun must still leave BatchNorm statistics and gradients as the eager level does."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    plain, recomputing = DiffKD(6, 10, 8), DiffKD(6, 10, 8, recompute=True)
    recomputing.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, 5, 5, generator=g), torch.randn(4, 10, 5, 5, generator=g)
    noises = {"start_noise": torch.randn(4, 8, 5, 5, generator=g), "diffusion_noise": torch.randn(4, 8, 5, 5, generator=g),
              "diffusion_timesteps": torch.tensor([1, 50, 500, 900])}
    for level in (plain, torch.compile(recomputing, backend="aot_eager")):
        for _ in range(2):
            level(s.clone().requires_grad_(), t, **noises).loss.backward()
    for (name, a), b in zip(plain.named_buffers(), recomputing.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    for (name, a), b in zip(plain.named_parameters(), recomputing.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


# ------------------------------------------------------------------ API misuse caught when built or called (issue 15)
@pytest.mark.parametrize(
    "args,kwargs,name",
    [((0, 8), {}, "student_channels"), ((4, -1), {}, "teacher_channels"), ((4, 8, 0), {}, "latent_channels"),
     ((4.0, 8), {}, "student_channels"), ((True, 8), {}, "student_channels")],
)
def test_non_positive_channel_counts_are_refused_when_built(args, kwargs, name):
    with pytest.raises(ValueError) as info:
        DiffKD(*args, **kwargs)
    value = dict(zip(("student_channels", "teacher_channels", "latent_channels"), args))[name]
    assert str(info.value) == f"DiffKD {name} must be a positive integer, got {value!r}"


@pytest.mark.parametrize("kind,shape", [("conv", (2, 4, 3, 3)), ("mlp", (2, 4))])
def test_features_of_another_dtype_than_the_module_get_a_clear_error(kind, shape):
    level = DiffKD(4, 4, kind=kind)
    s, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    with pytest.raises(TypeError) as info:
        level(s, t)
    assert str(info.value) == (
        "DiffKD: student features are torch.float64 but its parameters are torch.float32; pass the features "
        ".to(torch.float32) (for bf16/fp16 features, run under torch.autocast)"
    )
    with pytest.raises(TypeError, match="teacher features are torch.float64 but its parameters are torch.float32"):
        level(s.float(), t)
    with pytest.raises(TypeError, match=r"^DiffKD runs with float32 parameters, got torch.float64; call \.float\(\)"):
        level.double()(s, t)
    assert torch.isfinite(level.float()(s.float(), t.float()).loss)  # converted: fine
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are autocast's job
        assert torch.isfinite(DiffKD(4, 4, kind=kind)(s.float().bfloat16(), t.float()).loss)


def test_conv_kind_needs_two_values_per_channel_in_training():
    level = DiffKD(4, 6)
    with pytest.raises(ValueError) as info:
        level(torch.randn(1, 4, 1, 1), torch.randn(1, 6, 1, 1))
    assert str(info.value) == (
        "DiffKD(kind='conv') needs at least 2 values per channel in training mode (batch x positions of the "
        "teacher map; its BatchNorm cannot train on one), got teacher (1, 6, 1, 1)"
    )
    assert torch.isfinite(level(torch.randn(1, 4, 2, 1), torch.randn(1, 6, 2, 1)).loss)  # two pixels suffice
    assert level.eval()(torch.randn(1, 4, 1, 1), torch.randn(1, 6, 1, 1)).denoised.shape == (1, 6, 1, 1)
