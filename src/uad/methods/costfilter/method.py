"""CostFilter-AD (Zhang et al., ICML 2025) as a plug-in :class:`~uad.methods.base.AnomalyMethod`.

The method wraps a trained base detector (``base`` + ``base_params``: any method of the project),
kept frozen; only the filter network learns. Per batch:

1. the base adapter (:mod:`.bases`) gives, from one base forward, the input's features, the
   templates and (when needed) the base's own evaluation map and score;
2. the cost volume (:mod:`.volume`, eq. 1-2) and the guidance map (per-layer minima, or the base
   map as the released code feeds it);
3. the 3D U-Net filter (:mod:`.network`, sec. 3.3) -> 2 logits per volume pixel + class logits;
4. training: eq. 5 on pseudo anomalies from the synthesis stage (GLAD's recipe: ``synthesis_recipe``);
   inference: ``P = softmax(.)[anomaly]`` resized to the image, optionally blended with the base
   (``blend`` < 1: ``lambda P + (1 - lambda) M_base``; the score ``lambda s(P) + (1 - lambda)
   s_base`` with the base's own map and score, or read from the blended map with ``base_map:
   cosine``), s(P) = mean of the top ``max(k, ratio * HW)`` pixels.

The checkpoint holds the filter, the base's own learned state and (embedding bases) the reference
pool, so prediction, inference and export need nothing else. ``predict`` also returns the base's
own prediction for the same images (``Prediction.base``): the pipeline evaluates both and logs the
gain.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from uad.errors import ConfigError

from ..base import AnomalyMethod, OptimSetup, Prediction
from ..capabilities import Calibrated, ReferencePool, RescalableSchedule
from ..common.optim import EpochPlateau
from ..registry import build_method, register
from .bases import BaseView, EmbeddingBase, make_base
from .calibration import BlendCalibration, ValidationOutputs, affine_onto, blend, choose_weights
from .config import CostFilterConfig
from .losses import costfilter_loss
from .network import CostFilterNet
from .volume import build_volume, resize_maps

__all__ = ["CostFilter"]


@register("costfilter")
class CostFilter(AnomalyMethod, ReferencePool, RescalableSchedule, Calibrated):
    config_class = CostFilterConfig
    stages = ("filter",)

    def __init__(self, params: Mapping[str, Any] | None = None):
        super().__init__(params)
        self.cfg = self.config = CostFilterConfig.from_params(self.params)
        cfg = self.cfg
        if cfg.base == "costfilter":
            raise ConfigError("costfilter: the base cannot be costfilter itself")
        self.base_method = build_method(cfg.base, cfg.base_params)
        self.base = make_base(cfg.base, self.base_method, cfg.templates, cfg.reference_pool, cfg.class_identity,
                              cfg.base_map)
        if cfg.query_side == "template" and not self.base.aligned and cfg.from_preset("query_side"):
            # the released embedding-base variants (GLAD's decoded templates, AnomalyDINO) query
            # with the input; the swap belongs to the Dinomaly variant only
            cfg.query_side = "input"
        if cfg.query_side == "template" and not self.base.aligned:
            raise ConfigError("costfilter: query_side 'template' needs a reconstruction base (one template per "
                              f"position); {cfg.base} matches against N normal images: use query_side 'input'")
        self.net: CostFilterNet | None = None
        self.calibration: BlendCalibration | None = None
        self._last_loss = float("nan")
        self.terms: dict[str, float] = {}

    # --- the plug-in's own contract -------------------------------------------------------------
    @property
    def wants_class_ids(self) -> bool:
        """True when prediction reads the test image's class (``class_identity``)."""
        return bool(self.cfg.class_identity) and not self.base.aligned

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.base_method.input_spec

    def load_base(self, checkpoint_tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
                  path: str | None = None) -> None:
        """Load the trained base (its checkpoint's tensors and recorded identity)."""
        self.base_method.check_checkpoint(dict(meta or {}), path)
        self.base_method.load_state_dict(checkpoint_tensors)
        self.base_method.to(self.device, self.autocast_dtype)
        self.base_method.eval_mode()

    def extract_train_features(self, dataset: Any) -> dict[str, torch.Tensor]:
        """The features stage over an embedding base: the reference pool (clean crops, their global
        features, classes, rows) chosen from ``dataset`` with the filter's seed, exactly as
        training would choose it; :meth:`load_train_features` hands it to the training."""
        if not isinstance(self.base, EmbeddingBase):
            raise ValueError(f"costfilter over {self.cfg.base!r}: no features stage (its templates are reconstructions)")
        self.base.fit_references(dataset, self.cfg.seed, self.device)
        return {f"ref.{k}": v for k, v in self.base.state().items()}

    def load_train_features(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.base.load_state({k[len("ref."):]: v for k, v in tensors.items() if k.startswith("ref.")})

    # --- shapes ----------------------------------------------------------------------------------
    def _probe(self) -> BaseView:
        crop = int(self.input_spec["crop"])
        x = torch.zeros(1, 3, crop, crop, device=self.device)
        self.base_method.eval_mode()
        if isinstance(self.base, EmbeddingBase) and self.base.ref_global.shape[0] == 0:
            tokens, grid = self.base.layers(x)
            return BaseView(tokens, [t.repeat(1, self.cfg.templates, 1) for t in tokens], tokens, grid, None, None,
                            aligned=False)
        return self.base.view(x)

    def matching_channels(self, view: BaseView) -> int:
        h, w = view.grid
        pool = h * w if view.aligned else view.templates[0].shape[1]
        d = h * w if self.cfg.matching_channels is None else int(self.cfg.matching_channels)
        if d > pool and self.cfg.from_preset("matching_channels"):
            d = min(d, h * w)  # the official 768 is for Dinomaly's 28 x 28 grid
        if d > pool:
            raise ConfigError(f"costfilter: matching_channels={d} exceeds the {pool} template positions")
        return d

    def build_net(self, num_classes: int) -> CostFilterNet:
        """The filter for the base's shapes (read from one probe forward) and ``num_classes``."""
        view = self._probe()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            net = CostFilterNet(self.matching_channels(view), len(view.queries), [g.shape[-1] for g in view.guidance],
                                num_classes, self.cfg.base_width, self.cfg.squeeze)
        self.net = net.to(self.device)
        return self.net

    # --- placement ------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        mods = {f"base_{k}": m for k, m in self.base_method.modules().items()}
        if self.net is not None:
            mods["net"] = self.net
        return mods

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"net": self.net} if self.net is not None else {}

    def to(self, device, autocast_dtype=None) -> "CostFilter":
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.base_method.to(device, autocast_dtype)
        if self.net is not None:
            self.net.to(self.device)
        return self

    def train_mode(self, stage: str) -> None:
        self.base_method.eval_mode()
        if self.net is not None:
            self.net.train()

    def eval_mode(self) -> None:
        self.base_method.eval_mode()
        if self.net is not None:
            self.net.eval()

    # --- forward --------------------------------------------------------------------------------
    @property
    def guided_by_base(self) -> bool:
        """True when the matching guidance reads the base's map (``guidance_map: base``)."""
        return self.cfg.guidance_map == "base"

    @property
    def needs_base_prediction_in_training(self) -> bool:
        """The base's own evaluation output is needed in training only when it guides the filter."""
        return self.guided_by_base and self.cfg.base_map == "own"

    def volume_inputs(self, view: BaseView) -> tuple[torch.Tensor, torch.Tensor]:
        """(volume (B, D, L, S, S), or on the grid (B, D, L, h, w) with ``squeeze_at_grid``;
        guidance map (B, L, S, S): the per-layer minima, or the base map resized to S x S in every
        channel)."""
        cfg = self.cfg
        q, t = (view.templates, view.queries) if cfg.query_side == "template" else (view.queries, view.templates)
        size = None if cfg.squeeze_at_grid else cfg.volume_size
        volume, initial = build_volume(q, t, view.grid, self.matching_channels(view), size, cfg.cost_eps)
        if cfg.guidance_map == "min":
            gmap = initial
        else:
            if view.base_map is None:
                raise RuntimeError("costfilter: guidance_map 'base' needs the base map; the view was built without it")
            gmap = view.base_map[:, None].expand(-1, initial.shape[1], -1, -1)
        return volume, resize_maps(gmap.float(), cfg.volume_size)

    def filter(self, view: BaseView) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, 2, S, S), class logits (B, K))."""
        volume, gmap = self.volume_inputs(view)
        with self.autocast():
            logits, cls = self.net(volume, view.guidance, gmap, view.grid)
        return logits.float(), cls.float()

    # --- training -------------------------------------------------------------------------------
    def fit_stage(self, stage: str, loader: Iterable, trainer: Any) -> dict[str, float]:
        dataset = loader.dataset
        if self.net is None:
            self.build_net(len(getattr(dataset, "class_names", [])) or 1)
        if isinstance(self.base, EmbeddingBase) and self.base.ref_global.shape[0] == 0:
            # the pool comes from the clean crops: the augment hook (pseudo anomalies) is bypassed
            self.base.fit_references(getattr(dataset, "base", dataset), self.cfg.seed, self.device)
        return trainer.fit(self, stage, loader)

    def iterations_for(self, num_train_samples: int) -> int:
        """``epochs * floor(n / batch)`` (the released loader drops the last partial batch) unless
        ``iterations`` is set."""
        if self.cfg.iterations is not None:
            return int(self.cfg.iterations)
        return int(self.cfg.epochs) * self.steps_per_epoch(num_train_samples)

    def steps_per_epoch(self, num_train_samples: int) -> int:
        return max(1, int(num_train_samples) // int(self.cfg.batch_size))

    def configure_optimization(self, stage: str, num_train_samples: int) -> OptimSetup:
        cfg = self.cfg
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        iterations = self.iterations_for(num_train_samples)
        per_epoch = self.steps_per_epoch(num_train_samples)
        if cfg.iterations is not None:  # an explicit budget keeps the epoch count: knots scale
            per_epoch = max(1, iterations // max(1, int(cfg.epochs)))
        sched = EpochPlateau(opt, per_epoch, lambda: self._last_loss, cfg.plateau_factor, cfg.plateau_patience)
        return OptimSetup(optimizer=opt, scheduler=sched, iterations=iterations, grad_clip_norm=None, parameters=params)

    def rescale_schedule(self, setup: OptimSetup, iterations: int) -> OptimSetup:
        """A budget set by the engine: the plateau epochs scale with it (``epochs`` epochs in all)."""
        setup.scheduler.steps_per_epoch = max(1, iterations // max(1, int(self.cfg.epochs)))
        setup.iterations = iterations
        return setup

    def loss_weights(self) -> dict[str, float]:
        c = self.cfg
        return {"focal": c.focal_weight, "ce": c.ce_weight, "ssim": c.ssim_weight, "iou": c.iou_weight, "mse": c.mse_weight}

    def training_step(self, stage: str, batch: Mapping[str, Any], step: int) -> torch.Tensor:
        if not isinstance(batch, Mapping) or "mask" not in batch:
            raise KeyError("costfilter trains on batches with 'image', 'mask' and 'class_id' (pseudo anomalies)")
        images = batch["image"]
        class_ids = batch["class_id"].long()
        exclude = batch.get("index") if not self.base.aligned else None
        view = self.base.view(images, class_ids, exclude=exclude, with_prediction=self.needs_base_prediction_in_training)
        logits, cls = self.filter(view)
        loss, terms = costfilter_loss(logits, cls, batch["mask"].float(), class_ids, self.loss_weights(),
                                      self.cfg.gamma_rule, self.cfg.gamma0)
        self._last_loss = float(loss.detach())
        self.terms = {k: float(v.detach()) for k, v in terms.items()}
        return loss

    # --- inference ------------------------------------------------------------------------------
    def probability(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Sec. 3.4: P, the anomaly channel of the softmax, bilinearly resized to ``size``. (B, H, W)."""
        prob = torch.softmax(logits, dim=1)[:, 1:2]
        return F.interpolate(prob, size=size, mode="bilinear", align_corners=True)[:, 0]

    def output(self, logits: torch.Tensor, view: BaseView, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), scores (B,)): P alone (``blend`` 1), or blended with the base (the
        released code's ``lambda P + (1 - lambda) M_base``). With ``base_map: own`` M_base is the
        base's evaluation map and the score ``lambda s(P) + (1 - lambda) s_base`` (its own score);
        with ``cosine`` M_base is the grid map bilinearly resized and the score is read from the
        blended map (the released evaluation). With ``calibrate`` (preset ``calibrated``) P and s(P)
        are first mapped onto the base's units by the fitted :class:`BlendCalibration` and the
        weight is the calibrated one (:mod:`.calibration`)."""
        prob = self.probability(logits, size)
        if self.cfg.calibrate:
            cal = self.calibration
            if cal is None:
                raise RuntimeError("costfilter: calibrate is on but the filter has no calibration; it is fitted after "
                                   "training on the held-out normals (the validation split)")
            base, base_scores = self._base_outputs(view, size)
            return (blend(prob, base, cal.map_weight, cal.map_affine),
                    blend(self.image_score(prob), base_scores, cal.score_weight, cal.score_affine))
        lam = float(self.cfg.blend)
        if lam >= 1.0:
            return prob, self.image_score(prob)
        if view.base_map is None:
            raise RuntimeError("costfilter: blend < 1 needs the base map; the view was built without it")
        if self.cfg.base_map == "own":
            base, base_scores = self._base_outputs(view, size)
            maps = lam * prob + (1.0 - lam) * base
            return maps, lam * self.image_score(prob) + (1.0 - lam) * base_scores
        base = F.interpolate(view.base_map[:, None].float(), size=size, mode="bilinear", align_corners=True)[:, 0]
        maps = lam * prob + (1.0 - lam) * base
        return maps, self.image_score(maps)

    @staticmethod
    def _base_outputs(view: BaseView, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's own evaluation map (at ``size``) and image score, float32."""
        if view.prediction is None or view.base_map is None:
            raise RuntimeError("costfilter: the blend needs the base's own prediction; the view was built without it")
        base = view.base_map.float()
        if tuple(base.shape[-2:]) != tuple(size):
            base = F.interpolate(base[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        return base, view.prediction.scores.float()

    def image_score(self, maps: torch.Tensor) -> torch.Tensor:
        """Mean of the top ``max(score_topk, score_ratio * H * W)`` pixels (paper: 250; code: 1 %, at least 250)."""
        flat = maps.flatten(1)
        k = max(int(self.cfg.score_topk or 0), int(flat.shape[1] * float(self.cfg.score_ratio or 0.0)), 1)
        return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_ids: torch.Tensor | None = None) -> Prediction:
        if self.net is None:
            raise RuntimeError("costfilter: no filter network; train it or load a checkpoint first")
        self.eval_mode()
        view = self.base.view(images, class_ids if self.wants_class_ids else None, with_prediction=True)
        logits, _ = self.filter(view)
        maps, scores = self.output(logits, view, tuple(images.shape[-2:]))
        base = Prediction(scores=view.prediction.scores.float().cpu(), maps=view.prediction.maps.float().cpu())
        return Prediction(scores=scores.float().cpu(), maps=maps.float().cpu(), base=base)

    # --- calibration (preset calibrated) ------------------------------------------------------
    @property
    def wants_calibration(self) -> bool:
        return bool(self.cfg.calibrate)

    @property
    def validation_recipe(self) -> str:
        return str(self.cfg.calibration_recipe)

    @property
    def validation_copies(self) -> int:
        return int(self.cfg.calibration_copies)

    @torch.no_grad()
    def validation_outputs(self, dataset: Any, batch_size: int = 8) -> ValidationOutputs:
        """P, s(P), the base's own map and score, the masks and labels of every image of
        ``dataset`` (items with ``image``, ``mask``; a pseudo anomaly is an image with a non-empty
        mask), from one base forward per batch."""
        if self.net is None:
            raise RuntimeError("costfilter: no filter network to calibrate; train it first")
        self.eval_mode()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("p", "ps", "b", "bs", "m")}
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = torch.stack([torch.as_tensor(it["image"]) for it in items]).to(self.device)
            size = tuple(images.shape[-2:])
            view = self.base.view(images, None, with_prediction=True)
            logits, _ = self.filter(view)
            prob = self.probability(logits, size)
            base, base_scores = self._base_outputs(view, size)
            parts["p"].append(prob.cpu())
            parts["ps"].append(self.image_score(prob).cpu())
            parts["b"].append(base.cpu())
            parts["bs"].append(base_scores.cpu())
            parts["m"].append(torch.stack([torch.as_tensor(it["mask"]).reshape(size) > 0.5 for it in items]))
        masks = torch.cat(parts["m"])
        return ValidationOutputs(torch.cat(parts["p"]), torch.cat(parts["b"]), torch.cat(parts["ps"]),
                                 torch.cat(parts["bs"]), masks, masks.flatten(1).any(dim=1).long())

    def calibrate(self, normals: Any, pseudo: Any) -> dict[str, Any]:
        """Fit the blend (:mod:`.calibration`): P's map and score onto the base's units from the
        held-out ``normals``; the weight (unless ``blend`` is given) on ``normals`` + ``pseudo``
        (the same images with pseudo anomalies of ``calibration_recipe``). Returns the validation figures."""
        cfg = self.cfg
        clean = self.validation_outputs(normals, int(cfg.batch_size))
        if len(clean.labels) == 0:
            raise ValueError("costfilter: calibration needs at least one held-out normal image")
        q = float(cfg.calibration_quantile)
        map_affine = affine_onto(clean.p_maps, clean.base_maps, q)
        score_affine = affine_onto(clean.p_scores, clean.base_scores, q)
        fake = self.validation_outputs(pseudo, int(cfg.batch_size))
        n = len(clean.labels)
        if len(fake.labels) % n:
            raise ValueError(f"costfilter: {len(fake.labels)} pseudo-anomalous images for {n} held-out normals: "
                             "expected a whole number of copies of each")
        # the pseudo dataset is the normals' rows repeated: copy j of normal i is image j * n + i
        sources = torch.cat([torch.arange(n), torch.arange(len(fake.labels)) % n])
        val = ValidationOutputs(*(torch.cat([a, b]) for a, b in zip(
            (clean.p_maps, clean.base_maps, clean.p_scores, clean.base_scores, clean.masks, clean.labels * 0),
            (fake.p_maps, fake.base_maps, fake.p_scores, fake.base_scores, fake.masks, fake.labels))),
            sources=sources)
        candidates = cfg.blend_candidates if cfg.blend is None else [float(cfg.blend)]
        map_w, score_w, figures = choose_weights(val, map_affine, score_affine, candidates, cfg.blend_min_gain,
                                                 cfg.blend_confidence, cfg.blend_resamples)
        figures.update({"map_scale": map_affine[0], "map_shift": map_affine[1], "score_scale": score_affine[0],
                        "score_shift": score_affine[1], "weight_chosen": float(cfg.blend is None)})
        self.calibration = BlendCalibration(map_w, score_w, map_affine, score_affine, figures)
        return figures

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise RuntimeError("costfilter: nothing to save before the filter is built")
        out = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        out.update({f"base.{k}": v for k, v in self.base_method.state_dict().items()})
        out.update({f"ref.{k}": v.detach().cpu().contiguous() for k, v in self.base.state().items()})
        if self.calibration is not None:
            out.update({f"cal.{k}": v for k, v in self.calibration.state().items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        parts: dict[str, dict[str, torch.Tensor]] = {"net": {}, "base": {}, "ref": {}, "cal": {}}
        for key, t in state.items():
            head, _, rest = key.partition(".")
            if head not in parts:
                raise KeyError(f"costfilter: unexpected key {key!r} in saved state")
            parts[head][rest] = t
        self.base_method.load_state_dict(parts["base"])
        self.base_method.to(self.device, self.autocast_dtype)
        self.base.load_state(parts["ref"])
        if "cls_fc.weight" not in parts["net"]:
            raise KeyError("costfilter: the saved state has no filter network")
        if self.net is None:
            self.build_net(int(parts["net"]["cls_fc.weight"].shape[0]))
        self.net.load_state_dict(parts["net"], strict=True)
        self.calibration = BlendCalibration.from_state(parts["cal"]) if parts["cal"] else None

    # --- bookkeeping ----------------------------------------------------------------------------
    def identity(self) -> dict[str, str]:
        ident = super().identity()
        base = self.base_method.identity()
        ident.update(backbone=base["backbone"], crop=base["crop"])
        return ident

    def tags(self) -> dict[str, str]:
        cfg = self.cfg
        base_tags = {f"base_{k}": v for k, v in self.base_method.tags().items() if k != "method"}
        return {"method": self.name, "base": cfg.base, "costfilter_preset": cfg.preset, "query_side": cfg.query_side,
                "guidance_map": cfg.guidance_map, "base_map": cfg.base_map, "blend": str(cfg.blend), **base_tags,
                **self._calibration_tags()}

    def _calibration_tags(self) -> dict[str, str]:
        if self.calibration is None:
            return {}
        cal = self.calibration
        return {"blend": f"map {cal.map_weight:g}, score {cal.score_weight:g}", "blend_calibrated": "true",
                "blend_validation_recipe": str(self.cfg.calibration_recipe),
                "blend_map_affine": f"{cal.map_affine[0]:.6g},{cal.map_affine[1]:.6g}",
                "blend_score_affine": f"{cal.score_affine[0]:.6g},{cal.score_affine[1]:.6g}"}
