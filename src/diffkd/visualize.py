"""`diffkd visualize RUN_DIR`: what the denoising does to the features (the paper's Fig. 2 and 5).

For a few test images: the student feature (projected to the latent space), the denoised student
feature and the teacher feature (latent), each shown as the paper's attention map, plus gamma; and
gamma over training from the run's metrics.csv.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from torch import Tensor

from .cli import Command


def attention_map(x: Tensor, tau: float = 0.5) -> Tensor:
    """Mean over channels, then H*W*softmax(X'/tau) over space: (B,C,H,W) -> (B,H,W), mean 1."""
    if x.dim() != 4:
        raise ValueError(f"attention_map expects (B,C,H,W) features, got {tuple(x.shape)}")
    b, _, h, w = x.shape
    pooled = x.float().mean(dim=1).reshape(b, h * w)
    return (h * w * torch.softmax(pooled / tau, dim=1)).view(b, h, w)


@torch.no_grad()
def level_features(distiller, level: str, images: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Student latent z_s, denoised z_s_hat, teacher latent z_t and gamma of one DiffKD level (eval mode)."""
    module = distiller.methods[level].diffkd
    distiller.eval()
    distiller(images)
    student, teacher = distiller.student_taps[level], distiller.teacher_taps[level]
    student, teacher = module.check_inputs(student, teacher)
    z_s = module.project_student(student, teacher.shape[-2:])
    z_t = module.autoencoder.encoder(teacher) if module.autoencoder is not None else teacher
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    denoised, gamma = module.denoise(z_s)
    torch.random.set_rng_state(generator_state)
    return {"student": z_s, "denoised": denoised, "teacher": z_t,
            "gamma": gamma if gamma is not None else torch.ones(len(images))}


def render_grid(images: Tensor, features: dict[str, Tensor], path: Path, tau: float = 0.5,
                labels: list[str] | None = None) -> None:
    """One row per image: the input (titled with its class name when given), then the attention maps of
    student, denoised student, teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["student", "denoised", "teacher"]
    maps = {k: attention_map(features[k], tau) for k in columns}
    rows = len(images)
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2 * rows), squeeze=False)
    for i in range(rows):
        picture = images[i].float()
        picture = (picture - picture.min()) / (picture.max() - picture.min() + 1e-8)
        axes[i, 0].imshow(picture.permute(1, 2, 0).squeeze(-1).cpu(), cmap="gray")
        what = labels[i] if labels is not None else "input"
        axes[i, 0].set_title(f"{what} (gamma {features['gamma'][i]:.2f})", fontsize=8)
        for j, key in enumerate(columns, start=1):
            axes[i, j].imshow(maps[key][i].cpu(), cmap="viridis")
            axes[i, j].set_title(key, fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gamma(metrics_csv: Path, path: Path) -> list[str]:
    """Mean gamma per epoch of every DiffKD level from metrics.csv; returns the columns plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0] if rows else {}) if c.endswith("/gamma")]
    fig, ax = plt.subplots(figsize=(5, 3))
    for column in columns:
        ax.plot([int(r["epoch"]) for r in rows], [float(r[column]) for r in rows], marker="o", label=column)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean gamma (weight of the student feature)")
    ax.set_ylim(0, 1)
    if columns:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return columns


def load_run(run_dir: Path, which: str = "best", device: str = "cpu"):
    """The Distiller of a distillation run with its trained student and method modules, and its task."""
    from .config import load_config
    from .engine import find_checkpoint, load_checkpoint
    from .engine.checkpoint import load_into, saved_model_name
    from .engine.learner import DistillLearner
    from .tasks import build_task

    cfg = load_config(run_dir / "config.yaml")
    file = find_checkpoint(run_dir, which)
    ckpt = load_checkpoint(file)
    if ckpt["mode"] != "distill":
        raise ValueError(f"{run_dir} is a `{ckpt['mode']}` run; visualize needs a `diffkd distill` run")
    task = build_task(cfg)
    task.check_run(run_dir)
    distiller = DistillLearner(cfg, task, dataset_size=ckpt.get("train_items")).module
    load_into(distiller, ckpt["model"], file, saved_model_name(ckpt), "this run's modules")
    return distiller.to(device), task


def choose_level(distiller, level: str | None, where: str) -> str:
    """The DiffKD feature-map level to draw (`level`, or the first); sequence levels are skipped, said so."""
    conv = {name: m.diffkd.dims for name, m in distiller.methods.items() if hasattr(m, "diffkd") and m.diffkd.kind == "conv"}
    levels = [name for name, dims in conv.items() if dims == 2]
    sequences = [name for name, dims in conv.items() if dims == 1]
    skipped = f"; sequence levels {sequences} have no attention map to draw and are skipped" if sequences else ""
    if not levels:
        raise ValueError(f"{where} has no DiffKD level on a feature map (levels: {list(distiller.methods)}){skipped}")
    if level is None:
        level = levels[0]
    elif level not in levels:
        raise ValueError(f"no DiffKD feature-map level {level!r}; choose one of {levels}{skipped}")
    if sequences:
        print(f"skipping DiffKD sequence levels {sequences}: attention maps are drawn for (B,C,H,W) levels only")
    return level


def visualize(run_dir: Path, images: int = 4, level: str | None = None, out: Path | None = None) -> list[Path]:
    """Write features.png (attention maps) and gamma.png into the run directory (or `out`)."""
    run_dir, out = Path(run_dir), Path(out or run_dir)
    distiller, task = load_run(run_dir)
    level = choose_level(distiller, level, str(run_dir))
    test = task.build_dataset("test", limit=images)
    batch = torch.stack([test[i][0] for i in range(len(test))])
    names = task.class_names
    labels = [names[test[i][1]] for i in range(len(test))] if names is not None else None
    features = level_features(distiller, level, batch)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "features.png"]
    render_grid(batch, features, written[0], labels=labels)
    if (run_dir / "metrics.csv").exists():
        written.append(out / "gamma.png")
        plot_gamma(run_dir / "metrics.csv", written[1])
    shown = f" ({', '.join(labels)})" if labels is not None else ""
    print(f"level {level}: mean gamma {features['gamma'].mean():.3f} on {len(batch)} test images{shown}")
    return written


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `diffkd distill` run directory with a DiffKD level")
    parser.add_argument("--images", type=int, default=4, help="how many test images (rows)")
    parser.add_argument("--level", help="which DiffKD feature level (default: the first)")
    parser.add_argument("--out", help="output folder (default: the run directory)")


def _run(args: argparse.Namespace) -> int:
    for path in visualize(Path(args.run_dir), args.images, args.level, args.out and Path(args.out)):
        print(f"wrote {path}")
    return 0


COMMAND = Command(
    "attention maps of student, denoised student and teacher features, and gamma over training",
    "For a few test images, show the student feature, the denoised student feature and the teacher\n"
    "feature of a DiffKD level as the paper's attention maps (mean over channels, then\n"
    "H*W*softmax over space, tau 0.5), with gamma; and plot mean gamma per epoch from metrics.csv.\n\n"
    "example:\n  diffkd visualize runs/demo/students-20260101-120000/diffkd --images 6",
    _arguments,
    _run,
)
