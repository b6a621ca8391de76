"""The contract every anomaly-detection method implements.

A method is a plain object (no Kedro, no MLflow) built from a name and a parameter dict by
:func:`uad.methods.registry.build_method`. The shared training engine
(:class:`uad.engine.trainer.Trainer`) drives its optimisation loop; the Kedro template pipeline
(``uad.framework.pipelines.method``) only calls the methods below, so every method runs through the same
train -> predict -> evaluate nodes.

Lifecycle::

    method = build_method("dinomaly", params)          # paper defaults + overrides
    for stage in method.stages:                        # e.g. ("train",) or ("reconstruction", "residual")
        method.fit_stage(stage, train_loader, trainer)
    state = method.state_dict()                        # only what is learned: safetensors-safe
    method.load_state_dict(state)                      # on a fresh object, same params
    out = method.predict(images)                       # batched, no_grad, maps at input size
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from uad.errors import CheckpointMismatchError, ConfigError


def check_param_names(config_class: type, params: Mapping[str, Any], label: str) -> None:
    """Unknown keys of a method's parameter dict raise one :class:`~uad.errors.ConfigError` that
    lists the valid ones (a misspelt parameter must never be ignored)."""
    valid = sorted(f.name for f in dataclasses.fields(config_class))
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"unknown {label} parameter(s) {unknown}; valid parameters: {', '.join(valid)}")
    from uad.params import check_types

    check_types(config_class, params, f"{label}.method")


def parse_list_params(params: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """List parameters as lists, in place: from the command line, where Kedro splits ``--params``
    on commas, a list is written with ``+`` (``layers=2+3``, ``attention=lca+mlka``); a single
    value becomes a one-element list. ``betas`` becomes a tuple of floats."""
    if params.get("betas") is not None:
        params["betas"] = tuple(float(b) for b in params["betas"])
    from uad.params import cli_list

    for key in keys:
        val = cli_list(params.get(key))
        if val is not None:
            params[key] = val
    return params


@dataclass
class Prediction:
    """Batched output of :meth:`AnomalyMethod.predict`.

    ``scores``: (B,) image anomaly scores, float32 on CPU.
    ``maps``: (B, H, W) pixel anomaly maps at the input image size (the crop size), float32 on CPU.
    ``base``: for a plug-in over a base detector, the base's own prediction of the same batch.
    """

    scores: torch.Tensor
    maps: torch.Tensor
    #: a plug-in's base detector's own prediction of the same images (CostFilter-AD), else None
    base: "Prediction | None" = None


@dataclass
class OptimSetup:
    """What :meth:`AnomalyMethod.configure_optimization` returns for one training stage."""

    optimizer: torch.optim.Optimizer
    scheduler: Any | None = None  # a torch LR scheduler, stepped once per iteration
    iterations: int = 1000  # total optimisation steps for the stage
    grad_clip_norm: float | None = None  # clip the total gradient norm of ``parameters``
    parameters: list[nn.Parameter] = field(default_factory=list)


class AnomalyMethod(abc.ABC):
    """Base class of every method. Subclasses set ``name`` and ``stages``."""

    name: str = "base"
    stages: tuple[str, ...] = ("train",)
    #: True when every use of the frozen ``encoder`` runs under :meth:`autocast`: its Linear / Conv
    #: weights are then held in the autocast dtype once (:func:`uad.engine.speed.hold_frozen_weights`)
    #: instead of being cast at every call; same output, bit for bit.
    hold_frozen_encoder: bool = False

    #: True when :meth:`predict` reads each image's class id (``predict(images, class_ids=...)``)
    wants_class_ids: bool = False

    @classmethod
    def declaration(cls):
        """This method's :class:`~uad.methods.declaration.MethodDeclaration` (its folder's
        ``declaration.py``); a class registered at run time without one (a test's) is declared as
        its class attributes say: no features stage, no pseudo anomalies, no base."""
        from .declaration import MethodDeclaration, declarations

        found = declarations().get(cls.name)
        if found is not None:
            return found
        return MethodDeclaration.undeclared(cls.name, cls.__module__, tuple(cls.stages))

    @classmethod
    def uses_feature_cache(cls) -> bool:
        """A features stage caches frozen-encoder features that :meth:`fit_from_features` fits from
        (declared ``features_stage``; the class is a :class:`~uad.methods.capabilities.FeatureFitting`)."""
        return bool(cls.declaration().features_stage)

    def __init__(self, params: Mapping[str, Any] | None = None):
        self.params = dict(params or {})
        self.device = torch.device("cpu")
        self.autocast_dtype: torch.dtype | None = None

    # --- data -----------------------------------------------------------------------------
    @property
    def input_spec(self) -> dict[str, Any]:
        """How images must be prepared: ``{"resize": int, "crop": int, "mean": (3,), "std": (3,)}``.

        Default: ``resize`` / ``crop`` of the method's config (``self.cfg``), mean / std of its
        encoder's weights (``self.encoder.data_config``)."""
        dc = self.encoder.data_config
        return {"resize": int(self.cfg.resize), "crop": int(self.cfg.crop), "mean": tuple(dc["mean"]), "std": tuple(dc["std"])}

    def build_encoder(self, kind: str | None = None, **kwargs: Any) -> nn.Module:
        """The frozen encoder named by the config (``backbone``, ``weights``, ``layers``,
        ``allow_random``); ``kind`` (``"cnn"`` / ``"vit"``) refuses the other kind clearly."""
        from uad.backbones import build_backbone  # local import keeps `import uad.methods` light

        cfg = self.cfg
        kwargs.setdefault("layers", getattr(cfg, "layers", None))
        encoder = build_backbone(cfg.backbone, weights=cfg.weights, allow_random=cfg.allow_random, **kwargs)
        if kind is not None and encoder.kind != kind:
            raise ConfigError(f"{self.name} needs a {kind.upper()} backbone; {cfg.backbone!r} is a {encoder.kind}")
        return encoder

    # --- placement ------------------------------------------------------------------------
    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Every nn.Module the method owns (frozen encoder included), keyed by a stable name."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights are learned and saved. Default: all but ``encoder``."""
        return {k: m for k, m in self.modules().items() if k != "encoder"}

    def to(self, device: torch.device | str, autocast_dtype: torch.dtype | None = None) -> "AnomalyMethod":
        """Move every module to ``device``; ``autocast_dtype`` (bf16 on CUDA, from the engine's
        ``precision``) turns :meth:`autocast` on, and with :attr:`hold_frozen_encoder` holds the
        frozen encoder's matmul weights in that dtype (``None`` restores their fp32 values)."""
        from uad.engine.speed import hold_frozen_weights

        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        for m in self.modules().values():
            m.to(self.device)
        enc = self.modules().get("encoder")
        if enc is not None and self.hold_frozen_encoder:
            hold_frozen_weights(enc, autocast_dtype)
        return self

    def enable_compile(self, spec: Any) -> list[str]:
        """Route the method's hot functions through ``torch.compile`` (a
        :class:`uad.engine.speed.CompileSpec`) with an eager fallback; returns what was compiled
        (empty: this method has no compiled path and stays eager)."""
        return []

    def compile_fallback(self, error: BaseException) -> None:
        """A compiled training or inference step failed outside the compiled functions themselves
        (a lazily compiled backward, say): switch everything back to eager, with one warning."""

    def train_mode(self, stage: str) -> None:
        """Put modules in train/eval mode for ``stage``; the frozen encoder always stays in eval."""
        for k, m in self.modules().items():
            m.train(k in self.trainable_modules())
        enc = self.modules().get("encoder")
        if enc is not None:
            enc.eval()

    def eval_mode(self) -> None:
        for m in self.modules().values():
            m.eval()

    # --- training -------------------------------------------------------------------------
    def configure_optimization(self, stage: str, num_train_samples: int) -> OptimSetup | None:
        """Optimiser and schedule for a gradient-trained stage; ``None`` for a stage that is fit
        in one pass (a memory bank, say), in which case :meth:`fit_stage` is overridden."""
        return None

    def training_step(self, stage: str, batch: Mapping[str, Any], step: int) -> torch.Tensor:
        """One optimisation step's loss for ``batch`` (already on ``self.device``)."""
        raise NotImplementedError(f"{self.name} has no gradient-trained stage {stage!r}")

    def adapt_to_setting(self, setting: str) -> None:
        """Apply a paper's per-setting schedule (e.g. Dinomaly's class-separated budget) before
        training; ``setting`` is the data setting (``multi_class``, ``one_class``, ...)."""

    def after_optimizer_step(self, stage: str, step: int) -> None:
        """Called by the engine after optimiser step ``step`` (0-based): a mean teacher's EMA
        update, say. Default: nothing."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors that training needs to resume exactly but inference never reads (a mean
        teacher, say): saved in resume checkpoints only, not in the final model. Default: none."""
        return {}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise KeyError(f"{self.name}: unexpected training state {sorted(state)[:5]}")

    def train_augment(self, setting: str) -> tuple[int, Any] | None:
        """``(folds, augment)`` when the method's paper trains ``setting`` on an augmented copy of
        the data (few-shot: each image ``folds`` times, ``augment(image_uint8, index)`` in the
        dataset's hook contract); ``None`` (default) trains on the images as they are."""
        return None

    @classmethod
    def wants_synthesis(cls, stage: str) -> bool:
        """True when ``stage`` trains on pseudo anomalies from the synthesis stage (declared)."""
        return stage in cls.declaration().synthesis

    @classmethod
    def synthesis_stages(cls) -> dict[str, str]:
        """``{stage: recipe}`` of the stages that learn from pseudo anomalies (empty: none), as declared."""
        return cls.declaration().synthesis_stages()

    @classmethod
    def synthesis_recipe(cls, stage: str) -> str:
        """The pseudo-anomaly recipe the method's paper trains ``stage`` with
        (:data:`uad.synthesis.RECIPES`, declared); ``synthesis.recipe`` in the parameters overrides it."""
        return cls.declaration().synthesis.get(stage, "draem")

    def fit_stage(self, stage: str, loader: Iterable, trainer: Any) -> dict[str, float]:
        """Fit one stage. Default: hand the loop to the shared engine."""
        return trainer.fit(self, stage, loader)

    # --- inference ------------------------------------------------------------------------
    @abc.abstractmethod
    def predict(self, images: torch.Tensor) -> Prediction:
        """Scores and maps for a normalised batch (B, 3, H, W) already on ``self.device``."""

    def input_multiple(self) -> int | None:
        """The inputs the method takes besides its training ``crop`` square: ``None`` (default)
        when it is built for that one size (learned positional parts, a fixed cost volume), else
        ``m`` when any height and width that are multiples of ``m`` work (full-frame inference,
        :mod:`uad.inference`, then scores a whole non-square image at once instead of in tiles)."""
        return None

    def predict_on_device(self, images: torch.Tensor) -> Prediction:
        """:meth:`predict` with scores and maps allowed to stay on ``self.device`` (the scoring
        loop then reduces and copies them to the host asynchronously). Default: :meth:`predict`."""
        return self.predict(images)

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Learned state as a flat ``{name: tensor}`` dict (safetensors-safe, no pickles)."""
        out: dict[str, torch.Tensor] = {}
        for k, m in self.trainable_modules().items():
            for n, t in m.state_dict().items():
                out[f"{k}.{n}"] = t.detach().cpu().contiguous()
        out.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in self.extra_state().items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        mods = self.trainable_modules()
        grouped: dict[str, dict[str, torch.Tensor]] = {k: {} for k in mods}
        extra: dict[str, torch.Tensor] = {}
        for key, t in state.items():
            head, _, rest = key.partition(".")
            if head == "extra":
                extra[rest] = t
            elif head in grouped:
                grouped[head][rest] = t
            else:
                raise KeyError(f"{self.name}: unexpected key {key!r} in saved state")
        for k, m in mods.items():
            m.load_state_dict(grouped[k], strict=True)
        self.load_extra_state(extra)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-module learned tensors (a PatchCore memory bank, say)."""
        return {}

    def load_extra_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise KeyError(f"{self.name}: unexpected extra state {sorted(state)}")

    # --- bookkeeping ----------------------------------------------------------------------
    def resolved_params(self) -> dict[str, Any]:
        """Every parameter as the method runs with it: the config's fields (code defaults
        included) when the method has a config, else the given parameters. A change of a code
        default between versions then changes this too (resume keys, checkpoint identity)."""
        cfg = getattr(self, "cfg", None)
        if cfg is not None and hasattr(cfg, "as_dict"):
            return dict(cfg.as_dict())
        return dict(self.params)

    def identity(self) -> dict[str, str]:
        """What a checkpoint of this method must match to be loaded: the method, its backbone and
        crop; plus a hash of all its resolved parameters (recorded, reported on a mismatch)."""
        cfg = getattr(self, "cfg", None)
        blob = json.dumps(self.resolved_params(), sort_keys=True, default=str).encode()
        return {"method": self.name, "backbone": str(getattr(cfg, "backbone", "")),
                "crop": str(self.input_spec["crop"]), "params_sha": hashlib.sha256(blob).hexdigest()[:12]}

    def check_checkpoint(self, meta: Mapping[str, Any], path: str | None = None) -> None:
        """Raise one clear :class:`~uad.errors.CheckpointMismatchError` when a checkpoint's recorded
        identity (``meta``) is not this method's, instead of hundreds of missing-key lines."""
        mine = self.identity()
        made = {k: str(meta[k]) for k in ("method", "backbone", "crop") if meta.get(k) not in (None, "")}
        wrong = [k for k, v in made.items() if v != mine[k]]
        if not wrong:
            return

        def describe(d: Mapping[str, Any]) -> str:
            extra = ", ".join(f"{k} {d[k]}" for k in ("backbone", "crop", "params_sha") if d.get(k))
            return f"{d.get('method', '?')} ({extra})" if extra else str(d.get("method", "?"))

        raise CheckpointMismatchError(
            f"checkpoint {path or '<memory>'} was made by {describe(meta)}, but this run expects "
            f"{describe(mine)}: pick a checkpoint of this method and settings (--load-versions) or retrain"
        )

    def tags(self) -> dict[str, str]:
        """Run tags (backbone name, weights source, ...) for MLflow."""
        return {"method": self.name}

    def encoder_tags(self) -> dict[str, str]:
        """The method and its frozen encoder: name, where its weights came from, its layers."""
        info = self.encoder.weights_info
        return {"method": self.name, "backbone": self.encoder.name, "weights_source": info.source,
                "weights_path": info.path or "", "layers": ",".join(str(i) for i in self.encoder.layers)}

    def autocast(self):
        """Context manager: autocast to ``autocast_dtype`` when set (the engine sets bf16 on CUDA
        only; the CPU tests set it to check the bf16 paths), a no-op otherwise."""
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return torch.autocast(self.device.type, enabled=False)
