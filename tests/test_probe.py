"""The probe: "@feature" / "@logits" found for any model, checked against the registry's hand-written taps
and against small models whose answer is known by construction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffkd import Distiller, Level, models
from diffkd.models.probe import ProbeError, Taps, find_taps, probe_model, resolve_aliases
from diffkd.models.registry import _SPECS
from diffkd.segmentation import models as seg_models
from diffkd.taps import FeatureTaps


def _captures(model: nn.Module, taps: dict[str, object], x: torch.Tensor) -> dict[str, torch.Tensor]:
    with FeatureTaps(model, taps) as hooked, torch.no_grad():
        model.eval()(x)
        return dict(hooked.items())


def _same_tensor(model: nn.Module, a: object, b: object, x: torch.Tensor) -> bool:
    """The two taps capture the very same tensor of one forward (same path, or the identical object)."""
    if a == b:
        return True
    got = _captures(model, {"a": a, "b": b}, x)
    return got["a"] is got["b"]


# ---------------------------------------------------------------- the registry is the check


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(_SPECS))
def test_probe_finds_the_registry_taps(name: str) -> None:
    with torch.device("meta"):  # no memory, no init cost: the check holds for the largest nets too
        model = models.create(name)
    x = torch.zeros(2, *models.input_size(name), device="meta")
    found, written = find_taps(model, input_shape=models.input_size(name)), models.default_taps(name)
    assert _same_tensor(model, found.feature, written.feature, x), (found, written)
    assert _same_tensor(model, found.logits, written.logits, x), (found, written)


@pytest.mark.integration
@pytest.mark.parametrize("name", seg_models.available())
def test_probe_finds_the_segmentation_registry_taps(name: str) -> None:
    with torch.device("meta"):
        model = seg_models.create(name, num_classes=5, width_mult=0.125)
    x = torch.zeros(2, 3, 64, 64, device="meta")
    found, written = find_taps(model, input_shape=(3, 64, 64)), seg_models.default_taps(name)
    assert _same_tensor(model, found.feature, written.feature, x), (found, written)
    assert _same_tensor(model, found.logits, written.logits, x), (found, written)


# ---------------------------------------------------------------- rules, on models built to know the answer


class Conv1dNet(nn.Module):
    """(B, 2, 100) signals -> Conv1d stages -> mean over time -> linear."""

    def __init__(self, width: int = 64, classes: int = 5) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(2, width, 5, padding=2), nn.ReLU(), nn.Conv1d(width, width, 3, padding=1))
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x).mean(-1))


class TinyViT(nn.Module):
    """Patch conv -> tokens, a class token joined in front, an encoder layer, LayerNorm, head on token 0."""

    def __init__(self, dim: int = 16, classes: int = 3, pool: str = "token") -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.norm(tokens + self.block(tokens))
        return self.head(tokens[:, 0] if self.pool == "token" else tokens[:, 1:].mean(1))


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x).mean((2, 3)), self.b(x).amax((2, 3))], 1))


class Flattening(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def test_sequence_feature_of_a_conv1d_model() -> None:
    taps = find_taps(Conv1dNet(), input_shape=(2, 100))
    assert taps == Taps({"path": "encoder", "layout": "sequence"}, "fc")


def test_as_many_channels_as_steps() -> None:
    # mean(-1) keeps axis 1: a (B, C, L) sequence for certain, even with C == L
    assert find_taps(Conv1dNet(width=64), input_shape=(2, 64)).feature == {"path": "encoder", "layout": "sequence"}

    class Transposed(Conv1dNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.encoder(x).transpose(1, 2).mean(1))  # the pooled axis is renamed on the way

    with pytest.raises(ProbeError, match=r"'encoder' of Transposed pools \(B, 64, 64\) to 64 channels, which fits "
                                         r"sequence and tokens; name the tap with its layout"):
        find_taps(Transposed(width=64), input_shape=(2, 64)).feature


def test_class_token_counted_from_the_join_and_the_grid_from_the_patches() -> None:
    # 32x16 input, 4x4 patches: an 8x4 grid (not square) behind one class token
    taps = find_taps(TinyViT(), input_shape=(3, 32, 16))
    assert taps == Taps({"path": "norm", "layout": "tokens", "prefix_tokens": 1, "token_hw": (8, 4)}, "head")
    model, x = TinyViT().eval(), torch.randn(2, 3, 32, 16)
    got = _captures(model, {"f": taps.feature}, x)["f"]
    hooked: list[torch.Tensor] = []
    model.norm.register_forward_hook(lambda _m, _i, out: hooked.append(out))
    with torch.no_grad():
        model(x)
    expected = hooked[0][:, 1:].reshape(2, 8, 4, 16).permute(0, 3, 1, 2)  # row-major grid, channels first
    torch.testing.assert_close(got, expected)


def test_mean_over_patch_tokens_reads_the_slice() -> None:
    taps = find_taps(TinyViT(pool="mean"), input_shape=(3, 16, 16))
    assert taps.feature == {"path": "norm", "layout": "tokens", "prefix_tokens": 1}


def test_channels_last_map_pooled_over_height_and_width() -> None:
    class NHWC(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 1)
            self.norm = nn.LayerNorm(6)
            self.fc = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))

    assert find_taps(NHWC(), input_shape=(3, 8, 8)) == Taps({"path": "norm", "channels_last": True}, "fc")


def test_functional_last_steps() -> None:
    class Functional(nn.Module):
        """The pooled map is made by a functional ReLU and read by `pool`; the logits are scaled outside any module."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(F.relu(self.conv(x))).flatten(1)) / 2.0

    assert find_taps(Functional(), input_shape=(3, 8, 8)) == Taps({"path": "pool", "capture": "input"}, "")


def test_undecidable_features_say_why_and_list_candidates() -> None:
    with pytest.raises(ProbeError, match=r"2 tensors of TwoBranches are pooled.*'a' \(B, 8, 6, 6\).*'b' \(B, 4, 6, 6\)"):
        find_taps(TwoBranches(), input_shape=(3, 8, 8))
    with pytest.raises(ProbeError, match=r"Flattening flattens 'conv' \(B, 4, 8, 8\).*no pooled feature"):
        find_taps(Flattening(), input_shape=(1, 8, 8))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ProbeError, match=r"no feature map or sequence of Sequential reaches its logits \(B, 3\) "
                                         r"\(no global pooling found; the last maps: none\)"):
        find_taps(mlp, input_shape=(12,))

    class Stacked(TwoBranches):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the batch axis moves: the graph is not followed
            return torch.stack([self.a(x).mean((2, 3)), self.a(x).amax((2, 3))]).mean(0)

    with pytest.raises(ProbeError, match=r"no global pooling found; the last maps: 'a' \(B, 8, 6, 6\)\)"):
        find_taps(Stacked(), input_shape=(3, 8, 8))
    assert probe_model(mlp, input_shape=(12,)).logits == "1"  # the logits are found all the same


def test_dense_logits_read_back_through_upsampling() -> None:
    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": F.interpolate(self.head(self.body(x)), size=x.shape[-2:])}

    assert find_taps(Dense(), input_shape=(3, 16, 16)) == Taps("body", "head")


def test_meta_first_then_a_real_forward() -> None:
    class NeedsCPU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bias = torch.ones(4)  # made on the CPU whatever the input's device: fails on meta tensors
            return self.fc(self.conv(x).mean((2, 3)) + bias)

    assert probe_model(Conv1dNet(), input_shape=(2, 50)).device == "meta"
    fallback = probe_model(NeedsCPU(), input_shape=(3, 8, 8))
    assert fallback.device == "cpu" and (fallback.feature, fallback.logits) == ("conv", "fc")

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("shapes do not fit\nsecond line")

    with pytest.raises(ProbeError, match=r"^probing Broken failed: its forward raised RuntimeError: shapes do not fit$"):
        probe_model(Broken(), input_shape=(3,))


def test_probing_leaves_the_model_as_it_was() -> None:
    model = Conv1dNet().train()
    model.encoder[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_taps(model, example_input=torch.randn(3, 2, 40))
    assert model.training and not model.encoder[0].training and model.encoder[2].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model.encoder[0]._forward_hooks


def test_aliases_in_the_python_api() -> None:
    teacher, student = TinyViT(dim=16, classes=3), models.create("resnet8", num_classes=3)
    distiller = Distiller(teacher, student, [Level("@feature", "@feature", "mse"), Level("@logits", "@logits", "kd")],
                          input_shape=(3, 16, 16))
    out = distiller(torch.randn(2, 3, 16, 16))
    assert set(out.losses) == {"mse_feature", "kd_logits"} and torch.isfinite(out.loss)
    assert distiller.teacher_taps.taps["mse_feature"].prefix_tokens == 1
    with pytest.raises(ProbeError, match=r"^level 'x' student: unknown tap alias '@features'; use @feature, @logits"):
        resolve_aliases({"x": "@features"}, lambda: probe_model(student, input_shape=(3, 16, 16)), role="student")
    with pytest.raises(ProbeError, match=r"^level 'mse_x' teacher: @feature: Flattening flattens"):
        pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        Distiller(Flattening(), pooled, [Level("@feature", "@feature", "mse", name="mse_x")], input_shape=(1, 8, 8))


def test_default_taps_of_names_a_probe_needs_the_model_for() -> None:
    with pytest.raises(ValueError, match=r"not known by name; build the model and call diffkd.models.find_taps"):
        models.default_taps("mypackage.nets:small")
    with pytest.raises(ValueError, match=r"not known by name"):
        models.input_size("hf:/some/folder")
