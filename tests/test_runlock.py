"""One run at a time per run directory: a live holder is refused (even with --force), a stale lock is replaced."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffkd.engine import RunDirError, run
from diffkd.engine.runlock import RunLock, _start_time, lock_path
from conftest import needs_fmnist
from test_engine import Stop, tiny

SMALL = ("train.epochs=1", "data.limit_train=64")


def write_lock(run_dir: Path, **record) -> Path:
    lock = lock_path(run_dir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "started": "2026-12-01 10:00:00", **record}))
    return lock


def test_the_lock_lives_beside_the_directory_and_is_released_by_its_holder_only(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "runs" / "a")
    assert lock.path == (tmp_path / "runs" / ".a.lock").resolve()
    lock.acquire()
    record = json.loads(lock.path.read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["start"] == _start_time(os.getpid())
    with pytest.raises(RunDirError, match="already in use by a run of this process"):
        RunLock(tmp_path / "runs" / "a").acquire()  # a second run of this process on the same directory
    lock.release()
    assert not lock.path.exists()
    lock.release()  # releasing twice is harmless


@pytest.mark.integration
@needs_fmnist
def test_a_directory_held_by_a_live_run_is_refused_even_with_force_and_untouched(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, *SMALL)
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("task: classification\n")  # the other run's first file
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = write_lock(run_dir, pid=other.pid, start=_start_time(other.pid))
        for force in (False, True):
            with pytest.raises(RunDirError) as err:
                run(cfg, mode="train", force=force)
            assert str(err.value) == (
                f"run directory {run_dir} is in use by process {other.pid} on {socket.gethostname()} since "
                f"2026-12-01 10:00:00; wait for that run to end or choose another output.dir (if no run is using "
                f"it, delete {lock})"
            )
        assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run"]  # nothing moved aside
        assert [p.name for p in run_dir.iterdir()] == ["config.yaml"] and lock.exists()
    finally:
        other.kill()
        other.wait()
    result = run(cfg, mode="train")  # the holder is gone: its lock is stale and replaced
    assert [r["epoch"] for r in result.history] == [1] and not lock.exists()


@pytest.mark.integration
@needs_fmnist
def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path: Path) -> None:
    """Our own pid with another start time: the lock of an earlier process that had this pid (a restarted
    container, say), not of a run in this one."""
    cfg = tiny(tmp_path, *SMALL)
    lock = write_lock(Path(cfg.output.dir), pid=os.getpid(), start=_start_time(os.getpid()) - 1)
    assert [r["epoch"] for r in run(cfg, mode="train").history] == [1] and not lock.exists()


@needs_fmnist
@pytest.mark.parametrize("content,message", [
    ("not json", "has a lock file that cannot be read"),
    (json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}), "is in use by process 1 on elsewhere since then"),
])
def test_a_lock_that_cannot_be_judged_here_is_refused_with_the_file_to_delete(tmp_path: Path, content: str,
                                                                            message: str) -> None:
    cfg = tiny(tmp_path, *SMALL)
    lock = lock_path(Path(cfg.output.dir))
    lock.write_text(content)
    with pytest.raises(RunDirError, match=message) as err:
        run(cfg, mode="train")
    assert str(lock) in str(err.value) and lock.read_text() == content and not Path(cfg.output.dir).exists()


@pytest.mark.integration
@needs_fmnist
def test_the_lock_is_held_while_training_and_released_when_the_run_fails(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, *SMALL)
    lock = lock_path(Path(cfg.output.dir))
    seen = []

    def hook(record) -> None:
        seen.append(json.loads(lock.read_text())["pid"])
        raise Stop

    with pytest.raises(Stop):
        run(cfg, mode="train", on_epoch_end=hook)
    assert seen == [os.getpid()] and not lock.exists()


def test_a_lock_that_keeps_coming_back_is_not_taken_silently(tmp_path: Path, monkeypatch) -> None:
    """If the lock file reappears on every try (other processes racing for it), acquire refuses, never
    returning without the lock."""
    lock = RunLock(tmp_path / "run")
    real_open = os.open

    def contested(path, *args, **kwargs):
        if Path(path) == lock.path:
            raise FileExistsError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", contested)
    with pytest.raises(RunDirError, match=r"could not take the lock .*\.run\.lock of run directory"):
        lock.acquire()
    assert not lock.held
