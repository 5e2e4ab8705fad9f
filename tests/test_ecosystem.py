"""timm and transformers models distilled by "@feature" / "@logits" alone (no layer named by hand).

timm and transformers are in the test extra: these tests never skip. Models are randomly initialised
(pretrained=False, or a transformers config), small, at 32x32, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from diffkd import Distiller, Level, models
from diffkd.models import Taps
from diffkd.taps import FeatureTaps, Tap


def tokens_to_map(prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, N, C) tokens -> drop `prefix` leading tokens -> (B, C, H, W) on the square grid, row-major."""
    def fold(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:]
        side = int(patches.shape[1] ** 0.5)
        return patches.reshape(len(tokens), side, side, -1).permute(0, 3, 1, 2)
    return fold


def as_is(features: torch.Tensor) -> torch.Tensor:
    return features


def nhwc(features: torch.Tensor) -> torch.Tensor:
    return features.permute(0, 3, 1, 2)


TOKENS = {"layout": "tokens"}
FAMILIES = [  # timm name, builder options, expected taps, forward_features -> the expected (B, C, H, W) feature
    pytest.param("resnet10t", {}, Taps("layer4", "fc"), as_is, id="resnet"),
    pytest.param("efficientnet_b0", {}, Taps("bn2", "classifier"), as_is, id="efficientnet"),
    pytest.param("convnext_atto", {}, Taps("stages", "head"), as_is, id="convnext"),
    pytest.param("vit_tiny_patch16_224", {"img_size": 32, "depth": 2},
                 Taps({"path": "norm", **TOKENS, "prefix_tokens": 1}, "head"), tokens_to_map(1), id="vit"),
    pytest.param("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 2},  # class + distillation token;
                 Taps({"path": "norm", **TOKENS, "prefix_tokens": 2}, ""), tokens_to_map(2), id="deit"),  # (head + head_dist) / 2
    pytest.param("swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 2, "embed_dim": 24,
                 "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "drop_path_rate": 0.0},
                 Taps({"path": "norm", "channels_last": True}, "head"), nhwc, id="swin"),
]


def distil_one_step(student: nn.Module, features: Callable[[torch.Tensor], torch.Tensor],
                    expected: Callable[[torch.Tensor], torch.Tensor]) -> Distiller:
    """One SGD step of a CNN teacher -> `student` by @feature (DiffKD) and @logits (KD), with checks."""
    torch.manual_seed(0)
    teacher = models.create("resnet8", num_classes=5)
    distiller = Distiller(teacher, student, [Level("@feature", "@feature", "diffkd", latent_channels=8, name="feature"),
                                             Level("@logits", "@logits", "kd", name="logits")], input_shape=(3, 32, 32))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    out = distiller(x, y)
    logits = out.student.logits if hasattr(out.student, "logits") else out.student
    with torch.no_grad():  # the captured feature is the model's own, laid out channels-first
        torch.testing.assert_close(distiller.student_taps["feature"], expected(features(x)))
    torch.testing.assert_close(distiller.student_taps["logits"], logits)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    loss = F.cross_entropy(logits, y) + out.loss
    assert torch.isfinite(loss) and set(out.losses) == {"feature/kd", "feature/diffusion", "feature/ae", "logits"}
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    return distiller


@pytest.mark.integration
@pytest.mark.parametrize("arch, options, taps, layout", FAMILIES)
def test_timm_family_distils_by_aliases(arch: str, options: dict, taps: Taps, layout: Callable) -> None:
    torch.manual_seed(0)
    student = models.create(f"timm:{arch}", num_classes=5, **options)
    assert models.find_taps(student, input_shape=(3, 32, 32)) == taps
    distil_one_step(student, student.forward_features, layout)


@pytest.mark.integration
def test_transformers_vit_from_a_config_distils_by_aliases() -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    student = transformers.ViTForImageClassification(config)
    assert models.find_taps(student, input_shape=(3, 32, 32)) == Taps(
        {"path": "vit.layernorm", **TOKENS, "prefix_tokens": 1}, "classifier")
    distil_one_step(student, lambda x: student.vit(x).last_hidden_state, tokens_to_map(1))


@pytest.mark.integration
def test_timm_vit_default_taps_drop_the_class_token() -> None:
    taps = models.default_taps("timm:vit_small_patch16_224")
    assert taps == Taps({"path": "norm", **TOKENS, "prefix_tokens": 1}, "head")
    assert models.input_size("timm:vit_small_patch16_224") == (3, 224, 224)
    with torch.device("meta"):
        vit = timm.create_model("vit_small_patch16_224")
    with FeatureTaps(vit, {"feature": Tap.parse(taps.feature)}) as hooked:
        vit(torch.zeros(2, 3, 224, 224, device="meta"))
        assert hooked["feature"].shape == (2, 384, 14, 14)  # 197 tokens = class token + a 14x14 grid
    assert models.default_taps("timm:vit_small_patch14_reg4_dinov2").feature["prefix_tokens"] == 5  # + 4 registers
