"""Tests for trainer.data.worker_signals: loader workers and their fork server outlive SIGINT/SIGTERM."""

from __future__ import annotations

import multiprocessing.forkserver
import os
import signal
import time
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from trainer.data.loader import init_worker, worker_context


class Pids(Dataset):
    """Each item is the pid of the process that made it."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> int:
        time.sleep(0.05)
        return os.getpid()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pid: int, timeout_s: float = 10) -> bool:
    end = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not alive(pid)


def test_sigint_and_sigterm_reach_neither_the_workers_nor_their_fork_server():
    """What a terminal's Ctrl-C or torchrun's killpg sends: the epoch goes on from the same worker."""
    loader = DataLoader(
        Pids(), batch_size=1, num_workers=1, multiprocessing_context=worker_context(), worker_init_fn=init_worker
    )
    batches = iter(loader)
    worker = int(next(batches))
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    assert worker != os.getpid() and server and alive(server)
    for pid in (worker, server):
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    assert alive(worker) and alive(server)
    assert [int(b) for b in batches] == [worker] * 5
    # The server still forks workers for the next loader.
    again = DataLoader(
        Pids(), batch_size=6, num_workers=1, multiprocessing_context=worker_context(), worker_init_fn=init_worker
    )
    pids = next(iter(again)).tolist()
    assert len(set(pids)) == 1 and pids[0] != worker


def test_a_worker_dies_with_its_fork_server():
    """torch's SIGTERM no longer ends a stuck worker; the fork server's exit (the trainer's) does."""
    loader = DataLoader(
        Pids(),
        batch_size=1,
        num_workers=1,
        multiprocessing_context=worker_context(),
        worker_init_fn=init_worker,
        persistent_workers=True,
    )
    batches = iter(loader)
    worker = int(next(batches))
    os.kill(multiprocessing.forkserver._forkserver._forkserver_pid, signal.SIGKILL)
    assert wait_gone(worker)
    del batches, loader
    worker_context()  # a fresh server for the tests that follow
