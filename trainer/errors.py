"""The errors a user can cause and fix; the CLI prints them as one line, never a traceback.

They live here, apart from the modules that raise them, so that the CLI can catch them
without importing torch, timm or accelerate: a config error answers in about a second.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem, worded as one line that names the file and the key."""


class BackendError(RuntimeError):
    """The device or process group is not what the run needs; the message says the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""


class DataError(ValueError):
    """A dataset that cannot be read as configured; the message names the path and layout."""


class ModelError(ValueError):
    """An unknown model name or an unusable weights file; the message names it."""


class DependencyError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is kept."""


class DecodeError(ValueError):
    """An image that cannot be decoded; str() names the file/row and the reason.

    Attributes:
        name: File path or row id given by the caller.
        reason: Short reason, e.g. "truncated JPEG" or "empty file".
    """

    def __init__(self, name: str, reason: str | None = None) -> None:
        if reason is None:
            # NOTE: a DataLoader worker re-raises as DecodeError(<worker traceback text>), whose
            # last line is "...DecodeError: name: reason"; keep that line so the CLI still
            # prints one line naming the file rather than a wall of traceback.
            last = name.rstrip().rsplit("\n", 1)[-1]
            name, _, reason = (
                last.partition("DecodeError: ")[2].partition(": ") if "DecodeError: " in last else ("", "", last)
            )
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


USER_ERRORS = (
    BackendError,
    CheckpointError,
    ConfigError,
    DataError,
    DecodeError,
    DependencyError,
    ModelError,
    TrainingStopped,
)
