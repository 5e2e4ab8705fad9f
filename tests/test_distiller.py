"""The Distiller on real torchvision models, a token model, export, DDP and every error case."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import spawn_processes
from diffkd import models
from diffkd.distiller import Distiller, Level
from diffkd.methods import METHODS, Method, MethodOutput
from diffkd.methods.base import ExtraInput


def by_name(teacher: str, student: str, method: str = "diffkd", **logit_options):
    """A Distiller built from model names alone: channels come from the probed taps."""
    torch.manual_seed(0)
    t, s = models.create(teacher, num_classes=10), models.create(student, num_classes=10)
    tt, st = models.default_taps(teacher), models.default_taps(student)
    levels = [Level(st.feature, tt.feature, method), Level(st.logits, tt.logits, method, **logit_options)]
    return Distiller(t, s, levels, input_shape=(3, 64, 64))


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.integration
@pytest.mark.parametrize("teacher,student", [("resnet34", "resnet18"), ("resnet50", "mobilenet_v2")])
def test_one_step_trains_student_and_methods_not_teacher(teacher, student):
    d = by_name(teacher, student)
    teacher_before, student_before, methods_before = snapshot(d.teacher), snapshot(d.student), snapshot(d.methods)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
    d.train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    out = d(x, y)
    loss = nn.functional.cross_entropy(out.student, y) + out.loss
    loss.backward()
    opt.step()
    assert d.teacher.training is False
    assert all(not p.requires_grad and p.grad is None for p in d.teacher.parameters())
    assert all(torch.equal(v, d.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, d.student.state_dict()[k]) for k, v in student_before.items())
    changed = [k for k, v in methods_before.items() if not torch.equal(v, d.methods.state_dict()[k])]
    assert any(".noise_predictor." in k for k in changed) and any(".projector." in k for k in changed)


def mlp_level_params_by_hand(k: int) -> int:
    """A DiffKD logits level (mlp kind, k classes, no AE) box by box (docs/design.md §2)."""
    def pointwise(cin, cout):  # 1x1 conv with bias
        return cin * cout + cout

    projector = pointwise(k, k)
    predictor = 1280 * k + pointwise(k, 4 * k) + 2 * 4 * k + pointwise(4 * k, k) + 2 * k \
        + pointwise(k, 4 * k) + 2 * 4 * k + pointwise(4 * k, k)
    anm = pointwise(k, 2 * k) + 2 * 2 * k + pointwise(2 * k, k) + 2 * k + (k * 2 + 2)
    output = pointwise(k, k) + 2 * k
    return projector + predictor + anm + output


def test_state_dict_has_no_teacher_and_extra_parameters_counts_methods():
    d = by_name("resnet34", "resnet18")
    keys = list(d.state_dict())
    assert keys and all(k.startswith(("student.", "methods.")) for k in keys)
    assert mlp_level_params_by_hand(100) == 352_302  # the published fingerprint of the 100-class level
    feature_level = 2_112_386  # the published fingerprint of a 512 -> 512 map level without AE
    assert d.extra_parameters() == feature_level + mlp_level_params_by_hand(10)
    resnet18_10_classes = 11_689_512 - (512 * 1000 + 1000) + (512 * 10 + 10)  # torchvision's count, head for 10 classes
    assert sum(p.numel() for p in d.trainable_parameters()) == resnet18_10_classes + feature_level + mlp_level_params_by_hand(10)


def test_exported_student_loads_strictly_and_gives_same_logits(tmp_path):
    d = by_name("resnet34", "resnet18")
    d.train()
    d(torch.randn(4, 3, 64, 64))  # move BN statistics away from their initial values
    d.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        inside = d(x).student
    path = d.export_student(tmp_path / "student.pt")
    fresh = models.create("resnet18", num_classes=10).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), inside)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        d.export_student(path)


def test_kd_dist_dkd_levels_and_losses_sum():
    torch.manual_seed(0)
    t, s = models.create("resnet34", num_classes=10), models.create("resnet18", num_classes=10)
    d = Distiller(t, s, [Level("fc", "fc", "kd", weight=0.5), Level("fc", "fc", "dist", weight=2.0),
                         Level("fc", "fc", "dkd"), Level("layer4", "layer4", "mse")], input_shape=(3, 32, 32))
    out = d(torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3]), progress=(0.0, 1))  # dkd's warm-up follows it
    assert set(out.losses) == {"kd_fc", "dist_fc", "dkd_fc", "mse_layer4"}
    assert torch.allclose(out.loss, sum(out.losses.values()))
    with pytest.raises(ValueError, match=r"dkd needs the class labels: call the distiller as d\(inputs, targets\)"):
        d(torch.randn(3, 3, 32, 32))


class TinyViT(nn.Module):
    """A small token model: patch embedding, class token, two encoder blocks, head on the class token."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True) for _ in range(2)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.blocks(tokens)[:, 0])


def test_token_model_distilled_at_a_token_layer():
    torch.manual_seed(0)
    teacher, student = TinyViT(64), TinyViT(32)
    tap = {"path": "blocks.1", "prefix_tokens": 1}
    d = Distiller(teacher, student, [Level(tap, tap, "diffkd"), Level("head", "head", "diffkd")],
                  input_shape=(3, 32, 32))
    inner = d.methods["diffkd_blocks_1"].diffkd
    assert (inner.kind, inner.student_channels, inner.teacher_channels) == ("conv", 32, 64)
    out = d(torch.randn(4, 3, 32, 32))
    out.loss.backward()
    assert student.patch.weight.grad.abs().sum() > 0


@pytest.mark.integration
def test_autocast_cpu_bf16():
    d = by_name("resnet34", "resnet18")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out.loss)
    out.loss.backward()


# ------------------------------------------------------------------ errors
def test_unknown_layer_lists_close_names():
    t, s = models.create("resnet34", num_classes=10), models.create("resnet18", num_classes=10)
    with pytest.raises(ValueError) as info:
        Distiller(t, s, [Level("layer5", "layer4", "kd")], input_shape=(3, 32, 32))
    assert "unknown module path 'layer5'" in str(info.value) and "'layer4'" in str(info.value)


@pytest.mark.parametrize(
    "levels,message",
    [
        ([Level("fc", "fc", "kdd")], "unknown method 'kdd' (did you mean 'kd'?)"),
        ([Level("fc", "fc", "kd", temperature=2)], "method 'kd' got an unknown option"),
        ([Level("fc", "layer4", "kd")], "kd compares student and teacher outputs of the same shape"),
        ([Level("fc", "layer4", "diffkd")], "diffkd needs two maps (B,C,H,W), two sequences (B,C,L) or two vectors (B,K)"),
        ([Level("fc", "fc", "kd"), Level("fc", "fc", "kd")], "level names must be unique"),
        ([], "needs at least one Level"),
    ],
)
def test_bad_levels(levels, message):
    t, s = models.create("resnet34", num_classes=10), models.create("resnet18", num_classes=10)
    with pytest.raises(ValueError) as info:
        Distiller(t, s, levels, input_shape=(3, 32, 32))
    assert message in str(info.value)


def test_class_count_mismatch_and_missing_example_input():
    t, s = models.create("resnet34", num_classes=100), models.create("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"student \(2, 10\) and teacher \(2, 100\)"):
        Distiller(t, s, [Level("fc", "fc", "kd")], input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="give example_input or input_shape"):
        Distiller(t, s, [Level("fc", "fc", "kd")])


# ------------------------------------------------------------------ DDP (gloo, CPU, 2 processes)
def _ddp_worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    d = by_name("resnet34", "resnet18")
    ddp = nn.parallel.DistributedDataParallel(d)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
    torch.manual_seed(100 + rank)  # each replica sees its own data and noise
    for _ in range(3):
        x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
        out = ddp(x, y)
        (nn.functional.cross_entropy(out.student, y) + out.loss).backward()
        opt.step()
        opt.zero_grad()
    flat = torch.cat([p.detach().flatten() for p in d.trainable_parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    results[rank] = bool(torch.isfinite(flat).all()) and bool(torch.equal(gathered[0], gathered[1]))
    dist.destroy_process_group()


@pytest.mark.integration
def test_ddp_two_processes_stay_in_sync():
    assert spawn_processes(_ddp_worker) == {0: True, 1: True}


# ------------------------------------------------------------------ API misuse caught when built (issue 15)
@pytest.mark.parametrize("weight", ["one", -1.0, float("nan"), float("inf"), True, None])
def test_level_weight_must_be_a_finite_number_at_least_zero(weight):
    with pytest.raises(ValueError) as info:
        Level("fc", "fc", "kd", weight=weight)
    assert str(info.value) == f"Level weight must be a finite number >= 0 or 'auto', got {weight!r}"


def test_level_weights_that_are_numbers_are_kept():
    assert [Level("fc", "fc", "kd", weight=w).weight for w in (0, 2, 0.5)] == [0, 2, 0.5]


def test_diffkd_logits_of_different_class_counts_are_refused_like_kd():
    from diffkd.methods import build_method

    s, t = torch.Size([2, 10]), torch.Size([2, 5])
    with pytest.raises(ValueError) as kd:
        build_method("kd", s, t)
    with pytest.raises(ValueError) as diffkd:
        build_method("diffkd", s, t)  # vectors default to distance kl: logits
    assert str(diffkd.value) == str(kd.value).replace("kd", "diffkd", 1).replace(
        "num_classes)", "num_classes, or pass allow_class_mismatch=True if mapping one class set onto the other is meant)"
    )
    with pytest.raises(ValueError, match=r"diffkd compares class scores \(distance 'dist'\): student 19, teacher 21"):
        build_method("diffkd", torch.Size([2, 19, 8, 8]), torch.Size([2, 21, 8, 8]), distance="dist")
    meant = build_method("diffkd", s, t, allow_class_mismatch=True)
    assert meant.diffkd.projector.weight.shape[:2] == (5, 10)
    # features, not logits: a projector between widths is the point
    assert build_method("diffkd", torch.Size([2, 64]), torch.Size([2, 128]), distance="mse").diffkd.kind == "mlp"
    assert build_method("diffkd", torch.Size([2, 8, 4, 4]), torch.Size([2, 16, 4, 4])).diffkd.kind == "conv"


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("diffkd", {"distanse": "mse"}, "method 'diffkd' got an unknown option 'distanse' (did you mean 'distance'?); "
                                        "valid options: "),
        ("kd", {"tua": 2.0}, "method 'kd' got an unknown option 'tua' (did you mean 'tau'?); valid options: tau"),
        ("mse", {"tau": 2.0}, "method 'mse' got an unknown option 'tau'; it takes no options"),
    ],
)
def test_unknown_method_option_names_the_closest_and_the_valid_ones(method, options, message):
    from diffkd.methods import build_method

    shape = torch.Size([2, 8, 4, 4]) if method != "kd" else torch.Size([2, 10])
    with pytest.raises(ValueError) as info:
        build_method(method, shape, shape, **options)
    assert str(info.value).startswith(message)
    if method == "diffkd":
        valid = str(info.value).split("valid options: ")[1].split(", ")
        assert {"distance", "tau", "inference_steps", "latent_channels", "allow_class_mismatch"} <= set(valid)
        assert not {"student_channels", "teacher_channels", "module"} & set(valid)


@pytest.mark.integration
def test_torch_compile_traces_the_distiller_like_eager():
    """Dynamo traces the taps' hooks (backend "eager": no code generation, so it stays fast); a compiled
    Distiller gives the eager one's loss and gradients, on its first call and on a reused graph."""
    import torch._dynamo

    torch._dynamo.reset()

    def net(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, 4))  # fmt: skip

    torch.manual_seed(0)
    eager = Distiller(net(8), net(4), [Level("3", "3", "mse")], input_shape=(1, 8, 8))
    torch.manual_seed(0)
    twin = Distiller(net(8), net(4), [Level("3", "3", "mse")], input_shape=(1, 8, 8))
    compiled = torch.compile(twin, backend="eager")
    for step in range(2):
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(step))
        outs = [model(x) for model in (eager, compiled)]
        losses = [out.loss + out.student.square().mean() for out in outs]  # the student's head gets a gradient too
        for loss in losses:
            loss.backward()
        assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
        for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
class RecordTargets(Method):
    """A test method that returns no loss and keeps the targets it was given."""

    def forward(self, student, teacher, targets=None):
        self.seen = targets
        return MethodOutput({"zero": student.sum() * 0})


class RecordSplit(RecordTargets):
    """A test method that also declares an extra input, the output of the student's `split` by default."""

    extra_inputs = {"halves": ExtraInput("split")}

    def forward(self, student, teacher, targets=None, *, halves=None):
        self.halves = halves
        return super().forward(student, teacher, targets)


class Halves(nn.Module):
    """A model whose `split` submodule returns a tuple holding a dict: an output no tap could hand out."""

    def __init__(self) -> None:
        super().__init__()
        self.split = Split()
        self.other = Split()
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        first, _ = self.split(x)
        if x.shape[0] > 1:
            self.other(x)
        return self.head(first)


class Split(nn.Module):
    def forward(self, x):
        return x[:, :2], {"rest": x[:, 2:]}


def test_a_method_gets_the_extra_inputs_it_declares_as_the_student_produced_them(monkeypatch):
    monkeypatch.setitem(METHODS, "record", RecordTargets)
    monkeypatch.setitem(METHODS, "split", RecordSplit)
    torch.manual_seed(0)
    d = Distiller(Halves(), Halves(), [Level("head", "head", "record", name="plain"),
                                        Level("head", "head", "split", name="own"),
                                        Level("head", "head", "split", name="other", inputs={"halves": "other"})],
                  input_shape=(4,))
    x, y = torch.randn(5, 4), torch.arange(5)
    d(x, y)
    assert all(d.methods[n].seen is y for n in ("plain", "own", "other"))  # the targets given to forward, always
    assert not hasattr(d.methods["plain"], "halves")
    for name in ("own", "other"):
        first, rest = d.methods[name].halves  # the module's output, as produced: a tuple holding a dict
        assert torch.equal(first, x[:, :2]) and torch.equal(rest["rest"], x[:, 2:])
    assert d.methods["own"].halves is not d.methods["other"].halves  # two modules, two outputs
    assert "inputs={'halves': 'other'}" in repr(d.levels[2])
    with pytest.raises(RuntimeError, match=r"level 'other' \(split\): input 'halves' \(module 'other'\): the module did not run"):
        d(torch.randn(1, 4), torch.arange(1))  # Halves skips `other` on a batch of one: never the stale output
    d.close()


def test_extra_input_mistakes_get_one_line_each(monkeypatch):
    monkeypatch.setitem(METHODS, "split", RecordSplit)
    with pytest.raises(ValueError, match=r"level 'bad' \(split\): input 'halves': unknown module path 'splt' .* closest paths: 'split'"):
        Distiller(Halves(), Halves(), [Level("head", "head", "split", name="bad", inputs={"halves": "splt"})], input_shape=(4,))
    with pytest.raises(ValueError, match=r"level 'bad': method 'split' reads no input 'boxes'; its extra inputs: halves"):
        Distiller(Halves(), Halves(), [Level("head", "head", "split", name="bad", inputs={"boxes": "split"})], input_shape=(4,))
    with pytest.raises(ValueError, match="Level inputs map an input name to a student module path"):
        Level("head", "head", "split", inputs={"halves": 3})
    monkeypatch.setattr(RecordSplit, "extra_inputs", {"halves": ExtraInput(None)})  # a method with no default module
    with pytest.raises(ValueError, match=r"level 'need': method 'split' needs its input 'halves': give Level\(inputs=\{'halves': <student module path>\}\)"):
        Distiller(Halves(), Halves(), [Level("head", "head", "split", name="need")], input_shape=(4,))


class KeywordStudent(nn.Module):
    """A student called with keywords, as Hugging Face models are: model(pixel_values=..., labels=...)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, pixel_values, labels=None):
        return self.head(self.body(pixel_values).mean((2, 3)))


class TensorTeacher(nn.Module):
    """A teacher called with one tensor; records what it was called with."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 5)
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return self.head(self.body(x).mean((2, 3)))


def test_a_teacher_taking_other_inputs_than_the_student_gets_teacher_inputs():
    torch.manual_seed(0)
    student, teacher = KeywordStudent(), TensorTeacher()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    d = Distiller(teacher, student, [Level("head", "head", "kd", tau=1.0)],
                  example_input={"pixel_values": x}, teacher_example_input=x)
    out = d({"pixel_values": x, "labels": y}, teacher_inputs=x)
    assert teacher.seen[-1] is x
    s, t = student(pixel_values=x), teacher(x)
    expected = torch.nn.functional.kl_div(s.log_softmax(1), t.softmax(1), reduction="batchmean")  # KD at tau 1
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"built with teacher_example_input: call it as d\(inputs, \.\.\., teacher_inputs=\.\.\.\)"):
        d({"pixel_values": x})
    same = Distiller(TensorTeacher(), nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)),
                     [Level("2", "head", "kd")], example_input=x)
    with pytest.raises(ValueError, match="teacher_inputs was given, but this Distiller probed the teacher"):
        same(x, teacher_inputs=x)


def test_a_type_error_inside_a_method_is_its_own_not_blamed_on_the_options(monkeypatch):
    """Unknown options are found from the method's declared options, so a TypeError raised while building
    (whatever its text) reaches the caller unchanged."""
    from diffkd.methods import build_method

    class Broken(Method):
        def __init__(self, scale: float = 1.0):
            super().__init__()

        @classmethod
        def build(cls, student_shape, teacher_shape, **options):
            raise TypeError("f() got an unexpected keyword argument 'scale'")

    monkeypatch.setitem(METHODS, "broken", Broken)
    with pytest.raises(TypeError, match="unexpected keyword argument 'scale'"):
        build_method("broken", torch.Size([2, 3]), torch.Size([2, 3]), scale=2.0)
    with pytest.raises(ValueError, match="method 'broken' got an unknown option 'scal' \\(did you mean 'scale'\\?\\)"):
        build_method("broken", torch.Size([2, 3]), torch.Size([2, 3]), scal=2.0)


def test_building_a_distiller_runs_one_dry_forward_per_model_and_holds_one_hook_holder_each():
    """The alias probe and the tap shapes come from one watched forward (here on the meta device), and the
    student's features and extra inputs are captured by one FeatureTaps."""
    teacher, student = models.create("resnet34", num_classes=10), models.create("resnet18", num_classes=10)
    forwards = {"teacher": 0, "student": 0}
    for role, model in (("teacher", teacher), ("student", student)):
        model.register_forward_pre_hook(lambda module, args, role=role: forwards.__setitem__(role, forwards[role] + 1))
    d = Distiller(teacher, student, [Level("@feature", "@feature", "mse"), Level("@logits", "@logits", "kd")],
                  input_shape=(3, 32, 32))
    assert forwards == {"teacher": 1, "student": 1}
    assert d.probed["student"]["mse_feature"].shape[1:] == (512, 1, 1)
    from diffkd.taps import WeakHook

    hooks = [h for m in student.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert {h._owner() for h in hooks if isinstance(h, WeakHook)} == {d.student_taps}
