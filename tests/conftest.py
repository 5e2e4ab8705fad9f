"""Fixtures and helpers shared by several test modules."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

PIL_OPEN = Image.open  # conftest is imported before any test module, so before ultralytics patches it


@pytest.fixture(scope="module")
def one_thread():
    """Many small convolutions: on a CPU shared with other jobs one thread is much faster than several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def have_fashion_mnist() -> bool:
    """Whether Fashion-MNIST is installed where the library looks for it (nothing is downloaded)."""
    from diffkd.data import fashion_mnist

    try:
        fashion_mnist.locate("test", None, download=False)
    except FileNotFoundError:
        return False
    return True


needs_fmnist = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST is not installed")


def spawn_processes(worker: Callable, world: int = 2) -> dict:
    """Run `worker(rank, world, port, results)` in `world` processes on a free local port; return `results`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, port, results), nprocs=world, join=True)
    return dict(results)


def one_line(exc: pytest.ExceptionInfo) -> str:
    """The message of a raised error, checked to be one line."""
    message = str(exc.value)
    assert "\n" not in message
    return message


def torchrun_worker(kind: str, out: Path, processes: int, batch: int) -> list[dict]:
    """Run tests/integration_workers.py (kind "hf" or "lightning") in `processes` gloo processes; each one's result."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    command = [sys.executable, str(root / "tests" / "integration_workers.py"), kind, str(out), str(batch)]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]


def ddp_matches_one_process(kind: str, out: Path) -> tuple[dict, dict]:
    """2 gloo processes x 4 images against 1 x 8 (tests/integration_workers.py): weights in sync between the
    ranks and equal to one process's, the method modules trained; (one process's result, rank 0's)."""
    one, = torchrun_worker(kind, out / "one", 1, 8)
    ranks = torchrun_worker(kind, out / "two", 2, 4)
    for part in ("student", "methods"):
        for k, v in one[part].items():
            assert torch.equal(ranks[0][part][k], ranks[1][part][k]), (part, k)  # DDP kept the processes in sync
            assert torch.allclose(ranks[0][part][k], v, atol=1e-6), (part, k)
    assert any(not torch.equal(one["methods"][k], v) for k, v in one["initial"].items())
    return one, ranks[0]


def record_progress(monkeypatch) -> list[tuple[float, int]]:
    """Every training step's progress as the weighting receives it ((fractional epoch, epochs); a tensor epoch read
    as a float), in order."""
    from diffkd.weighting import LossWeights

    heard: list[tuple[float, int]] = []
    original = LossWeights.forward

    def spy(self, outputs, task_loss, progress=None):
        if self.training:
            heard.append((float(progress[0]), progress[1]) if progress is not None else None)
        return original(self, outputs, task_loss, progress)

    monkeypatch.setattr(LossWeights, "forward", spy)
    return heard


def weighted_terms(method, out, epoch: float | None = None) -> dict:
    """A MethodOutput's terms times the method's own weights and, at `epoch`, their schedules (what a level of
    weight 1 optimises)."""
    def scheduled(term):
        schedule = method.schedules.get(term)
        return 1.0 if schedule is None or epoch is None else schedule(epoch)

    return {k: method.term_weights.get(k, 1.0) * scheduled(k) * v for k, v in out.terms.items()}


@pytest.fixture(autouse=True, scope="module")
def _pil_as_installed():
    """Importing ultralytics (test_ultralytics does so when collected) replaces PIL.Image.open process-wide with
    a lazy HEIF loader that tries to pip-install pi-heif on the first file PIL cannot read; every module runs
    with PIL's own opener, so the tests of unreadable images see PIL's error whatever was imported before."""
    from PIL import Image

    Image.open = PIL_OPEN
    yield
