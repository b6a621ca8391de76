"""Shared training engine: device choice, seeding, the iteration loop, checkpoints and resume."""

from .checkpoint import CheckpointError, load_state, save_state
from .device import pick_device, seed_everything
from .trainer import EngineConfig, NonFiniteLossError, Trainer

__all__ = [
    "CheckpointError",
    "EngineConfig",
    "NonFiniteLossError",
    "Trainer",
    "load_state",
    "pick_device",
    "save_state",
    "seed_everything",
]
