"""The one scoring loop: a prepared method over a dataset or over batches of forward inputs.

Every path that turns images into scores and maps goes through :func:`forward` (the class-id
branch, device-resident results) and, for datasets, :func:`score_dataset` (the engine's loader
with workers and pinned memory, uint8 transfer normalised on the device, results copied to the
host behind the next batch, sharding over data-parallel ranks and gathering in order):

- the evaluation protocol (square resize, centre crop: :func:`uad.engine.orchestration.predict_split`);
- the full frame and its tiles, ``infer``, the MLflow pyfunc and the notebooks
  (:class:`uad.inference.Inferencer`, whose forward inputs go through :func:`forward`);
- benchmarks and learning curves.

Core library: torch / numpy only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["forward", "normalise_uint8", "score_dataset"]


def normalise_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ``(x / 255 - mean) / std`` in float32: the operations, in the order,
    :class:`uad.data.torch_data.AnomalyImageDataset` applies (the values are identical)."""
    return (images.float() / 255.0 - mean) / std


def forward(method: Any, images: torch.Tensor, class_ids: torch.Tensor | None = None, on_device: bool = False):
    """The method's :class:`~uad.methods.base.Prediction` of a normalised batch on its device.

    A method that reads each image's class (``wants_class_ids``) is given ``class_ids``;
    ``on_device`` lets scores and maps stay on the device (``predict_on_device``) for a caller that
    copies them to the host itself."""
    if method.wants_class_ids:
        if class_ids is None:
            raise ValueError(f"{method.name} reads each image's class: give class_ids")
        return method.predict(images, class_ids=class_ids)
    return method.predict_on_device(images) if on_device else method.predict(images)


@torch.no_grad()
def score_dataset(method: Any, ds: Any, trainer: Any, cfg: Any, desc: str, errors: list[str] | None = None,
                  on_batch: Callable[[dict, Any], None] | None = None,
                  base: dict[str, list] | None = None, shard: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores float32 (N,), maps float16 (N, crop, crop), masks uint8 (N, crop, crop))`` of a
    prepared method over ``ds``, streamed by the engine's loader (workers, pinned memory) with a
    progress bar.

    With a dataset whose samples carry ``error`` (:class:`uad.data.torch_data.SkipUnreadable`),
    ``errors`` receives them in order (the flagged samples' scores and maps are placeholders for
    the caller to drop). ``on_batch(batch, prediction)`` sees every batch as it is scored
    (pictures made from the decoded images, without decoding them again). ``base`` receives a
    plug-in's base predictions (``scores`` / ``maps`` lists) when the method returns them. In a
    data-parallel run (``shard``) each rank scores a block of whole batches and every rank
    receives all the results, in order (with ``on_batch`` the process scores everything itself:
    its pictures need every image in one process)."""
    from uad.engine import distributed
    from uad.engine.speed import HostResults
    from uad.progress import progress

    batch_size = cfg.infer_batch_size or cfg.batch_size or 8
    if shard and distributed.world_size() > 1 and on_batch is None:
        return _gather_shards(_score_shard(method, ds, trainer, cfg, desc, errors, base, batch_size), errors, base)
    # pictures (on_batch) read the normalised images of the batch: uint8 transfer only without them
    loader = trainer.loader(ds, batch_size=batch_size, uint8=on_batch is None)
    normalise = getattr(loader, "uad_normalise", None)
    host = HostResults(len(ds), trainer.device)
    for batch in progress(loader, desc=desc, unit="batch", enabled=bool(cfg.progress)):
        if errors is not None:
            errors.extend(batch.get("error") or [""] * len(batch["image"]))
        images = batch["image"].to(trainer.device, non_blocking=True)
        if normalise is not None and images.dtype == torch.uint8:
            images = normalise(images)
        ids = batch["class_id"].to(trainer.device) if method.wants_class_ids else None
        # pictures need the maps on the host now; otherwise HostResults copies them behind the next batch
        out = forward(method, images, ids, on_device=on_batch is None)
        if base is not None and out.base is not None:
            base.setdefault("scores", []).append(out.base.scores.float().cpu().numpy())
            base.setdefault("maps", []).append(out.base.maps.float().cpu().numpy().astype(np.float16))
        if on_batch is not None:
            on_batch(batch, out)
        host.add(out.scores, out.maps, batch["mask"])
    return host.result()


def _score_shard(method, ds, trainer, cfg, desc, errors, base, batch_size):
    from uad.engine import distributed

    idx = distributed.shard_indices(len(ds), batch=batch_size)
    local_errors: list[str] | None = [] if errors is not None else None
    local_base: dict[str, list] | None = {} if base is not None else None
    quiet = cfg if distributed.is_main() else dataclasses.replace(cfg, progress=False)
    if not idx:
        return None, local_errors, local_base
    out = score_dataset(method, torch.utils.data.Subset(ds, idx), trainer, quiet, desc, local_errors, None, local_base,
                        shard=False)
    return out, local_errors, local_base


def _gather_shards(part, errors, base):
    """Every rank's shard, concatenated in rank order (= the dataset's order), on every rank."""
    from uad.engine import distributed

    parts = [p for p in distributed.all_gather_objects(part) if p[0] is not None]
    scores, maps, masks = (np.concatenate([p[0][i] for p in parts]) for i in range(3))
    if errors is not None:
        errors.extend(e for p in parts for e in (p[1] or []))
    if base is not None:
        for p in parts:
            for key, chunks in (p[2] or {}).items():
                base.setdefault(key, []).extend(chunks)
    return scores, maps, masks
