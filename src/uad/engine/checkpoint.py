"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else in JSON metadata.

A checkpoint is one ``.safetensors`` file. Tensors are stored under their flat names; the
non-tensor part (step, schedule state, optimiser hyper-parameters, RNG states as lists) is
JSON-encoded into the safetensors header's ``__metadata__`` under the key ``uad``. Loading never
unpickles anything.

Writes go to a temporary file in the same folder, are fsynced, then ``os.replace``d over the
target, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from uad.errors import UadError
from uad.osutil import _umask, atomic_write_bytes, disk_full_error  # noqa: F401  (re-exported)

_META_KEY = "uad"


class CheckpointError(UadError, RuntimeError):
    """A checkpoint file that is missing, truncated or not one of ours."""


_DIGEST_KEY = "uad_tensors_blake2b"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """blake2b of every tensor's name, dtype, shape and bytes (names sorted): what a checkpoint
    stores beside its tensors and checks when it is loaded."""
    h = hashlib.blake2b(digest_size=20)
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_state(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
    """Save ``tensors`` (+ JSON-able ``meta``) to ``path`` atomically as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entry {k!r} is {type(t).__name__}, not a tensor")
        clean[k] = t.detach().to("cpu").contiguous()
    # safetensors refuses tensors sharing storage; clone those that alias.
    seen: dict[int, str] = {}
    for k, t in clean.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen and ptr != -1:
            clean[k] = t.clone()
        seen[ptr] = k
    header = {_META_KEY: json.dumps(meta or {}, sort_keys=True), _DIGEST_KEY: tensors_digest(clean)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=header)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full_error(exc, path.parent, sum(t.numel() * t.element_size() for t in clean.values()))
        if full is not None:
            raise full from exc
        raise
    return path


def load_state(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, meta)`` saved by :func:`save_state`. Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            header = fh.metadata() or {}
            raw_meta = header.get(_META_KEY, "{}")
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
        meta = json.loads(raw_meta)
        stored = header.get(_DIGEST_KEY)
        if stored is not None and tensors_digest(tensors) != stored:
            raise CheckpointError(f"checkpoint {path} is damaged: its tensors no longer match the digest written with "
                                  "them (bytes changed after it was saved); retrain, or restore the file from a copy")
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises several types for truncated/foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    return tensors, meta


def flatten_optimizer_state(opt_state: Mapping[str, Any], prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt_state["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{prefix}.{pid}.{name}"] = val
            else:
                scalars.setdefault(str(pid), {})[name] = val
    meta = {"param_groups": opt_state["param_groups"], "scalars": scalars}
    return tensors, meta


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str = "optim") -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        head, _, rest = key.partition(".")
        if head != prefix:
            continue
        pid, _, name = rest.partition(".")
        state.setdefault(int(pid), {})[name] = t
    for pid, vals in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(vals)
    return {"state": state, "param_groups": meta["param_groups"]}
