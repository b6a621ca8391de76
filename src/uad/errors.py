"""The project's own errors: what its checks find wrong with the user's data, settings, weights or
checkpoints. Each message names the file or setting, the problem and what to do, so the command
line prints it as one line with no traceback (``uad.cli``); everything else is a bug and keeps its
traceback."""

from __future__ import annotations

__all__ = ["CheckpointMismatchError", "ConfigError", "DatasetLayoutError", "DatasetRootError", "UadError"]


class UadError(Exception):
    """Base of every error the project raises on purpose (mixed into the specific classes, so they
    keep their usual base: ``ValueError``, ``FileNotFoundError``, ``RuntimeError`` ...)."""


class ConfigError(UadError, ValueError):
    """A parameter is unknown, out of range or inconsistent."""


class DatasetRootError(UadError, FileNotFoundError):
    """A dataset root, split file or folder the settings point at does not exist."""


class DatasetLayoutError(UadError, ValueError):
    """A dataset folder does not have the layout it is read with (no images, unknown classes ...)."""


class CheckpointMismatchError(UadError, ValueError):
    """A checkpoint was made by another method, backbone or input size than the run expects."""
