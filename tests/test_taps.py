"""Tests for diffkd.taps: capture by module path, selection, token maps, staleness, probing."""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter

import torch.nn.functional as F

from diffkd.taps import FeatureTaps, Tap, probe_features, probe_shapes


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(weights=None)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Pair(nn.Module):
    """Returns a tuple of two tensors."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x + 1


class WithPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(x)
        return a - b


class Tokens(nn.Module):
    """Turns (B, N, C) into itself; a stand-in for a transformer block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Tokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Branchy(nn.Module):
    """Runs `maybe` only when asked, to test stale captures."""

    def __init__(self) -> None:
        super().__init__()
        self.always = nn.Linear(4, 4)
        self.maybe = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, use_maybe: bool = True) -> torch.Tensor:
        x = self.always(x)
        return self.maybe(x) if use_maybe else x


class Shared(nn.Module):
    """Applies the same layer twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x) + 100.0)


# ---------------------------------------------------------------- parsing


def test_parse_string_syntax() -> None:
    assert Tap.parse("layer4") == Tap("layer4")
    assert Tap.parse("") == Tap("")
    assert Tap.parse("backbone.body[0]") == Tap("backbone.body", select=0)
    assert Tap.parse("p[-1]") == Tap("p", select=-1)
    assert Tap.parse("backbone['0']") == Tap("backbone", select="0")
    assert Tap.parse('backbone["0"]') == Tap("backbone", select="0")
    assert Tap.parse("backbone[pool]") == Tap("backbone", select="pool")
    for bad in ("a[", "a[0]x", "a[]", "a[0][1]"):
        with pytest.raises(ValueError, match="cannot parse tap spec"):
            Tap.parse(bad)


def test_parse_mapping_and_validation() -> None:
    tap = Tap.parse({"path": "blocks.11", "prefix_tokens": 1, "token_hw": [14, 14]})
    assert tap == Tap("blocks.11", prefix_tokens=1, token_hw=(14, 14))
    assert Tap.parse(tap) is tap
    with pytest.raises(ValueError, match="unknown Tap field"):
        Tap.parse({"path": "a", "layer": 3})
    with pytest.raises(ValueError, match="capture"):
        Tap("a", capture="grad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token_hw"):
        Tap("a", token_hw=(0, 3))
    with pytest.raises(ValueError, match="prefix_tokens"):
        Tap("a", prefix_tokens=-1)
    with pytest.raises(TypeError, match="select"):
        Tap("a", select=True)


# ---------------------------------------------------------------- captures


def test_output_capture_matches_manual_hook(net: nn.Module, x: torch.Tensor) -> None:
    seen = {}
    handle = net.layer4.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with FeatureTaps(net, {"feat": "layer4", "vec": Tap("fc")}) as taps:
        out = net(x)
        assert taps.names() == ["feat", "vec"]
        assert taps["feat"] is seen["out"]
        assert taps["vec"] is out
        assert [n for n, _ in taps.items()] == ["feat", "vec"]
    handle.remove()


def test_input_capture(net: nn.Module, x: torch.Tensor) -> None:
    seen = {}
    handle = net.fc.register_forward_pre_hook(lambda m, args: seen.update(inp=args[0]))
    with FeatureTaps(net, {"pooled": Tap("fc", capture="input")}) as taps:
        net(x)
        assert taps["pooled"] is seen["inp"]
        assert taps["pooled"].shape == (2, 512)
    handle.remove()


def test_empty_path_is_model_output_and_input(net: nn.Module, x: torch.Tensor) -> None:
    with FeatureTaps(net, {"logits": "", "image": Tap("", capture="input")}) as taps:
        out = net(x)
        assert taps["logits"] is out
        assert taps["image"] is x


def test_gradient_flows_through_capture(net: nn.Module, x: torch.Tensor) -> None:
    with FeatureTaps(net, {"feat": "layer2"}) as taps:
        net(x)
        feat = taps["feat"]
        assert feat.requires_grad
        feat.square().mean().backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0
    assert net.layer3[0].conv1.weight.grad is None  # after the tap: untouched by this loss


def test_autocast_capture_kept_as_produced() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with FeatureTaps(model, {"lin": "0"}) as taps, torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 4))
        assert taps["lin"].dtype == torch.bfloat16


# ---------------------------------------------------------------- errors on paths


def test_unknown_path_lists_close_matches_and_children(net: nn.Module) -> None:
    with pytest.raises(ValueError) as info:
        FeatureTaps(net, {"f": "layer4.3"})
    msg = str(info.value)
    assert "unknown module path 'layer4.3' in ResNet" in msg
    assert "closest paths: 'layer4.1'" in msg
    assert "children of 'layer4': '0', '1'" in msg
    with pytest.raises(ValueError) as info:
        FeatureTaps(net, {"f": "layr4"})
    msg = str(info.value)
    assert "'layer4'" in msg.split("closest paths:")[1].split(";")[0]
    assert "children of the model (top level): 'conv1', 'bn1', 'relu'" in msg
    assert all_hooks(net) == 0  # nothing was hooked by the failed construction


# ---------------------------------------------------------------- selection


def test_tuple_without_select_explains_how() -> None:
    model = WithPair()
    with FeatureTaps(model, {"p": "pair"}) as taps:
        model(torch.randn(2, 3))  # the forward itself is not disturbed
        with pytest.raises(ValueError) as info:
            taps["p"]
    msg = str(info.value)
    assert "produced a tuple of 2 elements (indices [0, 1])" in msg
    assert "Tap('pair', select=0)" in msg
    assert "'pair[0]'" in msg


def test_index_select() -> None:
    model = WithPair()
    x = torch.randn(2, 3)
    with FeatureTaps(model, {"a": "pair[0]", "b": Tap("pair", select=-1), "bad": "pair[5]"}) as taps:
        model(x)
        assert torch.equal(taps["a"], x * 2)
        assert torch.equal(taps["b"], x + 1)
        with pytest.raises(ValueError, match=r"valid indices: \[0, 1\]"):
            taps["bad"]


def test_dict_output_selected_by_key(net: nn.Module, x: torch.Tensor) -> None:
    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = IntermediateLayerGetter(net, {"layer3": "0", "layer4": "1"})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feats = self.backbone(x)
            return feats["1"].mean()

    model = Detector()
    specs = {"c4": Tap("backbone", select="1"), "c3": "backbone['0']", "all": "backbone", "bad": "backbone[0]"}
    taps = FeatureTaps(model, specs)
    model(x)
    reference = model.backbone(x)
    assert torch.equal(taps["c4"], reference["1"])
    assert torch.equal(taps["c3"], reference["0"])
    with pytest.raises(ValueError) as info:
        taps["all"]
    assert "keys ['0', '1']" in str(info.value)
    assert "Tap('backbone', select='0')" in str(info.value)
    assert "\"backbone['0']\"" in str(info.value)
    with pytest.raises(ValueError, match=r"key 0 is not in the output; valid keys: \['0', '1'\]") as info:
        taps["bad"]
    assert "a digit key is a string: \"backbone['0']\"" in str(info.value)
    taps.close()


def test_non_tensor_element_is_type_error() -> None:
    class NoneOut(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
            return x, None

    model = nn.Sequential(OrderedDict(m=NoneOut()))
    with FeatureTaps(model, {"n": "m[1]"}) as taps:
        model(torch.randn(1, 2))
        with pytest.raises(TypeError, match="element 1 is a NoneType, not a tensor"):
            taps["n"]


def test_select_on_single_tensor_is_error(net: nn.Module, x: torch.Tensor) -> None:
    with FeatureTaps(net, {"f": "layer4[0]"}) as taps:
        net(x)
        with pytest.raises(ValueError, match="drop select"):
            taps["f"]


# ---------------------------------------------------------------- token maps


def test_tokens_with_class_token_become_map() -> None:
    model = TokenNet()
    tokens = torch.randn(2, 1 + 16, 8)
    specs = {"map": Tap("block", prefix_tokens=1), "seq": Tap("block", prefix_tokens=1, tokens_to_map=False)}
    with FeatureTaps(model, specs) as taps:
        model(tokens)
        fmap = taps["map"]
        reference = tokens[:, 1:].permute(0, 2, 1).reshape(2, 8, 4, 4)
        assert fmap.shape == (2, 8, 4, 4) and fmap.is_contiguous()
        assert torch.equal(fmap, reference)
        assert torch.equal(fmap[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])  # row-major token order
        # tokens_to_map=False hands the tokens out channel-first, as a (B, C, N) sequence
        assert torch.equal(taps["seq"], tokens[:, 1:].transpose(1, 2))
        assert taps.layouts() == {"map": "map", "seq": "sequence"}


def test_tokens_with_explicit_grid() -> None:
    model = TokenNet()
    tokens = torch.randn(2, 2 + 8, 3)
    with FeatureTaps(model, {"map": Tap("block", prefix_tokens=2, token_hw=(2, 4))}) as taps:
        model(tokens)
        assert torch.equal(taps["map"], tokens[:, 2:].permute(0, 2, 1).reshape(2, 3, 2, 4))


def test_non_square_tokens_error() -> None:
    model = TokenNet()
    with FeatureTaps(model, {"t": Tap("block", layout="tokens"), "hw": Tap("block", token_hw=(3, 3))}) as taps:
        model(torch.randn(2, 17, 8))
        with pytest.raises(ValueError) as info:
            taps["t"]
        msg = str(info.value)
        assert "N=17 tokens" in msg and "token_hw=(H, W)" in msg and "prefix_tokens=1" in msg
        assert "tokens_to_map=False for a (B, C, N) sequence" in msg
        with pytest.raises(ValueError, match="needs 9 tokens but there are 17"):
            taps["hw"]


def test_bad_rank_error() -> None:
    model = TokenNet()
    with FeatureTaps(model, {"t": "block", "raw": Tap("block", layout="raw")}) as taps:
        model(torch.randn(2, 3, 4, 5, 6))
        with pytest.raises(ValueError, match=r"got shape \(2, 3, 4, 5, 6\); set layout='raw' to take it as is"):
            taps["t"]
        assert taps["raw"].dim() == 5 and taps.layout("raw") == "raw"


# ---------------------------------------------------------------- staleness


def test_skipped_module_is_stale() -> None:
    model = Branchy()
    x = torch.randn(2, 4)
    with FeatureTaps(model, {"m": "maybe", "a": "always"}) as taps:
        with pytest.raises(RuntimeError, match="has not run a forward"):
            taps["m"]
        model(x, use_maybe=True)
        assert taps["m"].shape == (2, 4)
        model(x, use_maybe=False)
        assert taps["a"].shape == (2, 4)
        stale = r"tap 'm' \(path 'maybe'\) was not executed in the latest forward of the model"
        with pytest.raises(RuntimeError, match=stale):
            taps["m"]


def test_shared_module_keeps_last_run() -> None:
    model = Shared()
    with FeatureTaps(model, {"lin": "lin"}) as taps:
        out = model(torch.randn(2, 4))
        assert taps["lin"] is out


def test_unknown_tap_name_is_key_error(net: nn.Module) -> None:
    with FeatureTaps(net, {"f": "layer1"}) as taps, pytest.raises(KeyError, match="taps: \\['f'\\]"):
        taps["g"]


# ---------------------------------------------------------------- lifecycle


def test_close_and_with_remove_hooks(net: nn.Module, x: torch.Tensor) -> None:
    taps = FeatureTaps(net, {"a": "layer4", "b": Tap("fc", capture="input"), "c": ""})
    assert all_hooks(net) == 4  # three taps plus the root's forward counter
    taps.close()
    taps.close()  # twice is fine
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    net(x)
    with pytest.raises(RuntimeError, match="closed"):
        taps["a"]
    with FeatureTaps(net, {"a": "layer4"}) as taps2:
        assert all_hooks(net) == 2
    assert all_hooks(net) == 0
    assert taps2.names() == ["a"]


def test_forgotten_taps_unhook_themselves() -> None:
    model = Branchy()
    taps = FeatureTaps(model, {"a": "maybe"})
    model(torch.randn(2, 4))
    del taps  # hooks hold it weakly and it is in no reference cycle: freed and unhooked at once
    assert all_hooks(model) == 0


def test_deepcopy_and_pickle_of_hooked_model() -> None:
    model = Branchy()
    x = torch.randn(2, 4)
    with FeatureTaps(model, {"a": "maybe"}) as taps:
        model(x)  # the capture is a non-leaf tensor, which deepcopy could not copy
        first = taps["a"]
        twin = copy.deepcopy(model)
        pickle.loads(pickle.dumps(model))
        twin(x * 3)  # the copy's hooks are inert: the original taps are not refreshed
        assert taps["a"] is first


def test_works_under_ddp(tmp_path) -> None:
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = Branchy()
        taps = FeatureTaps(model, {"a": "always"})  # attached to the bare model, then wrapped
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(torch.randn(2, 4), use_maybe=False)
        taps["a"].square().mean().backward()
        assert model.always.weight.grad is not None
        taps.close()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- probing


def test_probe_shapes_resnet18(net: nn.Module) -> None:
    net.train()
    net.bn1.eval()  # a mixed-mode model: per-module flags must come back exactly
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    rng = torch.get_rng_state()
    shapes = probe_shapes(net, {"c5": "layer4", "logits": "fc"}, input_shape=(3, 64, 64))
    assert shapes == {"c5": torch.Size([2, 512, 2, 2]), "logits": torch.Size([2, 1000])}
    assert all(torch.equal(v, buffers[k]) for k, v in net.named_buffers())
    assert net.training and net.layer1.training and not net.bn1.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all_hooks(net) == 0


def test_probe_shapes_with_example_input(net: nn.Module) -> None:
    net.eval()
    shapes = probe_shapes(net, {"c3": "layer3"}, torch.zeros(1, 3, 32, 32))
    assert shapes == {"c3": torch.Size([1, 256, 2, 2])}
    assert not net.training
    with pytest.raises(ValueError, match="exactly one"):
        probe_shapes(net, {"c3": "layer3"})


def test_channels_last_map_is_read_as_bchw():
    """A (B, H, W, C) output (timm Swin stages) comes back as the (B, C, H, W) map it holds."""

    class NHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1) * 2

    model = nn.Sequential(NHWC())
    x = torch.randn(2, 5, 3, 4)
    with FeatureTaps(model, {"f": {"path": "0", "channels_last": True}}) as taps:
        model(x)
        assert torch.equal(taps["f"], x * 2)
    identity = nn.Identity()
    with FeatureTaps(identity, {"f": {"path": "", "channels_last": True}}) as taps:
        identity(x[:, :, 0])
        with pytest.raises(ValueError, match=r"channels_last expects a \(B, H, W, C\) map, got shape \(2, 5, 4\)"):
            taps["f"]
    with pytest.raises(ValueError, match="Tap.channels_last is for"):
        Tap("x", channels_last=True, prefix_tokens=1)


# ---------------------------------------------------------------- layouts: every capture channel-first


class Signal(nn.Module):
    """A 1-D conv net on (B, 2, L) signals: conv -> BN -> ReLU blocks, then a pooled linear head."""

    def __init__(self, width: int = 64, second: int = 60) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, width, 5), nn.BatchNorm1d(width), nn.ReLU(), nn.Conv1d(width, second, 5))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(second, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class TransposedConv1d(nn.Conv1d):
    """A Conv1d subclass with its own forward (here reading (B, L, C)): its type proves nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2))


@pytest.mark.parametrize("width", [64, 60])
def test_conv1d_output_is_a_sequence_of_its_channels(width: int) -> None:
    """The issue's case: Conv1d(2, width, 5) on length 100 was read as tokens (a 100-channel map for
    width 64, an error about prefix_tokens for 60). It is a (B, width, 96) sequence, handed out as is."""
    torch.manual_seed(0)
    model = Signal(width).eval()
    x = torch.randn(2, 2, 100)
    conv = model.features[0]
    with FeatureTaps(model, {"conv": "features.0", "block": "features", "bn": "features.1"}) as taps:
        model(x)
        expected = F.conv1d(x, conv.weight, conv.bias)  # independent of the tap machinery
        assert taps["conv"].shape == (2, width, 96) and torch.equal(taps["conv"], expected)
        assert taps["block"].shape == (2, 60, 92) and taps["bn"].shape == (2, width, 96)
        assert taps.layouts() == {"conv": "sequence", "block": "sequence", "bn": "sequence"}
    probed = probe_features(model, {"conv": "features.0"}, input_shape=(2, 100))
    assert probed["conv"] == (torch.Size([2, width, 96]), "sequence")


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU()),  # walks back over the activation
        nn.Sequential(nn.Sequential(nn.Conv1d(3, 5, 3), nn.GELU()), nn.Dropout(0.1), nn.Identity()),
        nn.BatchNorm1d(3),
        nn.InstanceNorm1d(3),
        nn.GroupNorm(1, 3),
        nn.MaxPool1d(2),
        nn.AdaptiveAvgPool1d(4),
        nn.ConvTranspose1d(3, 5, 3),
    ],
    ids=["conv+relu", "nested", "batchnorm1d", "instancenorm1d", "groupnorm", "maxpool1d", "adaptivepool1d", "convtranspose1d"],
)
def test_module_types_that_define_a_sequence(module: nn.Module) -> None:
    x = torch.randn(2, 3, 12)
    with FeatureTaps(module, {"out": "", "in": {"path": "", "capture": "input"}}) as taps:
        y = module(x)
        assert torch.equal(taps["out"], y) and torch.equal(taps["in"], x)
        assert taps.layouts() == {"out": "sequence", "in": "sequence"}


@pytest.mark.parametrize(
    "module, spec",
    [
        (TokenNet(), "block"),  # a custom block: its (B, N, C) or (B, C, L) cannot be known
        (nn.Sequential(nn.Linear(12, 12)), ""),  # Linear fixes the channel axis, not the batch axis
        (nn.Sequential(nn.Linear(12, 12)), {"path": "0", "capture": "input"}),
        (nn.Sequential(nn.ReLU(), nn.Dropout()), ""),  # only element-wise children: nothing says
        (TransposedConv1d(12, 3, 1), ""),  # a subclass with its own forward
        (nn.Sequential(nn.Conv1d(3, 4, 1), nn.LayerNorm(12)), ""),  # the last child decides, and says nothing
    ],
    ids=["custom", "linear-output", "linear-input", "elementwise-only", "overridden-forward", "layernorm-last"],
)
def test_rank3_capture_without_a_certain_rule_asks_for_layout(module: nn.Module, spec: object) -> None:
    x = torch.randn(2, 3, 12)
    with FeatureTaps(module, {"f": spec}) as taps:
        out = module(x)
        with pytest.raises(ValueError) as info:
            taps["f"]
        with pytest.raises(ValueError):
            taps.layouts()
    message = str(info.value)
    assert "\n" not in message and message.startswith("tap 'f' (path ")
    captured = x if isinstance(spec, dict) else out
    assert f"shape {tuple(captured.shape)}" in message
    assert "set layout='tokens' for (B, N, C) or layout='sequence' for (B, C, L)" in message
    with pytest.raises(ValueError, match="layout='tokens'"):  # and at probe time, before training
        probe_shapes(module, {"f": spec}, x)


def test_tokens_sequence_vector_raw_and_map_layouts() -> None:
    model = TokenNet()
    x = torch.randn(2, 1 + 9, 4)
    specs = {
        "grid": Tap("block", layout="tokens", prefix_tokens=1),  # 9 tokens: a 3x3 grid
        "seq": Tap("block", layout="tokens", prefix_tokens=1, tokens_to_map=False),
        "as_is": Tap("block", layout="sequence"),
        "raw": Tap("block", layout="raw"),
    }
    with FeatureTaps(model, specs) as taps:
        model(x)
        assert torch.equal(taps["grid"], x[:, 1:].permute(0, 2, 1).reshape(2, 4, 3, 3))
        assert torch.equal(taps["seq"], x[:, 1:].transpose(1, 2)) and taps["seq"].is_contiguous()
        assert torch.equal(taps["as_is"], x)
        assert torch.equal(taps["raw"], x)
        assert taps.layouts() == {"grid": "map", "seq": "sequence", "as_is": "sequence", "raw": "raw"}
    vectors, maps = nn.Linear(4, 6), nn.Conv2d(3, 5, 1)
    assert probe_features(vectors, {"v": "", "vv": Tap("", layout="vector")}, input_shape=(4,))["vv"].layout == "vector"
    assert probe_features(maps, {"m": "", "mm": Tap("", layout="map")}, input_shape=(3, 4, 4))["m"] == (torch.Size([2, 5, 4, 4]), "map")


@pytest.mark.parametrize(
    "layout, shape, message",
    [
        ("map", (2, 3, 12), "layout='map' expects a (B, C, H, W) map, got shape (2, 3, 12)"),
        ("sequence", (2, 3, 4, 4), "layout='sequence' expects a (B, C, L) sequence, got shape (2, 3, 4, 4)"),
        ("vector", (2, 3, 12), "layout='vector' expects a (B, K) vector, got shape (2, 3, 12)"),
        ("tokens", (2, 12), "layout='tokens' expects a (B, N, C) token sequence, got shape (2, 12)"),
    ],
)
def test_wrong_rank_for_an_explicit_layout(layout: str, shape: tuple[int, ...], message: str) -> None:
    model = TokenNet()
    with FeatureTaps(model, {"f": Tap("block", layout=layout)}) as taps:
        model(torch.randn(*shape))
        with pytest.raises(ValueError) as info:
            taps["f"]
    assert str(info.value) == f"tap 'f' (path 'block', output): {message}"


def test_layout_field_parsing_and_construction_errors() -> None:
    assert Tap.parse({"path": "enc", "layout": "sequence"}) == Tap("enc", layout="sequence")
    with pytest.raises(ValueError, match="Tap.layout must be one of 'map', 'vector', 'sequence', 'tokens', 'raw' or None, got 'grid'"):
        Tap("x", layout="grid")
    with pytest.raises(ValueError, match="are for layout='tokens', not layout='sequence'"):
        Tap("x", layout="sequence", prefix_tokens=1)
    with pytest.raises(ValueError, match="are for layout='tokens', not layout='raw'"):
        Tap("x", layout="raw", tokens_to_map=False)
    with pytest.raises(ValueError, match="channels_last is for .* not layout='sequence'"):
        Tap("x", layout="sequence", channels_last=True)
    with pytest.raises(TypeError, match="tokens_to_map must be a bool"):
        Tap("x", tokens_to_map="no")
    with pytest.raises(ValueError, match="Tap.layout must be one of .* got 'object'"):  # a capture as produced is an extra input now
        Tap("x", layout="object")


def test_rule_holds_for_a_selected_element() -> None:
    """MaxPool1d(return_indices=True) gives (values, indices), both (B, C, L): select keeps the rule."""
    pool = nn.MaxPool1d(2, return_indices=True)
    x = torch.randn(2, 3, 8)
    with FeatureTaps(pool, {"values": "[0]", "indices": "[1]"}) as taps:
        values, indices = pool(x)
        assert torch.equal(taps["values"], values) and torch.equal(taps["indices"], indices)
        assert taps.layouts() == {"values": "sequence", "indices": "sequence"}


# ------------------------------------------------------------------ one way to call a model (issue 23)
class KeywordNet(nn.Module):
    """A model that takes its batch as keywords only (as a tokenizer's output is passed to a transformer)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, *, pixels: torch.Tensor, scale: float) -> torch.Tensor:
        return self.head(torch.relu(self.body(pixels))) * scale


def test_call_model_spreads_tuples_and_mappings_and_passes_anything_else_whole():
    from diffkd.taps import call_model

    seen = []

    def model(*args, **kwargs):
        seen.append((args, kwargs))

    call_model(model, (1, 2))
    call_model(model, {"a": 1})
    call_model(model, [1, 2])
    call_model(model, torch.zeros(1))
    assert [(len(a), sorted(k)) for a, k in seen] == [(2, []), (0, ["a"]), (1, []), (1, [])]


def test_a_mapping_batch_reaches_the_model_as_keywords_in_training_distillation_and_evaluation():
    """The plain learner, the Distiller (and its shape probe) and evaluation call a model the same way."""
    from types import SimpleNamespace

    from diffkd import Distiller, Level
    from diffkd.engine.evaluation import evaluate
    from diffkd.engine.learner import PlainLearner
    from diffkd.engine.precision import MixedPrecision

    torch.manual_seed(0)
    teacher, student = KeywordNet(), KeywordNet()
    batch = {"pixels": torch.randn(5, 4), "scale": 2.0}
    expected = student(**batch)
    learner = PlainLearner.__new__(PlainLearner)  # its compute only needs a task loss
    learner.task = SimpleNamespace(loss=lambda out, targets: F.cross_entropy(out, targets))
    step = learner.compute(student, batch, torch.tensor([0, 1, 2, 0, 1]))
    assert torch.equal(step.outputs, expected)
    distiller = Distiller(teacher, student, [Level("body", "body", "mse")], example_input=batch)
    assert torch.equal(distiller(batch).student, expected)
    seen = []
    metrics = SimpleNamespace(update=lambda out, targets: seen.append(out), compute=lambda reduce: {})
    task = SimpleNamespace(metrics=lambda: metrics, to_device=lambda b, device: b)
    ctx = SimpleNamespace(sum=lambda x: x, device=torch.device("cpu"))
    evaluate(student, [(batch, None)], task, ctx, MixedPrecision("none", torch.device("cpu")))
    assert torch.equal(seen[0], expected)
