"""The run directory: refuse to overwrite a run, move it aside on --force, demand a checkpoint on --resume.

--force never deletes: the old directory is renamed to `<dir>.old-<YYYYmmdd-HHMMSS>` (with a numeric
suffix if that exists too), so nothing is lost silently; delete it yourself when sure.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import RunDirError

RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.csv")


def holds_run(path: Path) -> list[str]:
    """The run files present in path (empty if none or if path does not exist)."""
    return [name for name in RUN_FILES if (path / name).exists()] if path.is_dir() else []


def aside_name(path: Path) -> Path:
    """A free name `<dir>.old-<timestamp>[-N]` next to path."""
    base = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, n = base, 1
    while candidate.exists():
        candidate, n = base.with_name(f"{base.name}-{n}"), n + 1
    return candidate


def check_run_dir(path: Path, *, resume: bool, force: bool) -> None:
    """Refuse what the flags do not allow, touching nothing (every process may call this)."""
    if resume and force:
        raise RunDirError("--resume and --force contradict each other: resume a run, or move it aside and start afresh")
    if resume:
        if not (path / "last.pt").is_file():
            raise RunDirError(f"cannot resume: {path / 'last.pt'} not found (start the run without --resume)")
        return
    found = holds_run(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a directory")
    if found and not force:
        raise RunDirError(
            f"run directory {path} already holds a run ({', '.join(found)}); pass --resume to continue it, "
            f"or --force to move it aside to {path.name}.old-<time> and start afresh"
        )


def prepare_run_dir(path: Path, *, resume: bool, force: bool) -> Path | None:
    """Check, then create the directory; with --force move an existing run aside and return where it went."""
    check_run_dir(path, resume=resume, force=force)
    moved = None
    if force and holds_run(path):
        moved = aside_name(path)
        path.rename(moved)
    path.mkdir(parents=True, exist_ok=True)
    return moved


def resume_or_restart(path: Path) -> dict[str, bool]:
    """`run()` flags for batch jobs: resume (or just reread) a run with a checkpoint, else start afresh,
    moving a run that died before its first checkpoint aside."""
    return {"resume": True} if (path / "last.pt").is_file() else {"force": True}
