"""The calibrated blend of CostFilter-AD's P with its base, fitted on data the project makes itself.

The paper's output (sec. 3.4) is P alone; the released code blends ``lambda P + (1 - lambda) M``
with a weight tuned per base variant *at that base's scale* (Dinomaly's ``1 - cos`` map: 0.05;
AnomalyDINO 0.5; GLAD 0.4). A weight copied onto a base of another scale (PatchCore's distances
span 33-75 where P lies in [0, 1]) is not the method. This module makes the weight mean the same on
every base and chooses it without the test split:

1. **Scale** (:func:`affine_onto`): on held-out normal images (the ``validation`` split: normals
   no model trained on), P is mapped onto the base's units by the affine map that sends P's median
   to the base's median and P's upper quantile (99.9 %) to the base's, for the pixel maps and for
   the image scores separately. The blend is then computed in the base's units::

       M = (1 - w) M_base + w (a P + b)          s = (1 - w') s_base + w' (a' s(P) + b')

   so ``w = w' = 0`` is the base bit for bit and ``w = w' = 1`` is P (an increasing affine map of it: the same
   ranking, the same AUROC and AUPRO). Mapping the base onto P's scale instead gives the same map
   up to one increasing affine map (the same metrics); the base's units keep its thresholds readable.
2. **Weights** (:func:`choose_weights`): on a validation set of the held-out normals and pseudo
   anomalies made on them (CutPaste by default, below; a seed stream of their own),
   the map's weight ``w`` is the candidate with the best pixel AUROC among those whose AUPRO is at
   most ``min_gain`` below the base's (:func:`region_guard`: pixel AUROC is ruled by the largest
   regions, and a weight chosen on it alone can cost the small ones their overlap, measured on
   AGPNet: the method's README) and the score's weight ``w'`` the one with the best image AUROC
   (normal vs pseudo-anomalous images), ties to the smaller
   weight, each kept only if it beats the base on that set by ``min_gain`` **and** beats it in a
   ``confidence`` share of bootstrap resamples of the validation images (:func:`bootstrap_gain_share`:
   the held-out normals resampled, each with its pseudo-anomalous copies, whole images, so a pixel's
   neighbours move with it); else 0. Each held-out normal gives ``copies`` pseudo-anomalous images
   (the same normals, new anomalies), so a few normals still make a validation with power; a gain
   inside their noise is not taken. The test split is never an input.

The validation's pseudo anomalies are CutPaste's (``uad.synthesis.cutpaste``) by default, not the
filter's own GLAD recipe: P learnt exactly that recipe, and on it P's validation AUROC overrates
its AUROC on real defects by far more than the base's (measured: the method's README).

All statistics are of the model's own group (one model per class in the one-class setting: per class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

__all__ = ["BlendCalibration", "ValidationOutputs", "affine_onto", "choose_weights", "blend",
           "bootstrap_gain_share", "best_weight", "region_guard",
           "DEFAULT_WEIGHTS", "DEFAULT_MIN_GAIN", "DEFAULT_CONFIDENCE"]

#: the candidate weights searched by default: 0, 0.05, ..., 1
DEFAULT_WEIGHTS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
#: the validation gain over the base below which the base keeps its output (half an AUROC point)
DEFAULT_MIN_GAIN = 0.005
#: the share of bootstrap resamples of the validation images in which a weight must beat the base
DEFAULT_CONFIDENCE = 0.95
#: bootstrap resamples (fixed seed: the same validation set gives the same verdict)
DEFAULT_RESAMPLES = 400
#: at most this many pixels enter a quantile or a pixel figure (a fixed stride over the maps)
MAX_PIXELS = 2_000_000


@dataclass
class BlendCalibration:
    """The fitted blend: the map's and the score's weights and the affine maps (scale, shift)
    sending P's map and score onto the base's units."""

    map_weight: float
    score_weight: float
    map_affine: tuple[float, float]
    score_affine: tuple[float, float]
    figures: dict[str, float] = field(default_factory=dict)

    def state(self) -> dict[str, torch.Tensor]:
        return {"weight": torch.tensor([float(self.map_weight), float(self.score_weight)], dtype=torch.float64),
                "map_affine": torch.tensor(self.map_affine, dtype=torch.float64),
                "score_affine": torch.tensor(self.score_affine, dtype=torch.float64)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "BlendCalibration":
        need = {"weight", "map_affine", "score_affine"}
        if set(state) != need:
            raise KeyError(f"costfilter: a calibration needs {sorted(need)}, got {sorted(state)}")
        ma, sa, w = state["map_affine"].tolist(), state["score_affine"].tolist(), state["weight"].reshape(-1).tolist()
        return cls(float(w[0]), float(w[-1]), (float(ma[0]), float(ma[1])), (float(sa[0]), float(sa[1])))


@dataclass
class ValidationOutputs:
    """What the filter and its base give on the validation images (host tensors).

    ``p_maps`` / ``base_maps``: (N, H, W); ``p_scores`` / ``base_scores``: (N,); ``masks``: (N, H, W)
    bool (empty on the held-out normals); ``labels``: (N,) 0 normal, 1 pseudo anomaly."""

    p_maps: torch.Tensor
    base_maps: torch.Tensor
    p_scores: torch.Tensor
    base_scores: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    #: (N,) the held-out normal each image was made from (its pseudo-anomalous copies share it): the
    #: bootstrap resamples these, so an image and its copies move together; None: every image alone
    sources: torch.Tensor | None = None


def _sample(values: torch.Tensor, limit: int = MAX_PIXELS) -> torch.Tensor:
    flat = values.reshape(-1).double()
    step = max(1, -(-flat.numel() // limit))
    return flat[::step]


def affine_onto(source: torch.Tensor, target: torch.Tensor, quantile: float = 0.999) -> tuple[float, float]:
    """``(a, b)`` with ``a * source + b`` matching ``target`` at the median and at ``quantile``
    (both computed on the given values: the held-out normals). ``a > 0`` always: when P does not
    spread on the normals (a saturated filter), its scale is taken from its full range instead, and
    when that is 0 too, ``a = 1`` (the blend then only shifts)."""
    s, t = _sample(source), _sample(target)
    qs = torch.quantile(s, torch.tensor([0.5, quantile], dtype=torch.float64))
    qt = torch.quantile(t, torch.tensor([0.5, quantile], dtype=torch.float64))
    spread_s, spread_t = float(qs[1] - qs[0]), float(qt[1] - qt[0])
    if spread_s <= 1e-12:
        spread_s = float(s.max() - s.min())
    if spread_t <= 1e-12:
        spread_t = float(t.max() - t.min())
    a = spread_t / spread_s if spread_s > 1e-12 and spread_t > 1e-12 else 1.0
    return a, float(qt[0]) - a * float(qs[0])


def blend(p: torch.Tensor, base: torch.Tensor, weight: float, affine: tuple[float, float]) -> torch.Tensor:
    """``(1 - w) base + w (a p + b)``, in float32 (the base's units)."""
    a, b = affine
    w = float(weight)
    return ((1.0 - w) * base.float() + w * (a * p.float() + b)).float()


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from uad.metrics.metrics import auroc

    if labels.min() == labels.max():
        return float("nan")
    return float(auroc(labels, scores))


def _groups(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Per value, the rank of its distinct value (ties share one), and how many distinct values."""
    uniq, inv = np.unique(values, return_inverse=True)
    return inv.reshape(-1), len(uniq)


def _weighted_auroc(groups: np.ndarray, n_groups: int, labels: np.ndarray, weights: np.ndarray) -> float:
    """AUROC (Mann-Whitney, ties counted half) of items carrying integer ``weights`` (how often each
    was drawn): the AUROC of the resample, without sorting it again."""
    pos = np.bincount(groups, weights * labels, n_groups)
    neg = np.bincount(groups, weights * (1.0 - labels), n_groups)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def bootstrap_gain_share(item_labels: np.ndarray, item_image: np.ndarray, image_labels: np.ndarray,
                         base: np.ndarray, candidate: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                         seed: int = 0, image_source: np.ndarray | None = None) -> float:
    """The share of ``resamples`` bootstrap resamples of the validation **images** in which
    ``candidate`` has a higher AUROC than ``base`` over the items (images, or pixels with
    ``item_image`` naming their image); a tie counts half. With ``image_source`` (per image, the
    held-out normal it was made from) the sources are resampled, each carrying its normal image and
    its pseudo-anomalous copies; without it normal and pseudo-anomalous images are resampled apart
    (each resample keeps both kinds, in their counts)."""
    item_labels = np.asarray(item_labels, dtype=np.float64)
    item_image = np.asarray(item_image, dtype=np.int64)
    image_labels = np.asarray(image_labels)
    g_base, n_base = _groups(np.asarray(base, dtype=np.float64))
    g_cand, n_cand = _groups(np.asarray(candidate, dtype=np.float64))
    rng = np.random.default_rng(seed)
    n_images = len(image_labels)
    if image_source is not None:
        _, source = np.unique(np.asarray(image_source), return_inverse=True)
        source = source.reshape(-1)
        n_sources = int(source.max()) + 1 if len(source) else 0
    else:
        kinds = [np.flatnonzero(image_labels == k) for k in np.unique(image_labels)]
    wins = 0.0
    for _ in range(int(resamples)):
        if image_source is not None:
            counts = np.bincount(rng.integers(0, n_sources, n_sources), minlength=n_sources).astype(np.float64)[source]
        else:
            counts = np.zeros(n_images, dtype=np.float64)
            for idx in kinds:
                counts += np.bincount(rng.choice(idx, size=len(idx), replace=True), minlength=n_images)
        w = counts[item_image]
        a = _weighted_auroc(g_base, n_base, item_labels, w)
        b = _weighted_auroc(g_cand, n_cand, item_labels, w)
        if np.isfinite(a) and np.isfinite(b):
            wins += 1.0 if b > a else 0.5 if b == a else 0.0
    return wins / max(int(resamples), 1)


def region_guard(pixel: Sequence[float], region: Sequence[float], weights: Sequence[float],
                 min_gain: float) -> list[float]:
    """The pixel-AUROC curve with NaN at every weight whose AUPRO (``region``) is more than
    ``min_gain`` below the base's (w = 0): such a weight buys pixel AUROC, which the largest
    regions rule, with the small regions' overlap, and is not a candidate. Unchanged where the
    base's AUPRO is undefined (no anomalous region) or w = 0 is not a candidate."""
    base = dict(zip([float(w) for w in weights], region)).get(0.0)
    if base is None or not np.isfinite(base):
        return [float(v) for v in pixel]
    return [float(v) if np.isfinite(r) and r >= base - float(min_gain) else float("nan") for v, r in zip(pixel, region)]


def best_weight(curve: Sequence[float], weights: Sequence[float], min_gain: float) -> tuple[float, float]:
    """``(weight, gain over w = 0)`` of the best finite value of ``curve`` (validation AUROC per
    candidate weight; ties to the smaller weight); the weight is 0 when that gain is under
    ``min_gain``, when w = 0 is not a candidate the best is taken as it is (gain nan)."""
    finite = [(v, w) for v, w in zip(curve, weights) if np.isfinite(v)]
    if not finite:
        return 0.0, float("nan")
    best_v = max(v for v, _ in finite)
    best_w = min(w for v, w in finite if v >= best_v - 1e-12)
    base_v = dict(zip(weights, curve)).get(0.0)
    if base_v is None or not np.isfinite(base_v):
        return best_w, float("nan")
    gain = best_v - base_v
    return (best_w if best_w != 0.0 and gain >= float(min_gain) else 0.0), gain


def choose_weights(val: ValidationOutputs, map_affine: tuple[float, float], score_affine: tuple[float, float],
                   weights: Sequence[float] = DEFAULT_WEIGHTS, min_gain: float = DEFAULT_MIN_GAIN,
                   confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES
                   ) -> tuple[float, float, dict[str, float]]:
    """``(map weight, score weight, validation figures)``: the map's weight by pixel AUROC among
    the weights whose AUPRO stays within ``min_gain`` of the base's (:func:`region_guard`), the
    score's by image AUROC, on the validation set; each the best candidate (ties to the smaller
    weight) **if** it beats the base (w = 0) on that figure by at least ``min_gain`` and in at least
    a ``confidence`` share of bootstrap resamples of the validation images
    (:func:`bootstrap_gain_share`), else 0: a gain inside the noise of a few
    dozen validation images is not taken, and the base keeps its output unless P's help is clear."""
    from uad.metrics.metrics import pixel_metrics

    labels = val.labels.numpy().astype(np.int64)
    masks = val.masks.reshape(-1)
    step = max(1, -(-masks.numel() // MAX_PIXELS))
    pix_labels = masks[::step].numpy().astype(np.int64)
    per_image = int(val.masks[0].numel()) if len(val.masks) else 1
    pix_image = (np.arange(0, masks.numel(), step) // per_image).astype(np.int64)
    base_px, p_px = val.base_maps.reshape(-1)[::step], val.p_maps.reshape(-1)[::step]
    ws = [float(w) for w in weights]
    sources = None if val.sources is None else val.sources.numpy()
    score_of = {w: blend(val.p_scores, val.base_scores, w, score_affine).numpy() for w in ws}
    image = [_auroc(labels, score_of[w]) for w in ws]
    # the map's figures per weight with the project's own pixel metrics (the whole maps: AUPRO needs regions)
    mask_np = val.masks.numpy().astype(bool)
    figs = [pixel_metrics(mask_np, blend(val.p_maps, val.base_maps, w, map_affine).numpy()) for w in ws]
    pixel = [f["pixel_auroc"] for f in figs]
    region = [f["pixel_aupro"] for f in figs]
    shares: dict[str, float] = {}

    def pick(curve: list[float], kind: str) -> float:
        if len(ws) == 1:  # a fixed weight (``blend`` given): nothing to choose
            return ws[0]
        best_w, gain = best_weight(curve, ws, min_gain)
        if best_w == 0.0 or not np.isfinite(gain):
            return best_w
        if float(confidence) > 0.0:
            if kind == "image":
                share = bootstrap_gain_share(labels, np.arange(len(labels)), labels, score_of[0.0], score_of[best_w],
                                             resamples, image_source=sources)
            else:
                share = bootstrap_gain_share(pix_labels, pix_image, labels, base_px.numpy(),
                                             blend(p_px, base_px, best_w, map_affine).numpy(), resamples,
                                             image_source=sources)
            shares[kind] = share
            if share < float(confidence):
                return 0.0
        return best_w

    wm, wsc = pick(region_guard(pixel, region, ws, min_gain), "pixel"), pick(image, "image")
    at = dict(zip(ws, zip(image, pixel, region)))
    figures: dict = {"val_images": float(len(labels)), "val_pseudo_anomalies": float(labels.sum()),
                     "map_weight": wm, "score_weight": wsc,
                     "val_image_auroc": at[wsc][0], "val_pixel_auroc": at[wm][1], "val_pixel_aupro": at[wm][2]}
    for kind, share in shares.items():
        figures[f"val_{kind}_gain_share"] = share
    for name, w in (("base", 0.0), ("p", 1.0)):
        if w in at:
            figures[f"val_{name}_image_auroc"] = at[w][0]
            figures[f"val_{name}_pixel_auroc"] = at[w][1]
            figures[f"val_{name}_pixel_aupro"] = at[w][2]
    #: per candidate weight: [w, image AUROC, pixel AUROC, AUPRO]
    figures["curve"] = [[w, i, p, r] for w, i, p, r in zip(ws, image, pixel, region)]
    return wm, wsc, figures
