"""Tests for diffkd.data: readers against hand-written genuine-format files, transforms, loaders."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from diffkd.data import DatasetInfo, available, build_dataset, build_loader, dataset_info
from diffkd.data.augment import random_crop_flip
from diffkd.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Back from a normalized float image to its uint8 pixels."""
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- catalog


def test_catalog_names_and_info():
    assert available() == ["fashion_mnist", "cifar100", "imagenet", "image_folder"]
    assert dataset_info("fashion_mnist") == DatasetInfo("fashion_mnist", 10, (1, 28, 28))
    assert dataset_info("cifar100") == DatasetInfo("cifar100", 100, (3, 32, 32))
    assert dataset_info("imagenet") == DatasetInfo("imagenet", 1000, (3, 224, 224))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError) as err:
        dataset_info("cifar10")
    assert "fashion_mnist, cifar100, imagenet, image_folder" in str(err.value)
    assert "Did you mean 'cifar100'" in str(err.value)
    with pytest.raises(ValueError, match="Did you mean 'fashion_mnist'"):
        build_dataset("fashion-mnst", "train")
    with pytest.raises(ValueError, match="valid: train, test"):
        build_dataset("fashion_mnist", "val")
    with pytest.raises(ValueError, match="Did you mean 'train'"):
        build_dataset("cifar100", "trian")
    with pytest.raises(ValueError, match="always 28px"):
        build_dataset("fashion_mnist", "test", image_size=64)


# ---------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """Write an idx file by hand: big-endian magic, a big-endian uint32 per dim, uint8 data."""
    body = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)


def write_fmnist(
    folder: Path, split: str, n: int, gz: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A small genuine-format split in folder; returns the (images, labels) written."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    prefix, ext = {"train": "train", "test": "t10k"}[split], ".gz" if gz else ""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", IMAGES_MAGIC, images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", LABELS_MAGIC, labels)
    return images, labels


@pytest.mark.skipif(
    not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist_slice():
    test = build_dataset("fashion_mnist", "test", limit=2000)
    assert (
        len(test) == 2000
        and test.images.shape == (2000, 1, 28, 28)
        and test.images.dtype == torch.uint8
    )
    assert (
        torch.bincount(test.targets, minlength=10).min() > 150
    )  # evenly spaced slice: all classes
    x, y = test[0]
    assert (
        x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 10
    )
    batch = torch.stack([test[i][0] for i in range(len(test))])
    assert abs(batch.mean().item()) < 0.03 and abs(batch.std().item() - 1) < 0.03
    train = build_dataset("fashion_mnist", "train", limit=100)
    assert len(train) == 100 and train.augment and not test.augment
    assert train.targets[0] == 9  # the first training label of Fashion-MNIST (an ankle boot)
    full = build_dataset("fashion_mnist", "test")
    assert len(full) == 10_000 and torch.equal(full.images[::5], test.images)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_files_read_back_exactly(tmp_path, gz):
    images, labels = write_fmnist(tmp_path, "test", 7, gz)
    ext = ".gz" if gz else ""
    assert torch.equal(
        read_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", IMAGES_MAGIC), torch.from_numpy(images)
    )
    data = build_dataset("fashion_mnist", "test", root=tmp_path)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.targets.tolist() == labels.tolist()
    for i in range(len(data)):
        x, y = data[i]
        assert y == labels[i]
        assert torch.equal(
            unnormalize(x, (FMNIST_MEAN,), (FMNIST_STD,))[0], torch.from_numpy(images[i])
        )


def test_fashion_mnist_torchvision_layout_and_limit(tmp_path):
    images, labels = write_fmnist(tmp_path / "FashionMNIST" / "raw", "train", 10, gz=False)
    data = build_dataset("fashion_mnist", "train", root=tmp_path, augment=False, limit=4)
    assert data.targets.tolist() == labels[[0, 2, 5, 7]].tolist()
    assert torch.equal(data.images[:, 0], torch.from_numpy(images[[0, 2, 5, 7]]))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: struct.pack(">I", 2049) + b[4:], "bad idx magic number 2049"),
        (lambda b: b[:-10], "truncated"),
        (lambda b: b + b"\0", "trailing bytes"),
        (lambda b: b[:10], "truncated"),
    ],
    ids=["bad-magic", "truncated", "trailing", "short-header"],
)
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_corrupt_idx_is_a_value_error_naming_the_file(tmp_path, damage, message, gz):
    write_fmnist(tmp_path, "train", 3, gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    body = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    body = damage(body)
    path.write_bytes(gzip.compress(body) if gz else body)
    with pytest.raises(ValueError, match=message) as err:
        build_dataset("fashion_mnist", "train", root=tmp_path)
    assert str(path) in str(err.value)


def test_broken_gzip_and_mismatched_counts(tmp_path):
    write_fmnist(tmp_path, "train", 3, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="corrupt gzip") as err:
        build_dataset("fashion_mnist", "train", root=tmp_path)
    assert str(path) in str(err.value)
    write_fmnist(tmp_path, "train", 3, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", LABELS_MAGIC, np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        build_dataset("fashion_mnist", "train", root=tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("fashion_mnist", "train", root=tmp_path / "empty")
    message = str(err.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "data.root=/path/to/folder" in message and "train-images-idx3-ubyte.gz" in message
    assert "data.download=true" in message


# ---------------------------------------------------------------- CIFAR-100


def write_cifar(root: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    """Genuine-format pickles (bytes keys, N x 3072 channel-major rows) in root/cifar-100-python."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        content = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(),
            b"data": data,
        }
        (folder / split).write_bytes(pickle.dumps(content, protocol=2))
        written[split], written[f"{split}_labels"] = data, np.array(content[b"fine_labels"])
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}  # fmt: skip
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar100_reads_pixels_exactly(tmp_path):
    written = write_cifar(tmp_path)
    data = build_dataset("cifar100", "test", root=tmp_path)
    rows = written["test"]
    assert len(data) == 4 and data.classes[7] == "class7" and not data.augment
    assert data.targets.tolist() == written["test_labels"].tolist()
    # channel-major rows: pixel (c, y, x) of image i is rows[i, c * 1024 + y * 32 + x]
    assert data.images[2, 1, 5, 9] == rows[2, 1 * 1024 + 5 * 32 + 9]
    assert torch.equal(data.images, torch.from_numpy(rows).view(-1, 3, 32, 32))
    reference = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    )
    for i in range(len(data)):
        x, y = data[i]
        assert x.shape == (3, 32, 32) and y == written["test_labels"][i]
        assert torch.equal(unnormalize(x, CIFAR_MEAN, CIFAR_STD), data.images[i])
        hwc = rows[i].reshape(3, 32, 32).transpose(1, 2, 0)
        assert torch.equal(
            x, reference(Image.fromarray(hwc))
        )  # bit-identical to torchvision's pipeline
    train = build_dataset("cifar100", "train", root=tmp_path / "cifar-100-python", limit=3)
    assert train.augment and train.targets.tolist() == written["train_labels"][[0, 2, 4]].tolist()


def python2_pickle(content: dict[bytes, object]) -> bytes:
    """Protocol-2 opcodes as Python 2 wrote CIFAR: str as BINSTRING, arrays via _reconstruct."""

    def string(b: bytes) -> bytes:
        return b"T" + struct.pack("<I", len(b)) + b

    def value(v) -> bytes:
        if isinstance(v, bytes):
            return string(v)
        if isinstance(v, list):
            return b"](" + b"".join(b"J" + struct.pack("<i", x) for x in v) + b"e"
        n, d = v.shape
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
            + string(b"b") + b"\x87R"
            + b"(K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", d) + b"\x86"
            + b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
            + b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            + b"\x89" + string(v.tobytes()) + b"tb"
        )  # fmt: skip

    return b"\x80\x02}(" + b"".join(string(k) + value(v) for k, v in content.items()) + b"u."


def test_cifar100_reads_a_python2_pickle(tmp_path):
    written = write_cifar(tmp_path)
    rows, labels = written["train"][:2], written["train_labels"][:2].tolist()
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(
        python2_pickle(
            {b"batch_label": b"training batch 1 of 1", b"fine_labels": labels, b"data": rows}
        )
    )
    data = build_dataset("cifar100", "train", root=tmp_path, augment=False)
    assert data.targets.tolist() == labels
    assert torch.equal(data.images, torch.from_numpy(rows).view(2, 3, 32, 32))


def test_cifar100_corrupt_or_hostile_pickle_is_a_value_error(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="not a valid CIFAR-100 pickle") as err:
        build_dataset("cifar100", "train", root=tmp_path)
    assert str(path) in str(err.value)

    class Hostile:
        def __reduce__(self):
            return (print, ("this must never run",))

    path.write_bytes(pickle.dumps({b"data": Hostile()}, protocol=2))
    with pytest.raises(ValueError, match=r"refusing to load global .*builtin.*\.print"):
        build_dataset("cifar100", "train", root=tmp_path)
    path.write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, protocol=2)
    )
    with pytest.raises(ValueError, match="N x 3072 uint8"):
        build_dataset("cifar100", "train", root=tmp_path)


def test_missing_cifar100_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("cifar100", "train", root=tmp_path)
    assert "data.download=true" in str(err.value) and "cifar-100-python" in str(err.value)


# ---------------------------------------------------------------- ImageNet layout


def write_imagenet(root: Path) -> None:
    """Two classes per split, tiny JPEG and PNG files of different sizes."""
    rng = np.random.default_rng(2)
    for split, per_class in (("train", 3), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(
                    root / split / wnid / f"img{i}.{'JPEG' if i % 2 else 'png'}"
                )


def test_imagenet_folders(tmp_path):
    write_imagenet(tmp_path)
    train = build_dataset("imagenet", "train", root=tmp_path, image_size=16)
    assert train.classes == ["n01440764", "n01443537"] and train.targets == [0, 0, 0, 1, 1, 1]
    x, y = train[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    val = build_dataset("imagenet", "val", root=tmp_path, image_size=16)
    test = build_dataset("imagenet", "test", root=tmp_path, image_size=16)
    assert val.targets == test.targets == [0, 0, 1, 1]
    assert torch.equal(val[3][0], val[3][0])  # eval transform is deterministic
    assert val[3][0].shape == (3, 16, 16)
    some = build_dataset("imagenet", "train", root=tmp_path, image_size=16, limit=2)
    assert some.targets == [0, 1] and len(some) == 2  # the limit keeps both classes
    torch.manual_seed(5)
    first = train[0][0]
    torch.manual_seed(5)
    assert torch.equal(first, train[0][0])


def test_missing_imagenet_explains_the_layout(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("imagenet", "val", root=tmp_path)
    message = str(err.value)
    assert "<root>/val/<wnid>/*.JPEG" in message and "one folder per class" in message


# ---------------------------------------------------------------- augmentation and loading


def candidates(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop (zero padding) and flip an augmentation may produce from one CxHxW image."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    crops = [
        padded[:, dy : dy + h, dx : dx + w]
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
    ]
    return crops + [crop.flip(-1) for crop in crops]


def test_random_crop_flip_covers_exactly_the_valid_crops():
    image = torch.randint(1, 256, (3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(image.expand(400, 3, 8, 8), 2, torch.Generator().manual_seed(0))
    options = candidates(image, 2)
    seen = {next(k for k, c in enumerate(options) if torch.equal(c, o)) for o in out}
    assert seen == set(range(len(options)))  # each output is a valid crop, and all 50 occur


def test_augmentation_is_deterministic_under_manual_seed(tmp_path):
    write_fmnist(tmp_path, "train", 16, gz=True)
    data = build_dataset("fashion_mnist", "train", root=tmp_path)
    torch.manual_seed(3)
    first = [data[i][0] for i in range(16)] + [x for x, _ in data.__getitems__(list(range(16)))]
    torch.manual_seed(3)
    second = [data[i][0] for i in range(16)] + [x for x, _ in data.__getitems__(list(range(16)))]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(
        torch.equal(a, b) for a, b in zip(first[:16], [data[i][0] for i in range(16)], strict=True)
    )
    pixels = [unnormalize(x, (FMNIST_MEAN,), (FMNIST_STD,)) for x in first[16:]]
    assert all(
        any(torch.equal(p, c) for c in candidates(data.images[i], 2)) for i, p in enumerate(pixels)
    )


def test_build_loader_is_seeded(tmp_path):
    write_fmnist(tmp_path, "train", 20, gz=False)
    data = build_dataset("fashion_mnist", "train", root=tmp_path, augment=False)

    def order(loader):
        return [y.tolist() for _, y in loader]

    a, b = (
        order(build_loader(data, 8, train=True, seed=1)),
        order(build_loader(data, 8, train=True, seed=1)),
    )
    assert a == b and len(a) == 2  # drop_last when training
    assert a != order(build_loader(data, 8, train=True, seed=2))
    test = build_loader(data, 8, train=False)
    assert sum(order(test), []) == data.targets.tolist()  # in order, last partial batch kept
    x, y = next(iter(test))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64


def test_build_loader_workers_replay_augmentation(tmp_path):
    write_fmnist(tmp_path, "train", 12, gz=False)
    data = build_dataset("fashion_mnist", "train", root=tmp_path)
    runs = []
    for _ in range(2):
        loader = build_loader(data, 4, train=True, workers=1, seed=7)
        assert loader.persistent_workers
        runs.append([x for x, _ in loader])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_with_indices_gives_each_item_its_index_and_keeps_batched_augmentation(tmp_path):
    from diffkd.data import IndexedCollate, WithIndices

    write_fmnist(tmp_path, "train", 12, gz=False)
    data = build_dataset("fashion_mnist", "train", root=tmp_path)
    plain, indexed = (build_loader(d, 4, train=True, seed=5) for d in (data, WithIndices(data)))
    indexed.collate_fn = IndexedCollate(indexed.collate_fn)
    torch.manual_seed(0)
    expected = list(plain)
    torch.manual_seed(0)
    got = list(indexed)
    assert len(got) == len(expected) == 3
    for (x, y), ((xi, yi), index) in zip(expected, got, strict=True):
        assert torch.equal(x, xi) and torch.equal(y, yi)  # same order and the same augmentation draws
        assert index.dtype == torch.int64 and torch.equal(data.targets[index], y)
    assert sorted(torch.cat([index for _, index in got]).tolist()) == list(range(12))
    assert WithIndices(data)[3][1] == 3 and len(WithIndices(data)) == 12
