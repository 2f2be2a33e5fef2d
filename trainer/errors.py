"""The errors a user can cause and fix; the CLI prints them as one line, never a traceback."""

from trainer.backend import BackendError
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.data.decode import DecodeError
from trainer.data.readers import DataError
from trainer.model import ModelError
from trainer.train import TrainingStopped

USER_ERRORS = (BackendError, CheckpointError, ConfigError, DataError, DecodeError, ModelError, TrainingStopped)
