"""The run directory: refuse to overwrite a run or a user's files, restart a run that has no checkpoint yet,
move things aside on --force, and remove the temporaries of writes that were killed.

Nothing that may matter is ever deleted: --force renames the old directory to `<dir>.old-<YYYYmmdd-HHMMSS>`
(with a numeric suffix if that exists too); delete it yourself when sure. A run directory without a
checkpoint (a run that crashed, was killed or hit a NaN before its first epoch ended) holds nothing to
lose, so the same command starts it again: its lone config.yaml is rewritten in place, and any other
output of the failed attempt (its TensorBoard log) is moved aside with the directory, so old and new
curves never mix. The only files removed are the stale `.<name>.XXXXXXXX.tmp` files of atomic writes (and
a killed run's stale lock beside the directory: see runlock.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..atomic import is_temporary_of
from .errors import RunDirError

log = logging.getLogger("diffkd")

RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.csv")
CHECKPOINTS = ("last.pt", "best.pt")
TASK_FILES = ("classes.json",)  # what tasks keep in a run (Task.record_run): an image folder's class names
IDENTITY_FILE = "identity.json"  # what the run trains on: teacher weights digest, training set (identity.py)
OUTPUTS = frozenset({*RUN_FILES, *TASK_FILES, IDENTITY_FILE, "curves.png", "tensorboard"})  # all a run writes there
ATOMIC_OUTPUTS = ("last.pt", "best.pt", "metrics.csv", "curves.png", IDENTITY_FILE, *TASK_FILES)  # via a temporary


def holds_run(path: Path) -> list[str]:
    """The run files present in path (empty if none or if path does not exist)."""
    return [name for name in RUN_FILES if (path / name).exists()] if path.is_dir() else []


def stale_temporaries(path: Path) -> list[Path]:
    """The temporaries that killed atomic writes of this run's files left in path (and nothing else)."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if any(is_temporary_of(p.name, name) for name in ATOMIC_OUTPUTS))


def foreign_entries(path: Path) -> list[str]:
    """The names in path that a run does not write: a user's files, another tool's folders."""
    temporaries = {p.name for p in stale_temporaries(path)}
    return sorted(p.name for p in path.iterdir() if p.name not in OUTPUTS and p.name not in temporaries)


def aside_name(path: Path) -> Path:
    """A free name `<dir>.old-<timestamp>[-N]` next to path."""
    base = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, n = base, 1
    while candidate.exists():
        candidate, n = base.with_name(f"{base.name}-{n}"), n + 1
    return candidate


def check_run_dir(path: Path, *, resume: bool, force: bool) -> bool:
    """Refuse what the flags do not allow, touching nothing (every process may call this); returns whether
    to resume: False for --resume where there is no last.pt, as nothing is lost by starting afresh there."""
    if resume and force:
        raise RunDirError("--resume and --force contradict each other: resume a run, or move it aside and start afresh")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a directory")
    if resume and (path / "last.pt").is_file():
        return True
    if force or not path.is_dir():
        return False
    if any((path / name).exists() for name in CHECKPOINTS):
        flags = "pass --resume to continue it, or --force" if (path / "last.pt").exists() else "pass --force"
        raise RunDirError(
            f"run directory {path} already holds a run ({', '.join(holds_run(path))}); {flags} to move it aside "
            f"to {path.name}.old-<time> and start afresh"
        )
    found = foreign_entries(path)
    if not (path / "config.yaml").is_file():  # not a run's directory: every file in it is someone else's
        found = sorted(found + [name for name in OUTPUTS if (path / name).exists()])
    if found:
        shown = ", ".join(found[:5]) + (f", ... ({len(found)} in all)" if len(found) > 5 else "")
        raise RunDirError(
            f"output.dir {path} holds files this run did not write ({shown}); choose an empty or new folder, "
            f"or pass --force to move it aside to {path.name}.old-<time> and start afresh"
        )
    return False


def prepare_run_dir(path: Path, *, resume: bool, force: bool) -> Path | None:
    """Check, remove stale temporaries, move aside what a fresh start must not mix with (all of it on
    --force), then create the directory; returns where the old contents went, if moved. Rank 0 only."""
    resume = check_run_dir(path, resume=resume, force=force)
    stale = stale_temporaries(path)
    if stale:
        size = sum(p.stat().st_size for p in stale)
        for tmp in stale:
            tmp.unlink()
        log.info("removed %d stale temporary file(s) (%.1f MB) of interrupted writes from %s",
                 len(stale), size / 1e6, path)
    moved = None
    if not resume and path.is_dir() and any(p.name != "config.yaml" for p in path.iterdir()):
        moved = aside_name(path)
        path.rename(moved)
        what = "--force: moved the previous contents of" if force else "moved the failed attempt's outputs in"
        log.warning("%s %s aside to %s", what, path, moved)
    path.mkdir(parents=True, exist_ok=True)
    return moved


def resume_or_restart(path: Path) -> dict[str, bool]:
    """`run()` flags for batch jobs: resume (or just reread) a run with a checkpoint, else start it (a run that
    died before its first checkpoint is restarted by the plain command)."""
    return {"resume": True} if (path / "last.pt").is_file() else {}
