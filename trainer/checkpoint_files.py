"""A checkpoint's files checked before anything in them is loaded: whole, and never code.

Accelerate's `load_state` unpickles several files of a checkpoint (optimizer.bin, scaler.pt,
random_states_<rank>.pkl, custom_checkpoint_<i>.pkl, ...), and how safely depends on the
versions. NOTE: read in huggingface/accelerate, src/accelerate/checkpointing.py and
src/accelerate/utils/other.py:
- 1.0: every one through plain `torch.load`, whose default is weights-only only from torch 2.6;
- from 1.1 (random states from 1.2): through `accelerate.utils.load`, which asks for
  weights-only only where torch >= 2.4 (`is_weights_only_available`): on torch 2.1 and 2.3,
  two of torch_mlu's lines, every file is fully unpickled;
- up to 1.16 at least: `custom_checkpoint_<i>.pkl` (a stateful step hook, `trainer.loop.step`)
  with `weights_only=False` whatever the versions, and a random-states file that fails to
  load is skipped with an info line ("Could not load random states"): the run would go on
  with other random numbers, unsaid.
So every pickle of a checkpoint is read here first without running it: its opcodes are
walked (`pickletools.genops`), and every global it would import must be one that torch's
weights-only unpickler allows, or one of the numpy names a saved RNG state needs. Anything
else (`posix.system`, ...) is refused with the file and the name. A truncated file, or one
that is not a torch archive at all, is named the same way; safetensors files are checked to
be whole (their header must cover the file).
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from trainer.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")
# What numpy's RNG state (np.random.get_state(), in Accelerate's random_states_<rank>.pkl) pickles to.
RNG_STATE_GLOBALS = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
        "_codecs.encode",
    }
)
# Used only where torch has no `_get_allowed_globals` (it has since 1.13).
CORE_TENSOR_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
    }
)
STRING_OPS = frozenset(
    {
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "UNICODE",
        "SHORT_BINSTRING",
        "BINSTRING",
        "STRING",
    }
)
MEMO_PUT_OPS = frozenset({"BINPUT", "LONG_BINPUT", "PUT"})
MEMO_GET_OPS = frozenset({"BINGET", "LONG_BINGET", "GET"})


def allowed_globals() -> frozenset[str]:
    """The names a checkpoint's pickles may import: torch's weights-only allowlist, plus numpy's RNG state."""
    import torch._weights_only_unpickler as weights_only

    listed = getattr(weights_only, "_get_allowed_globals", None)
    return frozenset(listed() if listed else CORE_TENSOR_GLOBALS) | RNG_STATE_GLOBALS


def check_checkpoint_files(path: Path) -> None:
    """Raise a `CheckpointError` naming the first file of checkpoint `path` that is not whole or would run code."""
    allowed = allowed_globals()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix in PICKLE_SUFFIXES:
            problem = pickle_problem(file, allowed)
        elif file.suffix == ".safetensors":
            problem = safetensors_problem(file)
        else:
            continue
        if problem:
            raise CheckpointError(f"{file}: {problem}")


def safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be read whole (truncated, not safetensors), or None."""
    try:
        with safe_open(str(file), framework="pt"):
            return None
    except (SafetensorError, OSError) as err:
        return f"not a complete safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})"


def pickle_problem(file: Path, allowed: frozenset[str]) -> str | None:
    """Why a torch-saved file may not be unpickled (not whole, or it would import more than data), or None."""
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
            if any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in names):
                return "a TorchScript archive, not saved state; refused"
            records = [name for name in names if name.rsplit("/", 1)[-1] == "data.pkl"]
            if len(records) != 1:
                return f"not a torch.save archive ({len(records)} data.pkl records); refused"
            data = archive.read(records[0])
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        # NOTE: torch.save has written zip archives since torch 1.6, and so Accelerate's
        # files; anything else is truncated, or was replaced (a bare pickle runs on load).
        bare = unsafe_imports(file.read_bytes(), allowed)
        if bare and "would import" in bare:
            return bare
        return f"not a complete torch.save archive (truncated or replaced: {err}); refused"
    return unsafe_imports(data, allowed)


def unsafe_imports(data: bytes, allowed: frozenset[str]) -> str | None:
    """Why pickle `data` may not be unpickled (it imports more than data, or is not whole), or None."""
    try:
        unsafe = sorted(set(pickle_globals(data)) - allowed)
    except ValueError as err:
        return f"its pickle is not whole or not valid ({err}); refused"
    if unsafe:
        names = ", ".join(unsafe)
        return f"it would import {names} when loaded, which saved weights and state never do (tampered?); refused"
    return None


def pickle_globals(data: bytes) -> list[str]:
    """Every global (module.name) a pickle imports, read from its opcodes without running any.

    Raises:
        ValueError: for a pickle cut short or malformed, or one whose imported names
            cannot be read statically (STACK_GLOBAL on computed strings, copyreg extensions).
    """
    found: list[str] = []
    memo: dict[int, str | None] = {}
    recent: list[str | None] = []  # the values of the last pushes: a string, or None for anything else
    next_memo = 0
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append(f"{module}.{attr}")
        elif name == "STACK_GLOBAL":
            if len(recent) < 2 or recent[-1] is None or recent[-2] is None:
                raise ValueError("STACK_GLOBAL on names that are not plain strings")
            found.append(f"{recent[-2]}.{recent[-1]}")
        elif name.startswith("EXT"):
            raise ValueError(f"{name}: a copyreg extension code")
        if name in STRING_OPS:
            recent.append(str(arg))
        elif name in MEMO_GET_OPS:
            recent.append(memo.get(arg))
        elif name in MEMO_PUT_OPS or name == "MEMOIZE":
            key = arg if name in MEMO_PUT_OPS else next_memo
            memo[key] = recent[-1] if recent else None
            next_memo = max(next_memo, key + 1)
            continue  # a memo store pushes nothing
        else:
            recent.append(None)
        del recent[:-2]
    return found
