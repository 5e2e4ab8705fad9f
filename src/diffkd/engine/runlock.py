"""One run at a time per run directory: a second process on the same output.dir is refused, not mixed in.

The lock is a small file next to the directory, `.<dir name>.lock`, so moving the directory aside
(--force, or the restart of a run without a checkpoint) never moves or drops it. It records the
holder's pid, host and start time. A lock left by a process that was killed is stale: on the same host
its pid is no longer running (or now belongs to another process, told by the process's start time
where /proc has it), and the next run replaces it. A lock from another host, or one that
cannot be read, cannot be judged from here, so the run is refused with the path to delete.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import RunDirError

log = logging.getLogger("diffkd")


def lock_path(run_dir: Path) -> Path:
    """Where the lock of run_dir lives: `.<name>.lock` beside it."""
    run_dir = run_dir.resolve()
    return run_dir.with_name(f".{run_dir.name}.lock")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _running(record: dict) -> bool:
    """Whether the lock's holder still runs on this host: its pid is alive and, where both start times are
    known, is the same process (not a later one that was given the same pid)."""
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    now = _start_time(record["pid"])
    return record.get("start") is None or now is None or now == record["start"]


def _holder(lock: Path) -> dict | None:
    """The lock's record, or None if it is not one this module wrote."""
    try:
        record = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) or not isinstance(record.get("host"), str):
        return None
    return record


def is_stale(lock: Path) -> bool:
    """A lock whose holder was on this host and no longer runs."""
    record = _holder(lock)
    return record is not None and record["host"] == socket.gethostname() and not _running(record)


def check_unlocked(run_dir: Path) -> None:
    """Refuse a run directory that another live run holds (touches nothing; every process may call this)."""
    lock = lock_path(run_dir)
    if not lock.exists() or is_stale(lock):
        return
    record = _holder(lock)
    if record is None:
        raise RunDirError(
            f"run directory {run_dir} has a lock file that cannot be read ({lock}); if no run is using the "
            "directory, delete that file and rerun"
        )
    if record["pid"] == os.getpid() and record["host"] == socket.gethostname():
        raise RunDirError(f"run directory {run_dir} is already in use by a run of this process; give each run its own output.dir")
    raise RunDirError(
        f"run directory {run_dir} is in use by process {record['pid']} on {record['host']} since "
        f"{record.get('started', '?')}; wait for that run to end or choose another output.dir (if no run is "
        f"using it, delete {lock})"
    )


class RunLock:
    """The lock of one run directory, taken by the process that writes it (rank 0 under DDP)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self.held = run_dir, lock_path(run_dir), False

    def acquire(self) -> None:
        """Take the lock, replacing a stale one; refuse if a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "start": _start_time(os.getpid()), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_unlocked(self.run_dir)  # raises unless the lock is stale
                self.path.unlink(missing_ok=True)
                log.info("removed the stale lock %s of a run that is no longer running", self.path)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self.held = True
            return
        check_unlocked(self.run_dir)  # another process took it in between: say who
        raise RunDirError(f"could not take the lock {self.path} of run directory {self.run_dir}; rerun")

    def release(self) -> None:
        """Drop the lock if this process still holds it."""
        if self.held:
            record = _holder(self.path)
            if record is not None and record["pid"] == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
