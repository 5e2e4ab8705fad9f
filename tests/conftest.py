"""Fixtures and helpers shared by several test modules."""
from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import torch
import torch.multiprocessing as mp


@pytest.fixture(scope="module")
def one_thread():
    """Many small convolutions: on a CPU shared with other jobs one thread is much faster than several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spawn_processes(worker: Callable, world: int = 2) -> dict:
    """Run `worker(rank, world, port, results)` in `world` processes on a free local port; return `results`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, port, results), nprocs=world, join=True)
    return dict(results)


def weighted_terms(out) -> dict:
    """A MethodOutput's terms times the method's own weights (what a level of weight 1 optimises)."""
    return {k: out.weights.get(k, 1.0) * v for k, v in out.terms.items()}
