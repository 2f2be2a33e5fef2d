"""Tests for trainer.checkpoint_files: a checkpoint that cannot be loaded safely is named, never run."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint_files import allowed_globals, check_checkpoint_files, pickle_globals
from trainer.errors import CheckpointError


class Payload:
    """Unpickles as a shell command that creates `marker`: what a tampered checkpoint file holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_saved_state_imports_only_allowed_names(tmp_path):
    rng_state = {"numpy_random_seed": np.random.get_state(), "torch_manual_seed": torch.get_rng_state(), "step": 3}
    optimizer = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    for name, obj in (("random_states_0.pkl", rng_state), ("optimizer.bin", optimizer.state_dict())):
        torch.save(obj, tmp_path / name)
    check_checkpoint_files(tmp_path)  # no error


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_shell_command_is_found_in_every_pickle_protocol(protocol, tmp_path):
    data = pickle.dumps(Payload(tmp_path / "ran"), protocol=protocol)
    assert pickle_globals(data) == [f"{os.system.__module__}.system"]
    assert not set(pickle_globals(data)) <= allowed_globals()


def test_names_that_cannot_be_read_statically_are_refused():
    with pytest.raises(ValueError, match="STACK_GLOBAL"):
        pickle_globals(b"\x80\x04\x8c\x05posixK\x01\x93.")  # a name that is not a pushed string
    with pytest.raises(ValueError, match="EXT1"):
        pickle_globals(b"\x80\x02\x82\x01.")  # a copyreg extension code
    with pytest.raises(ValueError):
        pickle_globals(pickle.dumps({"a": 1})[:-3])  # cut short


@pytest.mark.parametrize("wrap", ["bare pickle", "torch.save archive"])
@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_tampered_file_is_named_and_never_run(name, wrap, tmp_path):
    marker = tmp_path / "ran"
    target = tmp_path / "ckpt" / name
    target.parent.mkdir()
    if wrap == "bare pickle":
        target.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(Payload(marker), target)
    with pytest.raises(CheckpointError) as err:
        check_checkpoint_files(target.parent)
    assert str(err.value).startswith(f"{target}: ") and "refused" in str(err.value)
    assert wrap != "torch.save archive" or "posix.system" in str(err.value) or "nt.system" in str(err.value)
    assert not marker.exists()


def test_truncated_files_are_named(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"state": {0: {"exp_avg": torch.ones(64)}}}, ckpt / "optimizer.bin")
    save_file({"w": torch.ones(64)}, str(ckpt / "model.safetensors"))
    check_checkpoint_files(ckpt)
    for name in ("optimizer.bin", "model.safetensors"):
        whole = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(whole[: len(whole) // 2])
        with pytest.raises(CheckpointError, match=f"^{ckpt / name}: not a complete"):
            check_checkpoint_files(ckpt)
        (ckpt / name).write_bytes(whole)
