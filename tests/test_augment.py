"""The B2/B3 augmentations: mixup / cutmix with soft targets, soft-target loss and metrics, image policies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from diffkd.config import ConfigError, apply_overrides, config_from_dict
from diffkd.data import BatchMixer, Policies, build_dataset
from diffkd.data.imagenet import make_transform
from diffkd.data.mixing import cut_box
from diffkd.engine import run
from diffkd.tasks import build_task
from diffkd.tasks.classification import TopK

CLASSES = 10


def numbered_batch(b: int = 6, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel is their index + 1 (so a mixed pixel tells its sources), labels 0..b-1."""
    images = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, size, size).contiguous()
    return images, torch.arange(b)


# ---------------------------------------------------------------- mixup / cutmix


def test_mixup_blends_each_image_with_its_mirror_by_the_targets_lambda():
    images, labels = numbered_batch()
    torch.manual_seed(0)
    mixed, soft = BatchMixer(CLASSES, mixup=0.8)(images, labels)
    assert soft.shape == (6, CLASSES) and torch.allclose(soft.sum(1), torch.ones(6))
    lam = soft[0, labels[0]]
    assert 0 < lam < 1 and torch.allclose(soft[0, labels[-1]], 1 - lam)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0))


def test_cutmix_pastes_a_box_whose_area_matches_the_targets():
    images, labels = numbered_batch(size=16)
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, soft = BatchMixer(CLASSES, cutmix=1.0)(images, labels)
        assert torch.allclose(soft.sum(1), torch.ones(6))
        for i in range(6):
            partner = 6 - i  # pixel value of image B-1-i
            pasted = (mixed[i] == partner).float().mean()
            kept = (mixed[i] == i + 1).float().mean()
            assert torch.isclose(pasted + kept, torch.tensor(1.0))
            if partner != i + 1:
                assert torch.isclose(pasted, soft[i, labels[-1 - i]], atol=1e-6)
                assert torch.isclose(kept, soft[i, labels[i]], atol=1e-6)


def test_cut_box_stays_inside_and_covers_about_one_minus_lambda():
    torch.manual_seed(0)
    for lam in (0.1, 0.5, 0.9):
        top, bottom, left, right = cut_box(32, 32, lam)
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        assert (bottom - top) * (right - left) <= (1 - lam) * 32 * 32 + 1e-6


def test_both_on_switch_between_mixup_and_cutmix_and_follow_the_seed():
    images, labels = numbered_batch()
    mixer = BatchMixer(CLASSES, mixup=0.8, cutmix=1.0)
    kinds = set()
    for seed in range(12):
        torch.manual_seed(seed)
        mixed, soft = mixer(images, labels)
        torch.manual_seed(seed)
        again, soft_again = mixer(images, labels)
        assert torch.equal(mixed, again) and torch.equal(soft, soft_again)
        whole = torch.isin(mixed, images.unique()).all()  # cutmix only moves whole pixel values
        kinds.add("cutmix" if whole else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_mixer_is_off_by_default():
    assert not BatchMixer(CLASSES).enabled
    assert BatchMixer(CLASSES, cutmix=1.0).enabled


# ---------------------------------------------------------------- task: soft targets in loss, metrics, batches


def classification(*overrides: str):
    """A ClassificationTask for fmnist_student built from plain overrides (nothing is read from disk)."""
    return build_task(config_from_dict(apply_overrides({"model": {"name": "fmnist_student"}}, overrides)))


def test_soft_target_cross_entropy_with_label_smoothing_matches_the_formula():
    torch.manual_seed(0)
    logits, soft = torch.randn(4, CLASSES), torch.rand(4, CLASSES).softmax(1)
    smoothing = 0.1
    task = classification(f"train.label_smoothing={smoothing}")
    smoothed = soft * (1 - smoothing) + smoothing / CLASSES
    expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(task.loss(logits, soft), expected, atol=1e-6)
    hard = torch.tensor([1, 2, 3, 4])
    assert torch.allclose(task.loss(logits, hard), task.loss(logits, F.one_hot(hard, CLASSES).float()), atol=1e-6)


def test_top1_on_soft_targets_counts_the_dominant_label():
    logits = torch.eye(3, 5) * 5
    soft = torch.tensor([[0.7, 0.3, 0, 0, 0], [0.6, 0.4, 0, 0, 0], [0, 0.2, 0.8, 0, 0]])
    metric = TopK(ks=(1,))
    metric.update(logits, soft)
    assert metric.compute(lambda t: t)["top1"] == pytest.approx(200 / 3)


def test_task_mixes_training_batches_only_when_configured():
    images, labels = numbered_batch()
    same = classification().augment_batch(images, labels)
    assert same[0] is images and same[1] is labels
    torch.manual_seed(0)
    mixed, soft = classification("data.mixup=0.8").augment_batch(images, labels)
    assert soft.shape == (6, 10) and not torch.equal(mixed, images)


@pytest.mark.integration
def test_a_training_run_mixes_its_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    try:
        build_dataset("fashion_mnist", "test", limit=1)
    except (FileNotFoundError, ValueError):
        pytest.skip("Fashion-MNIST is not installed")
    calls = []
    mix = BatchMixer.__call__
    monkeypatch.setattr(BatchMixer, "__call__", lambda self, x, y: calls.append(len(x)) or mix(self, x, y))
    data = {
        "model": {"name": "fmnist_student"},
        "data": {"limit_train": 64, "limit_test": 32, "batch_size": 32, "mixup": 0.8, "cutmix": 1.0},
        "train": {"epochs": 1, "device": "cpu", "progress": False, "label_smoothing": 0.1},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
    }
    [record] = run(config_from_dict(data), mode="train").history
    assert calls == [32, 32]
    assert 0 <= record["train_top1"] <= 100 and record["train_loss"] > 0


def test_mixing_with_a_method_that_needs_hard_labels_is_refused():
    data = {
        "data": {"mixup": 0.8},
        "teacher": {"name": "fmnist_teacher"},
        "student": {"name": "fmnist_student"},
        "levels": [{"student": "@logits", "teacher": "@logits", "method": "dkd"}],
    }
    with pytest.raises(ConfigError, match="dkd"):
        build_task(config_from_dict(data))


@pytest.mark.parametrize("key", ["data.random_erasing=1.5", "data.mixup=-1", "data.cutmix=-1", "data.color_jitter=-1"])
def test_out_of_range_augmentation_values_are_config_errors(key: str):
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        config_from_dict(apply_overrides({}, [key]))


# ---------------------------------------------------------------- image policies


def noise_image(seed: int = 0, size: int = 48) -> Image.Image:
    """A random RGB picture (PIL, as ImageFolder hands it to the transform)."""
    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def transformed(policies: Policies, seed: int) -> torch.Tensor:
    """The training transform of one fixed picture under a fixed seed."""
    torch.manual_seed(seed)
    return make_transform(32, True, policies)(noise_image())


@pytest.mark.parametrize(
    "policies", [Policies(randaugment=True), Policies(color_jitter=0.4), Policies(random_erasing=1.0)], ids=str
)
def test_each_policy_changes_the_image_deterministically_under_a_seed(policies: Policies):
    plain, once, twice = transformed(Policies(), 3), transformed(policies, 3), transformed(policies, 3)
    assert once.shape == plain.shape == (3, 32, 32)
    assert torch.equal(once, twice)
    assert not torch.equal(once, plain)


def test_policies_leave_evaluation_alone():
    image = noise_image()
    strong = Policies(randaugment=True, color_jitter=0.4, random_erasing=1.0)
    assert torch.equal(make_transform(32, False, strong)(image), make_transform(32, False)(image))


def test_imagenet_train_split_uses_the_policies_and_cifar_refuses_them(tmp_path: Path):
    for split in ("train", "val"):
        (tmp_path / split / "n0").mkdir(parents=True)
        noise_image().save(tmp_path / split / "n0" / "a.png")
    policies = Policies(random_erasing=1.0)
    train = build_dataset("imagenet", "train", tmp_path, policies=policies, image_size=32)
    assert isinstance(train.transform.transforms[-1], transforms.RandomErasing)
    val = build_dataset("imagenet", "val", tmp_path, policies=policies, image_size=32)
    assert not any(isinstance(t, transforms.RandomErasing) for t in val.transform.transforms)
    with pytest.raises(ValueError, match="imagenet"):
        build_dataset("cifar100", "train", tmp_path, policies=policies)
