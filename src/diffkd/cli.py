"""The `diffkd` command: one subcommand per entry of COMMANDS, each with its own --help and example.

To add a subcommand (demo, bench, visualize), define `COMMAND = Command(...)` in its own module and
add `"name": lazy("diffkd.module")` to COMMANDS; the module is imported only when that subcommand
or `diffkd --help` needs it.

Exit status: 0 done, 1 an error the user can fix (one line on stderr), 2 a malformed command line
(argparse), 130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM. An interrupt prints no
traceback, only what was saved last; SIGTERM (what schedulers send) is handled as Ctrl-C is, and its
status is the shell's 128 + 15 so a job script can tell which signal stopped the run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from . import __version__
from .config import ConfigError

USER_ERRORS = (ConfigError, OSError, ValueError)  # plus EngineError, added where the engine is imported
# torch re-raises an error of a DataLoader worker process with the worker's whole traceback as its message.
_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\n")


@dataclass(frozen=True)
class Command:
    """A subcommand: a one-line summary for `diffkd --help`, its own help text, its arguments, its action."""

    summary: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def lazy(module: str) -> Callable[[], Command]:
    """A builder that imports `module` and returns its COMMAND."""
    return lambda: importlib.import_module(module).COMMAND


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by train and distill: the config, overrides and run-directory flags."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.05 train.epochs=3"
    )
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (same as output.dir=RUN_DIR)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (same as train.device=...)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in the run directory from its last.pt")
    group.add_argument(
        "--force",
        action="store_true",
        help="move an existing run directory aside to <dir>.old-<time> and start afresh (nothing is deleted)",
    )


def _run_mode(mode: str) -> Callable[[argparse.Namespace], int]:
    """The action of train/distill: load the config with overrides and flags, run, print the summary."""

    def action(args: argparse.Namespace) -> int:
        from .config import config_from_dict, config_to_dict, load_config
        from .engine import run

        data = config_to_dict(load_config(args.config, args.overrides))
        if args.out:  # set as given, not parsed as YAML (a path may look like a number)
            data["output"]["dir"] = args.out
        if args.device:
            data["train"]["device"] = args.device
        cfg = config_from_dict(data)
        result = run(cfg, mode=mode, resume=args.resume, force=args.force)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
            print(
                f"{mode} done: best {result.main_metric} {result.best_top1:.2f}, "
                f"final {result.main_metric} {result.final_top1:.2f}, "
                f"{result.train_seconds:.1f} s; run directory {result.run_dir}"
            )
        return 0

    return action


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR", help="a run directory or a last.pt/best.pt file")
    parser.add_argument(
        "--which", choices=("best", "last"), default="best", help="checkpoint of a run directory (default best)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--limit", type=_positive_int, help="evaluate only this many test items (evenly spaced)")
    parser.add_argument("--batch-size", type=_positive_int, help="evaluation batch size (default: the run's)")
    parser.add_argument("--data-root", help="dataset folder, if not where the run found it")


def _eval(args: argparse.Namespace) -> int:
    from .engine import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        which=args.which,
        device=args.device,
        limit=args.limit,
        batch_size=args.batch_size,
        data_root=args.data_root,
    )
    metrics = result["metrics"]
    order = [result["main_metric"], *(k for k in metrics if k != result["main_metric"])]
    shown = "  ".join(f"{k} {metrics[k]:.2f}" for k in order)
    print(f"{shown}  on {result['images']} test images ({result['checkpoint']}, epoch {result['epoch']})")
    if result["classes"] is not None:
        print(f"{len(result['classes'])} classes (as in the run): {', '.join(result['classes'])}")
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or one of its checkpoints)")
    parser.add_argument("out", nargs="?", metavar="OUT", help="output file (default RUN_DIR/student.pt)")
    parser.add_argument(
        "--which", choices=("best", "last"), default="best", help="checkpoint to export from (default best)"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (refused otherwise)")


def _export(args: argparse.Namespace) -> int:
    from .engine import export_weights

    print(f"wrote {export_weights(args.run_dir, args.out, which=args.which, overwrite=args.force)}")
    return 0


TRAIN = Command(
    "train a model with its task loss only (teachers, student-alone baselines)",
    "Train the config's `model` with the task loss only, e.g. a teacher or a student-alone baseline.\n\n"
    "example:\n  diffkd train configs/fashion_mnist/teacher.yaml train.epochs=5 --out runs/fmnist/teacher",
    _add_run_flags,
    _run_mode("train"),
)
DISTILL = Command(
    "train a student from a teacher checkpoint with the configured levels and methods",
    "Distil the config's `student` from its frozen `teacher` (teacher.checkpoint: a run directory or a\n"
    "weights file) with the configured `levels` (taps, methods, weights).\n\n"
    "example:\n  diffkd distill configs/fashion_mnist/diffkd.yaml teacher.checkpoint=runs/fmnist/teacher",
    _add_run_flags,
    _run_mode("distill"),
)
EVAL = Command(
    "test metrics of a run's model (top-1/top-5 for classification)",
    "Evaluate a run's weights (EMA if the run used it; the student of a distillation run) on the full\n"
    "test split.\n\nexample:\n  diffkd eval runs/fmnist/diffkd          # its best.pt\n"
    "  diffkd eval runs/fmnist/diffkd/last.pt",
    _eval_arguments,
    _eval,
)
EXPORT = Command(
    "write a run's student weights alone (a plain state dict)",
    "Write the student's weights (the model of a `train` run) as a plain state dict that\n"
    "`model.load_state_dict(torch.load(path, weights_only=True))` accepts into a fresh model.\n\n"
    "example:\n  diffkd export runs/fmnist/diffkd student.pt",
    _export_arguments,
    _export,
)

def _yolo(args: argparse.Namespace) -> int:
    try:
        from .integrations.ultralytics import run_cli
    except ImportError as err:  # the optional extra is missing: one line, not a traceback
        raise ValueError(str(err)) from None
    return run_cli(args.pairs)


YOLO = Command(
    "distil an Ultralytics YOLO student inside Ultralytics' trainer (detect, segment, pose, obb)",
    "Distil the student's neck maps from a YOLO teacher inside Ultralytics' own trainer. diffkd's keys:\n"
    "student, teacher, method (required: diffkd, mse, cwd, fgd, mgd, pkd), kd_weight, kd_lr_scale, kd_latent,\n"
    "teacher_layers, student_layers, method_options, resize_maps, allow_download; every other key is an Ultralytics\n"
    "train argument.\n\n"
    "example:\n  diffkd yolo student=yolo11n.yaml teacher=runs/detect/train/weights/best.pt data=my.yaml \\\n"
    "      method=diffkd epochs=100 imgsz=640",
    lambda parser: parser.add_argument("pairs", nargs="*", metavar="key=value", help="diffkd and Ultralytics arguments"),
    _yolo,
)

COMMANDS: dict[str, Callable[[], Command]] = {
    "train": lambda: TRAIN,
    "distill": lambda: DISTILL,
    "eval": lambda: EVAL,
    "export": lambda: EXPORT,
    "demo": lazy("diffkd.demo"),
    "visualize": lazy("diffkd.visualize"),
    "yolo": lambda: YOLO,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="diffkd",
        description="DiffKD: knowledge diffusion for distillation. Train teachers, distil students, evaluate, export.",
        epilog="`diffkd COMMAND --help` explains each command. "
        "Several GPUs: torchrun --nproc_per_node=N -m diffkd distill ...",
    )
    parser.add_argument("--version", action="version", version=f"diffkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, builder in COMMANDS.items():
        command = builder()
        child = sub.add_parser(
            name,
            help=command.summary,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(child)
        child.set_defaults(action=command.run, command_parser=child)
    return parser


@contextlib.contextmanager
def _progress_logs() -> Iterator[None]:
    """While a command runs, print the engine's INFO lines (epoch summaries) on stderr; other loggers untouched."""
    logger = logging.getLogger("diffkd")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _sigterm_as_interrupt(received: list[int]) -> Iterator[None]:
    """While a command runs, SIGTERM raises KeyboardInterrupt as Ctrl-C does (noted in `received`), so the
    run stops the same clean way; a second SIGTERM gets the previous handler (by default: terminate at once)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        signal.signal(signal.SIGTERM, previous)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _working_directory_importable() -> None:
    """Put the working directory first on sys.path, as `python -m diffkd` does, so that a model given as an
    import path (`mypkg.nets:small_cnn`) is found from the folder the command runs in."""
    if not any(p in ("", ".", os.getcwd()) for p in sys.path):
        sys.path.insert(0, os.getcwd())


def one_line(err: BaseException) -> str:
    """An error's message as the user sees it: a DataLoader worker's error as the same process would give it
    (its last traceback line, without the type), not the worker's traceback."""
    text = str(err)
    if not _WORKER_ERROR.match(text):
        return text
    last = text.strip().splitlines()[-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `diffkd` command line; returns the exit status (see the module docstring)."""
    from .engine import EngineError

    _working_directory_importable()

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "overrides"):  # a positional after an option (`export RUN --which last OUT`)
        given = list(sys.argv[1:] if argv is None else argv)
        rest = given[given.index(args.command) + 1 :]
        args = argparse.Namespace(**{**vars(args), **vars(args.command_parser.parse_intermixed_args(rest))})
        extra = []
    flags = [e for e in extra if e.startswith("-")]
    if extra and hasattr(args, "overrides") and not flags:
        args.overrides += extra  # overrides given after the flags; loading names any that is not key=value
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    received: list[int] = []
    try:
        with _progress_logs(), _sigterm_as_interrupt(received):
            return args.action(args)
    except (*USER_ERRORS, EngineError) as err:
        print(f"diffkd {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: what was saved last, no traceback
        how = "interrupted by SIGTERM" if received else "interrupted"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"diffkd {args.command}: {how}" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return 128 + (signal.SIGTERM if received else signal.SIGINT)
