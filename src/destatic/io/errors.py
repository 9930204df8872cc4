"""The errors of reading and writing model files: one line that says what and what to do."""

from __future__ import annotations

__all__ = ["WRITE_ERRORS", "CheckpointError", "CheckpointWriteError"]

try:  # the writer's error (a full or read-only disk) is not an OSError
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover - very old safetensors
    _SafetensorError = OSError

#: What a failed write raises: OSError from Python, SafetensorError from safetensors' writer.
WRITE_ERRORS: tuple[type[Exception], ...] = (OSError, _SafetensorError)


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read (one-line message: what and what to do)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint or model folder that could not be written (a full or read-only disk);
    ``reason`` is the one-line cause, e.g. ``No space left on device``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
