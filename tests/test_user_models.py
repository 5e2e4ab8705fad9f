"""The user's own model in a config: an import path, timm:, hf:<folder>; and the one-line errors of bad names."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from diffkd import models
from diffkd.cli import main
from diffkd.config import ConfigError, config_from_dict
from diffkd.engine import run
from diffkd.models import ModelNameError
from test_image_folder import folder_run, write_image_folder

NETS = '''
import torch
from torch import nn

NUMBER = 3


def small_cnn(num_classes, width=8, pretrained=False):
    """conv-BN-ReLU x2, global average pool, linear."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def flat_net(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, num_classes))


def not_a_model(num_classes):
    return {"num_classes": num_classes}


def raises(num_classes):
    raise RuntimeError("no weights for you")
'''


@pytest.fixture
def mynets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module `mynets` on sys.path (and one that fails to import, `brokennets`)."""
    (tmp_path / "mynets.py").write_text(textwrap.dedent(NETS))
    (tmp_path / "brokennets.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mynets"


def tiny_vit_config(**overrides: object) -> transformers.ViTConfig:
    """A two-layer ViT for 32x32 images with 8x8 patches (16 patch tokens + the class token)."""
    fields = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=5)
    return transformers.ViTConfig(**{**fields, **overrides})


@pytest.mark.integration
def test_import_path_student_and_timm_teacher_distil_by_aliases(tmp_path: Path, mynets: str) -> None:
    root = write_image_folder(tmp_path / "pets")
    torch.manual_seed(0)
    teacher = models.create("timm:resnet10t", num_classes=3)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    cfg = config_from_dict(folder_run(
        tmp_path, root,
        teacher={"name": "timm:resnet10t", "checkpoint": str(tmp_path / "teacher.pt")},
        student={"name": f"{mynets}:small_cnn", "options": {"width": 4}},
        levels=[{"student": "@feature", "teacher": "@feature", "method": "mse"},
                {"student": "@logits", "teacher": "@logits", "method": "kd"}],
    ))
    result = run(cfg, mode="distill")
    assert result.history[0]["loss_mse_feature"] > 0 and result.history[0]["loss_kd_logits"] > 0  # named as written
    student = torch.load(result.run_dir / "last.pt", weights_only=True)["model"]
    assert student["student.8.weight"].shape == (3, 8)  # width 4 (options) x 2, three classes from the folder


@pytest.mark.integration
def test_hf_folder_trains_and_reads_the_logits(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets")
    folder = tmp_path / "tiny-vit"
    tiny_vit_config().save_pretrained(folder)
    cfg = config_from_dict(folder_run(tmp_path, root, model={"name": f"hf:{folder}"}))
    result = run(cfg, mode="train")
    assert result.history[0]["train_loss"] > 0
    model = models.create(f"hf:{folder}", num_classes=3)
    assert isinstance(model, transformers.ViTForImageClassification) and model.config.num_labels == 3


@pytest.mark.integration
def test_hf_folder_with_weights(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    saved = transformers.ViTForImageClassification(tiny_vit_config())
    saved.save_pretrained(folder)
    loaded = models.create(f"hf:{folder}", pretrained=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.state_dict().items())
    fresh = models.create(f"hf:{folder}", num_classes=5)  # pretrained off: the config alone, fresh weights
    assert not torch.equal(fresh.classifier.weight, saved.classifier.weight)
    relabelled = models.create(f"hf:{folder}", num_classes=2, pretrained=True)  # the head is new, the body loaded
    assert relabelled.classifier.out_features == 2
    assert torch.equal(relabelled.vit.embeddings.cls_token, saved.vit.embeddings.cls_token)


def test_hf_model_by_import_path_in_the_python_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hfnets.py").write_text(textwrap.dedent('''
        import transformers

        def tiny_vit(num_classes):
            return transformers.ViTForImageClassification(transformers.ViTConfig(
                image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, num_labels=num_classes))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = models.create("hfnets:tiny_vit", num_classes=4)
    taps = models.find_taps(model, input_shape=(3, 32, 32))
    assert taps == models.Taps({"path": "vit.layernorm", "layout": "tokens", "prefix_tokens": 1}, "classifier")


BAD_NAMES = [  # what follows "model.name: model '<name>'" in the error
    ("nosuchpkg.nets:build", r": cannot import module 'nosuchpkg.nets' \(no module named 'nosuchpkg' in .+\); run from "
                             r"the folder that holds nosuchpkg, or add that folder to PYTHONPATH"),
    ("brokennets:build", r": cannot import module 'brokennets' \(ModuleNotFoundError: No module named 'not_installed_anywhere'\)"),
    ("mynets:missing", r": mynets.missing not found \(module 'mynets' has no attribute 'missing'\)"),
    ("mynets:NUMBER", r" names an object of type 'int', not a callable that builds a model"),
    ("mynets:not_a_model", r": calling it with \(num_classes=3\) returned a dict, not a torch.nn.Module"),
    ("mynets:raises", r": calling it with \(num_classes=3\) raised RuntimeError: no weights for you"),
    ("hf:{tmp}/empty", r": the folder '.*empty' holds no config.json; hf:<folder> needs a transformers config.json .*"),
    ("hf:{tmp}/nowhere", r": the folder '.*nowhere' does not exist; hf:<folder> needs a transformers config.json .*"),
]


@pytest.mark.parametrize("name, message", BAD_NAMES, ids=[n for n, _ in BAD_NAMES])
def test_bad_model_names_fail_in_one_line_before_writing(
    tmp_path: Path, mynets: str, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    root = write_image_folder(tmp_path / "pets", per_class=1)
    (tmp_path / "empty").mkdir()
    name = name.format(tmp=tmp_path)
    cfg = config_from_dict(folder_run(tmp_path, root, model={"name": name}))
    with pytest.raises(ConfigError, match=r"^model.name: model " + re.escape(repr(name)) + message + "$"):
        run(cfg, mode="train")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run.yaml").write_text(f"model: {{name: '{name}'}}\n")
    args = ["train", str(tmp_path / "run.yaml"), "data.name=image_folder", f"data.root={root}", "train.device=cpu",
            f"--out={tmp_path / 'cli-run'}"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffkd train: error: model.name: model ")
    assert not (tmp_path / "cli-run").exists()


@pytest.mark.integration
def test_feature_alias_on_a_model_without_a_pooled_feature(tmp_path: Path, mynets: str) -> None:
    root = write_image_folder(tmp_path / "pets", per_class=1)
    teacher = tmp_path / "teacher.pt"
    torch.save(models.create(f"{mynets}:small_cnn", num_classes=3).state_dict(), teacher)
    cfg = config_from_dict(folder_run(
        tmp_path, root,
        teacher={"name": f"{mynets}:small_cnn", "checkpoint": str(teacher)},
        student={"name": f"{mynets}:flat_net"},
        levels=[{"student": "@feature", "teacher": "@feature", "method": "mse"}],
    ))
    with pytest.raises(ConfigError, match=r"^levels.0.student: @feature: Sequential flattens '0' \(B, 4, 32, 32\) "
                                          r"into its classifier instead of pooling it globally"):
        run(cfg, mode="distill")
    assert not (tmp_path / "run").exists()


def test_hf_pretrained_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    tiny_vit_config().save_pretrained(folder)
    with pytest.raises(ModelNameError, match=r"pretrained is set but '.*config-only' holds no weights"):
        models.create(f"hf:{folder}", pretrained=True)


def test_import_path_gets_pretrained_only_when_set(mynets: str) -> None:
    assert isinstance(models.create(f"{mynets}:small_cnn", num_classes=2, pretrained=True), nn.Sequential)
    with pytest.raises(ModelNameError, match=r"calling it with \(num_classes=2, pretrained=True\) raised TypeError"):
        models.create(f"{mynets}:flat_net", num_classes=2, pretrained=True)


def test_segmentation_models_refuse_builder_options() -> None:
    from diffkd.tasks import build_task

    cfg = config_from_dict({"task": "segmentation", "data": {"name": "fmnist_mosaic"},
                            "model": {"name": "deeplabv3_resnet18", "options": {"width": 2}}})
    with pytest.raises(ConfigError, match=r"^options of 'deeplabv3_resnet18': segmentation models take no builder options"):
        build_task(cfg).build_model(cfg.model)


def test_classification_reads_logits_or_dot_logits() -> None:
    from diffkd.tasks.classification import logits_of

    logits = torch.randn(2, 3)
    assert logits_of(logits) is logits
    assert logits_of(transformers.modeling_outputs.ImageClassifierOutput(logits=logits)) is logits
    with pytest.raises(ValueError, match=r"^a classifier must return its logits .*; the model returned a tuple$"):
        logits_of((logits, logits))
