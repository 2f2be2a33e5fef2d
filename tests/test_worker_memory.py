"""Tests for trainer.data.worker_memory: loader workers reset glibc's heap settings."""

from __future__ import annotations

import platform

import pytest

from trainer.config import LoaderConfig
from trainer.data import loader as loader_module
from trainer.data.loader import create_loader, init_worker
from trainer.data.worker_memory import bound_worker_heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_bound_worker_heap_sets_every_option():
    assert bound_worker_heap(0) is True


def test_loaders_with_workers_use_it(monkeypatch):
    loader = create_loader(list(range(4)), LoaderConfig(workers=1), batch_size=2, pin_kwargs={})
    assert loader.worker_init_fn is init_worker
    calls = []
    monkeypatch.setattr(loader_module, "bound_worker_heap", calls.append)
    monkeypatch.setattr(loader_module, "detach_worker", lambda: None)  # not in the test process
    init_worker(3)
    assert calls == [3]
    assert create_loader(list(range(4)), LoaderConfig(workers=0), batch_size=2, pin_kwargs={}).worker_init_fn is None
