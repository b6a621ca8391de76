"""Training cases run in one process or in spawned data-parallel ranks (tests/test_distributed.py).

Module-level functions so ``spawn`` can import them in the ranks; each returns the trained
state as plain tensors (rank 0's is passed back by :func:`uad.engine.distributed.launch`).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from uad.engine import EngineConfig, Trainer
from uad.engine import distributed
from uad.methods.registry import build_method

VIT = {"backbone": "dinov2_vits14_reg", "weights": "random", "allow_random": True, "resize": 28, "crop": 28,
       "warmup_iters": 2}


class Images(Dataset):
    """Fixed random images (the same in every process)."""

    def __init__(self, n: int = 12, size: int = 28):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.m = (torch.rand(n, 1, size, size, generator=g) > 0.8).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "mask": self.m[i], "label": torch.tensor(1), "class_id": torch.tensor(0),
                "index": torch.tensor(i)}


def _method(name: str, stage_params: dict):
    params = {**VIT, **stage_params}
    # dropout masks are drawn per process: off for an exact comparison
    if name == "dinomaly":
        params.update(noisy_bottleneck=False, hm_warmup_iters=2)
    else:
        params.update(bottleneck_dropout=0.0)
    return build_method(name, params)


class _Recorded(Exception):
    """Ends a recorded training after its first steps (``train(first_steps=...)``)."""


def _sum_without_mean(params) -> None:
    """A wrong gradient average (for the tests that must catch it): all-reduced, not divided."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def _no_all_reduce(params) -> None:
    """A wrong gradient average (for the tests that must catch it): each rank keeps its own."""


#: ``averaging`` of :func:`train`: what the engine calls as ``distributed.average_gradients``
AVERAGING = {"mean": None, "sum": _sum_without_mean, "none": _no_all_reduce}


def train(name: str, stage: str, params: dict, iterations: int, batch: int, ckpt_dir: str | None = None,
          stop_after: int | None = None, forbid_writes_off_main: bool = True, record: bool = False,
          averaging: str = "mean", first_steps: int | None = None) -> dict:
    """Train ``stage`` of ``name`` for ``iterations`` steps of global batch ``batch``; returns its
    state. ``stop_after``: raise after that many optimiser steps (a killed run, for resume).
    ``record``: return ``{"state", "grads" (every step's gradients after the all-reduce and
    before the gradient-norm clip, by ``module.parameter`` name), "clip" (the clip norm), "losses"
    (every step's global-batch loss)}`` instead. ``averaging``: ``"mean"`` is the engine's own
    :func:`uad.engine.distributed.average_gradients`; ``"sum"`` (no division by the world size)
    and ``"none"`` (no all-reduce) are wrong ones the tests must catch. ``first_steps`` (with
    ``record``): end after that many of the ``iterations`` steps, returning their gradients only
    (no state, no losses)."""
    method = _method(name, params)
    cfg = EngineConfig(device="cpu", iterations=iterations, batch_size=batch, num_workers=0, seed=1,
                       checkpoint_dir=ckpt_dir, checkpoint_every=2, progress=False, log_every=1, sync_every=1)
    trainer = Trainer(cfg, key="ddp-case")
    if forbid_writes_off_main and not distributed.is_main():
        def no_write(*a, **k):
            raise AssertionError(f"rank {distributed.rank()} tried to write a checkpoint")
        trainer._save = no_write  # type: ignore[method-assign]
        trainer._prune = no_write  # type: ignore[method-assign]
    original = method.after_optimizer_step

    def hook(st, step):
        original(st, step)
        if stop_after is not None and step + 1 > stop_after:
            raise RuntimeError(f"stopped after step {step}")
        if record and first_steps is not None and step + 1 >= first_steps:
            raise _Recorded  # every rank at the same step: no collective is left waiting
    method.after_optimizer_step = hook  # type: ignore[method-assign]

    # the gradient as the all-reduce leaves it, before the clip to a fixed norm hides its scale:
    # recorded where the engine clips (torch.nn.utils.clip_grad_norm_, after the all-reduce)
    names = {id(p): f"{key}.{n}" for key, mod in method.trainable_modules().items() for n, p in mod.named_parameters()}
    grads: list[dict[str, torch.Tensor]] = []
    clip_norms: set[float] = set()
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        grads.append({names[id(p)]: p.grad.detach().clone() for p in parameters if p.grad is not None})
        clip_norms.add(float(max_norm))
        return clip(parameters, max_norm, *args, **kwargs)

    average = distributed.average_gradients
    try:
        if record:
            torch.nn.utils.clip_grad_norm_ = recording_clip
        if AVERAGING[averaging] is not None:
            distributed.average_gradients = AVERAGING[averaging]
        trainer.prepare(method)
        result = method.fit_stage(stage, trainer.loader(Images(), batch_size=batch), trainer)
    except _Recorded:
        return {"grads": grads, "clip": clip_norms.pop()}
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        distributed.average_gradients = average
    state = {k: v.clone() for k, v in method.state_dict().items()}
    if not record:
        return state
    assert len(grads) == iterations and len(clip_norms) == 1, \
        f"{len(grads)} gradients recorded at the clip for {iterations} steps (clip norms {clip_norms})"
    losses = torch.tensor([v for _, v in result["history"]], dtype=torch.float64)  # already the mean over ranks
    return {"state": state, "grads": grads, "clip": clip_norms.pop(), "losses": losses}


def wrong_averages(name: str, stage: str, params: dict, iterations: int, batch: int) -> dict:
    """The first step's recorded gradients of ``train`` with each wrong gradient average
    (``{"sum": ..., "none": ...}``), in one group of ranks."""
    return {averaging: train(name, stage, params, iterations, batch, record=True, averaging=averaging, first_steps=1)
            for averaging in AVERAGING if averaging != "mean"}


class MeanMap:
    """A method-shaped stand-in for scoring: map = channel mean, score = map max (deterministic)."""

    name = "mean-map"
    wants_class_ids = False

    def predict(self, images):
        from uad.methods.base import Prediction

        maps = images.mean(dim=1)
        return Prediction(scores=maps.flatten(1).amax(dim=1), maps=maps)

    def predict_on_device(self, images):  # the method contract's default (uad.methods.base.AnomalyMethod)
        return self.predict(images)


def score(n: int = 11, batch: int = 4):
    """``score_dataset`` over ``n`` images (sharded over the ranks when there are several)."""
    from uad.engine.scoring import score_dataset

    cfg = EngineConfig(device="cpu", batch_size=batch, num_workers=0, progress=False)
    ds = Images(n)
    scores, maps, masks = score_dataset(MeanMap(), ds, Trainer(cfg), cfg, "score")
    return {"scores": torch.from_numpy(scores), "maps": torch.from_numpy(maps.astype("float32")),
            "masks": torch.from_numpy(masks)}


def _own_socket_inodes() -> set[str]:
    import os

    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _decode(addr: str) -> str:
    """``/proc/net/tcp*`` local address (hex, little-endian words) as ``ip:port``."""
    import ipaddress
    import struct

    host, port = addr.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(struct.pack("<I", w) for w in struct.unpack(">" + "I" * (len(raw) // 4), raw))
    return f"{ipaddress.ip_address(words)}:{int(port, 16)}"


def socket_addresses() -> list[tuple[str, str]]:
    """Every TCP socket this rank holds after a collective: ``(local address, state)`` (state 0A is
    LISTEN), gathered from all ranks (rank 0 returns the lot)."""
    import torch.distributed as dist

    t = torch.ones(4)
    dist.all_reduce(t)  # the collectives' connections exist now
    mine = _own_socket_inodes()
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[9] in mine:
                found.append((_decode(parts[1]), parts[3]))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, found)
    return [s for part in gathered for s in part]
