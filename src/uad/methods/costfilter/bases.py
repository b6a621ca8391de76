"""The plug-in contract: what CostFilter-AD reads from a trained, frozen base detector.

A base adapter turns a batch of images into a :class:`BaseView`, all from **one** forward of the
base:

* ``queries``: per layer, the input's features (B, h*w, C_l) on the query grid;
* ``templates``: per layer, the template features (B, m, C_l): the base's reconstruction
  (reconstruction bases, N = 1, position-aligned), or the N nearest normal training images by
  global feature concatenated on the token axis (embedding bases, m = N*h*w);
* ``guidance``: the input's features the filter's spatial guidance reads (SG stream);
* ``prediction``: the base's own evaluation output for the same images (its full-size map and its
  image score, exactly what the base's own evaluation scores: RLR's squared error + cosine map and
  smoothed-max score, AGPNet's L2 map and pooled-max score, INP-Former++'s ``(A_rec + M_pred) / 2``,
  PatchCore's memory-bank distance, Dinomaly's smoothed cosine map), computed only when asked for
  (``with_prediction``: evaluation, and training when the matching guidance reads it);
* ``base_map``: the map the matching guidance (``guidance_map: base``) and the output blend read.
  With ``base_map: own`` it is ``prediction.maps``; with ``base_map: cosine`` (the released
  ``Costfilter_Dinomaly`` code, reconstruction bases only) the position-wise ``1 - cos`` of the
  input and its reconstruction on the grid, averaged over layers: Dinomaly's map before its
  upsampling and smoothing.

Adapters exist for every method of the project:

=============  ==============================  ===========================================
base           features (layers)                templates
=============  ==============================  ===========================================
dinomaly       encoder group means (2)          decoder group means (its reconstruction)
inpformer      encoder group means (2)          INP-guided decoder group means
rlr            locally averaged stages (3)      RLR's reconstructions, on one grid
agpnet         the fused, normalised layers (1) the decoder's reconstruction
patchcore      locally averaged stages (CNN      N nearest normal training images (any
               or ViT blocks), on one grid      backbone: PatchCore or AnomalyDINO-style)
=============  ==============================  ===========================================

Every adapter runs the base under ``no_grad`` and returns float32 tensors: the base receives no
gradient and its weights never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from uad.errors import ConfigError

from ..base import AnomalyMethod, Prediction
from ..capabilities import GroupReconstruction, Reconstruction
from ..common.features import local_average, to_common_grid
from .volume import aligned_distance_map

__all__ = ["BASE_MAPS", "BaseView", "FilterBase", "ReconstructionBase", "EmbeddingBase", "make_base"]


@dataclass
class BaseView:
    queries: list[torch.Tensor]
    templates: list[torch.Tensor]
    guidance: list[torch.Tensor]
    grid: tuple[int, int]
    base_map: torch.Tensor | None  # (B, h', w') at any size: the map MG and the blend read; None: not computed
    prediction: Prediction | None  # the base's own evaluation output (on the device); only when asked for
    aligned: bool  # templates are per-position reconstructions on the same grid


def _tokens(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m.flatten(2).transpose(1, 2).float() for m in maps]  # B, C, h, w -> B, h*w, C


BASE_MAPS = ("own", "cosine")


class FilterBase:
    """A frozen base method seen through the plug-in contract. ``base_map``: ``own`` (the base's
    evaluation map) or ``cosine`` (the aligned ``1 - cos`` on the grid, reconstruction bases)."""

    aligned = True

    def __init__(self, method: AnomalyMethod, base_map: str = "own"):
        if base_map not in BASE_MAPS:
            raise ConfigError(f"costfilter: base_map must be one of {BASE_MAPS}, got {base_map!r}")
        if base_map == "cosine" and not self.aligned:
            raise ConfigError("costfilter: base_map 'cosine' compares each position with its reconstruction; an "
                              "embedding base has N normal images as templates: use base_map 'own'")
        self.method = method
        self.base_map = base_map

    def view(self, images: torch.Tensor, class_ids: torch.Tensor | None = None,
             exclude: torch.Tensor | None = None, with_prediction: bool = False) -> BaseView:
        raise NotImplementedError

    # embedding bases keep normal references; reconstruction bases have no state of their own
    def fit_references(self, dataset: Any, seed: int, device: torch.device) -> None:
        return None

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise KeyError(f"costfilter: unexpected reference state {sorted(state)}")


class ReconstructionBase(FilterBase):
    """Dinomaly, INP-Former++, RLR and AGPNet: the template is the base's own reconstruction."""

    def view(self, images, class_ids=None, exclude=None, with_prediction=False) -> BaseView:
        m = self.method
        pred = None
        with torch.no_grad():
            if isinstance(m, GroupReconstruction):  # Dinomaly, INP-Former++
                enc, inputs, recs = m.reconstruct_groups(images)
                if with_prediction:
                    pred = m.prediction_from(images, enc, inputs, recs)
                grid = tuple(enc.grid)
            elif isinstance(m, Reconstruction):  # RLR (several grids), AGPNet (one)
                inputs, recs = m.reconstruct(images)
                if with_prediction:
                    pred = m.prediction_from(images, inputs, recs)
                grids = list(m.grids)
                grid = grids[len(grids) // 2]
                inputs = self._on_grid(inputs, grids, grid)
                recs = self._on_grid(recs, grids, grid)
            else:
                raise TypeError(f"costfilter: {type(m).__name__} is declared a reconstruction base but is neither "
                                "a GroupReconstruction nor a Reconstruction (uad.methods.capabilities)")
            inputs = [t.float() for t in inputs]
            recs = [t.float() for t in recs]
            if self.base_map == "cosine":
                base_map = aligned_distance_map(inputs, recs, grid)
            else:
                base_map = pred.maps.float() if pred is not None else None
        return BaseView(inputs, recs, inputs, grid, base_map, pred, aligned=True)

    @staticmethod
    def _on_grid(tokens: list[torch.Tensor], grids: list[tuple[int, int]], grid: tuple[int, int]) -> list[torch.Tensor]:
        maps = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *g) for t, g in zip(tokens, grids)]
        return _tokens(to_common_grid(maps, grid))


class EmbeddingBase(FilterBase):
    """PatchCore (CNN stages or ViT blocks): the templates are the ``templates`` nearest normal
    training images by global feature (the mean of each layer's normalised tokens), chosen from
    a pool of ``reference_pool`` normal images per class kept with the filter (uint8, the crop).

    The pool is chosen once, with the run's seed, from the clean training images. In training
    an image is never its own template (``exclude`` its pool index). ``class_identity`` restricts
    the choice to the image's own class: it needs the class at test time, which the multi-class
    protocol does not give (off by default)."""

    aligned = False

    def __init__(self, method: AnomalyMethod, templates: int = 3, pool: int | None = 48, class_identity: bool = False,
                 base_map: str = "own"):
        super().__init__(method, base_map)
        self.n = int(templates)
        self.pool = pool
        self.class_identity = bool(class_identity)
        self.ref_images = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        self.ref_global = torch.empty(0, 0)
        self.ref_class = torch.empty(0, dtype=torch.int64)
        self.ref_index = torch.empty(0, dtype=torch.int64)
        # the pool's layer tokens, computed once per device from ``ref_images`` (the base is frozen
        # and in eval mode, so they never change): a training step forwards its own images only,
        # not ``templates`` more per image
        self._ref_tokens: tuple[torch.device, list[torch.Tensor]] | None = None

    # --- features --------------------------------------------------------------------------
    def layers(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Per layer (B, h*w, C_l) tokens on the first stage's grid, locally averaged as the base does."""
        return self._layers_from_maps(self.method.stage_maps(images))

    def _layers_from_maps(self, maps: list[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, int]]:
        pooled = [local_average(x.float(), int(self.method.cfg.neighbourhood)) for x in maps]
        grid = tuple(pooled[0].shape[-2:])
        return _tokens(to_common_grid(pooled, grid)), grid

    @staticmethod
    def global_feature(tokens: list[torch.Tensor]) -> torch.Tensor:
        g = torch.cat([F.normalize(t.mean(dim=1), dim=-1) for t in tokens], dim=-1)
        return F.normalize(g, dim=-1)

    def _normalise(self, images_u8: torch.Tensor, device) -> torch.Tensor:
        spec = self.method.input_spec
        mean = torch.tensor(spec["mean"], device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec["std"], device=device).view(1, 3, 1, 1)
        return (images_u8.to(device).float() / 255.0 - mean) / std

    # --- the reference pool ----------------------------------------------------------------
    @torch.no_grad()
    def fit_references(self, dataset: Any, seed: int, device: torch.device) -> None:
        """Choose the pool from ``dataset`` (an :class:`~uad.data.torch_data.AnomalyImageDataset`
        over the normal training images; its clean crops, before any synthesis)."""
        ids = np.asarray(dataset.class_ids)
        rng = np.random.default_rng(seed)
        picks: list[int] = []
        for c in np.unique(ids):
            members = np.flatnonzero(ids == c)
            k = len(members) if self.pool is None else min(len(members), int(self.pool))
            picks.extend(sorted(rng.choice(members, size=k, replace=False).tolist()))
        imgs = np.stack([dataset.load_prepared(int(i))[0] for i in picks])  # P, H, W, 3 uint8
        self.ref_images = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
        self.ref_class = torch.as_tensor(ids[picks], dtype=torch.int64)
        self.ref_index = torch.as_tensor(picks, dtype=torch.int64)
        self._ref_tokens = None
        self.ref_global = self.global_feature(self.reference_tokens(device)).cpu()

    def reference_tokens(self, device: torch.device) -> list[torch.Tensor]:
        """Per layer (P, h*w, C_l): every pool image's tokens, cached on ``device``."""
        device = torch.device(device)
        if self._ref_tokens is None or self._ref_tokens[0] != device:
            per_layer: list[list[torch.Tensor]] = []
            with torch.no_grad():
                for start in range(0, self.ref_images.shape[0], 16):
                    tokens, _ = self.layers(self._normalise(self.ref_images[start:start + 16], device))
                    for i, t in enumerate(tokens):
                        if len(per_layer) <= i:
                            per_layer.append([])
                        per_layer[i].append(t)
            self._ref_tokens = (device, [torch.cat(t) for t in per_layer])
        return self._ref_tokens[1]

    def state(self) -> dict[str, torch.Tensor]:
        return {"ref_images": self.ref_images, "ref_global": self.ref_global, "ref_class": self.ref_class,
                "ref_index": self.ref_index}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        need = {"ref_images", "ref_global", "ref_class", "ref_index"}
        if set(state) != need:
            raise KeyError(f"costfilter: the embedding base needs reference state {sorted(need)}, got {sorted(state)}")
        self.ref_images = state["ref_images"].to(torch.uint8)
        self.ref_global = state["ref_global"].float()
        self.ref_class = state["ref_class"].long()
        self.ref_index = state["ref_index"].long()
        self._ref_tokens = None

    # --- the view ----------------------------------------------------------------------------
    @torch.no_grad()
    def nearest(self, g: torch.Tensor, class_ids: torch.Tensor | None, exclude: torch.Tensor | None) -> torch.Tensor:
        """(B, N) pool rows of the N most similar references (cosine of global features)."""
        pool = self.ref_global.to(g.device)
        if pool.shape[0] == 0:
            raise RuntimeError("costfilter: the embedding base has no reference images (train the filter first)")
        sim = g @ pool.T  # B, P
        if exclude is not None:
            sim = sim.masked_fill(self.ref_index.to(g.device)[None, :] == exclude.to(g.device)[:, None], float("-inf"))
        if self.class_identity and class_ids is not None:
            sim = sim.masked_fill(self.ref_class.to(g.device)[None, :] != class_ids.to(g.device)[:, None], float("-inf"))
        n = min(self.n, pool.shape[0])
        return sim.topk(n, dim=1).indices

    def view(self, images, class_ids=None, exclude=None, with_prediction=False) -> BaseView:
        m = self.method
        with torch.no_grad():
            maps = m.stage_maps(images)  # one encoder pass: the base's own prediction and the queries
            pred = m.prediction_from_features(images, m.features_from_maps(maps)) if with_prediction else None
            queries, grid = self._layers_from_maps(maps)
            rows = self.nearest(self.global_feature(queries), class_ids, exclude)  # B, N
            b, n = rows.shape
            pool = self.reference_tokens(images.device)  # L x (P, h*w, C)
            templates = [t[rows.flatten()].reshape(b, n * t.shape[1], t.shape[2]) for t in pool]
        base_map = pred.maps.float() if pred is not None else None  # PatchCore's memory-bank distance map
        return BaseView(queries, templates, queries, grid, base_map, pred, aligned=False)


def make_base(name: str, method: AnomalyMethod, templates: int = 3, pool: int | None = 48,
              class_identity: bool = False, base_map: str = "own") -> FilterBase:
    """The adapter for base ``name``, by the base kind its declaration names: ``embedding``
    (templates are nearest normal images by frozen-encoder features) or ``reconstruction``."""
    from uad.methods.declaration import declaration

    kind = declaration(name).base_kind
    if kind == "embedding":
        return EmbeddingBase(method, templates, pool, class_identity, base_map)
    if kind == "reconstruction":
        return ReconstructionBase(method, base_map)
    raise ValueError(f"costfilter: {name!r} declares no base kind: it cannot be read as a base")
