"""Score whole images with a trained model: the one inference path of the project.

:class:`Inferencer` is what the ``infer`` pipeline's node, the notebooks and the MLflow model
(:mod:`uad.framework.mlflow_model`) all call; its forward inputs go through the one scoring
loop's :func:`uad.engine.scoring.forward`::

    from uad import Inferencer

    inf = Inferencer.from_checkpoint("data/06_models/dinomaly/train.safetensors/<version>/train.safetensors",
                                     thresholds="data/08_reporting/dinomaly/thresholds.json/<version>/thresholds.json")
    for r in inf.predict(["part_001.png", pil_image, uint8_array]):
        print(r.source, r.score, r.decision, r.map.shape)   # the map at the image's own size

Frames (``frame``):

``full`` (default)
    Every pixel scored. The image is resized, keeping its aspect ratio, so that its shorter side
    is ``short_side`` px (default: the method's ``resize``, the scale it was trained at; a square
    image then looks exactly as in training before the centre crop). A method that takes any input
    size (:meth:`AnomalyMethod.input_multiple`: the ViT methods at their patch, PatchCore at its
    CNN stride) scores the whole resized image at once, its sides rounded to that multiple, unless
    its longer side exceeds ``max_side``; otherwise (and always for methods built for one input
    size: RLR, AGPNet, CostFilter-AD) the resized image is cut into tiles of the training crop,
    overlapping by ``tile_overlap``, the last tile of each row and column flush with the border.
    Tile maps are blended with a tent window (a pixel seen by one tile keeps that tile's value);
    the image score is the largest tile score.
``crop``
    The evaluation's protocol exactly (square resize, centre crop): the score equals the
    ``predict`` node's for the same image. The map comes back at the image's size with NaN where
    the crop never looked.

Maps are returned at each input image's own height and width (bilinear from the scored grid).
Decisions apply the stored thresholds (``score >= image threshold``); a non-finite score is an
``error``, never a verdict.

Core library: torch / numpy / PIL only (``from_catalog`` reads the catalog's folders; a logged MLflow
model is opened by :func:`uad.framework.mlflow_model.inferencer_from_mlflow`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from uad.engine.scoring import forward, normalise_uint8
from uad.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Inferencer", "ImageResult", "FramePlan", "plan_frame", "stitch", "frame_options", "load_trained",
           "split_group_state", "GROUP_SEP", "FRAMES"]

#: separator of a one-model-per-class checkpoint's keys: ``<class>::<tensor name>``
GROUP_SEP = "::"
FRAMES = ("full", "crop")


def split_group_state(state: Mapping[str, torch.Tensor], group: str | None) -> dict[str, torch.Tensor]:
    """The tensors of one class's model in a one-model-per-class checkpoint (all of them for
    ``group=None``)."""
    if group is None:
        return dict(state)
    prefix = f"{group}{GROUP_SEP}"
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def holds_per_class_models(meta: Mapping[str, Any]) -> bool:
    """True when a checkpoint (its ``meta``) or a run (its ``data`` parameters) holds one model per
    class: the ``one_class`` setting, or ``per_class: true`` (few-shot per class)."""
    return meta.get("setting") == "one_class" or bool(meta.get("per_class"))


def load_trained(method_name: str | None, method_params: Mapping[str, Any] | None, tensors: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any], path: str | None, class_name: str | None = None, what: str = "infer"):
    """The method rebuilt from its parameters (those recorded in the checkpoint when
    ``method_params`` is None) with the checkpoint's weights; a one-model-per-class checkpoint
    needs ``class_name``. ``what`` names the parameter block in the error messages."""
    from uad.methods.registry import build_method

    name = method_name or meta.get("method")
    if not name:
        raise ConfigError(f"{path or 'the checkpoint'} does not record its method: it was not written by this project")
    params = dict(meta.get("params") or {}) if method_params is None else dict(method_params)
    method = build_method(str(name), params)
    method.check_checkpoint(meta, path)
    group = None
    if holds_per_class_models(meta):
        classes = list(meta.get("classes") or [])
        if not class_name:
            raise ConfigError(f"{path} holds one model per class ({', '.join(classes)}): "
                              f"set {what}.class_name to the class of these images")
        if class_name not in classes:
            raise ConfigError(f"{what}.class_name {class_name!r} is not a class of {path} ({', '.join(classes)})")
        group = class_name
    method.load_state_dict(split_group_state(tensors, group))
    return method


def frame_options(params: Mapping[str, Any], batch_size: int = 8) -> dict[str, Any]:
    """:class:`Inferencer` keyword arguments from a parameter block (``params:infer`` or
    ``params:export``: ``frame``, ``short_side``, ``max_side``, ``tile_overlap``), types checked
    with one clear error naming the key."""
    opts: dict[str, Any] = {"frame": params.get("frame", "full") or "full", "short_side": params.get("short_side"),
                            "max_side": params.get("max_side", 1024), "tile_overlap": params.get("tile_overlap", 0.25),
                            "batch_size": int(batch_size), "backend": params.get("backend") or "torch",
                            "backend_model": params.get("backend_model"),
                            "backend_precision": params.get("backend_precision") or "fp32"}
    for key in ("short_side", "max_side"):
        val = opts[key]
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ConfigError(f"infer.{key}: {val!r} is not a positive integer (or null)")
    try:
        opts["tile_overlap"] = float(opts["tile_overlap"])
    except (TypeError, ValueError):
        raise ConfigError(f"infer.tile_overlap: {opts['tile_overlap']!r} is not a number in [0, 1)") from None
    return opts


# ---------------------------------------------------------------------------------------- frames
@dataclass(frozen=True)
class FramePlan:
    """How one image is scored: resized to ``size`` (h, w), then either whole (``tiles`` empty)
    or as ``tile`` x ``tile`` pieces at the top-left corners ``tiles``. For the ``crop`` frame,
    ``size`` is the square resize and ``tiles`` the one centre-crop corner."""

    frame: str
    size: tuple[int, int]
    tile: int | None = None
    tiles: tuple[tuple[int, int], ...] = ()

    @property
    def pieces(self) -> int:
        return max(1, len(self.tiles))


def _offsets(length: int, tile: int, step: int) -> list[int]:
    """Tile starts covering ``[0, length)``: evenly spread, the first at 0, the last flush with
    the end, neighbours at most ``step`` apart."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / step) + 1
    return sorted({int(round(v)) for v in np.linspace(0, length - tile, n)})


def plan_frame(height: int, width: int, spec: Mapping[str, Any], multiple: int | None, frame: str = "full",
               short_side: int | None = None, max_side: int | None = 1024, tile_overlap: float = 0.25) -> FramePlan:
    """The plan for an image of ``height`` x ``width`` px (see the module docstring).

    ``spec``: the method's ``input_spec`` (``resize``, ``crop``); ``multiple``: the method's
    :meth:`input_multiple` (None: it takes only ``crop`` x ``crop`` inputs)."""
    resize, crop = int(spec["resize"]), int(spec["crop"])
    if frame == "crop":
        o = int(round((resize - crop) / 2.0))
        return FramePlan("crop", (resize, resize), crop, ((o, o),))
    if frame != "full":
        raise ConfigError(f"infer.frame: {frame!r} is not one of {', '.join(FRAMES)}")
    short = int(short_side or resize)
    if short < crop:
        raise ConfigError(f"infer.short_side: {short} is smaller than the model's crop ({crop} px); "
                          f"use at least {crop} or null (the training scale, {resize})")
    scale = short / min(height, width)
    h, w = max(crop, int(round(height * scale))), max(crop, int(round(width * scale)))
    if multiple and (max_side is None or max(h, w) <= int(max_side)):
        h, w = (max(multiple, int(round(v / multiple)) * multiple) for v in (h, w))
        return FramePlan("full", (h, w))
    if not 0.0 <= float(tile_overlap) < 1.0:
        raise ConfigError(f"infer.tile_overlap: {tile_overlap} is not in [0, 1); 0.25 overlaps neighbouring tiles by a quarter")
    step = max(1, int(round(crop * (1.0 - float(tile_overlap)))))
    corners = tuple((y, x) for y in _offsets(h, crop, step) for x in _offsets(w, crop, step))
    return FramePlan("full", (h, w), crop, corners)


def _tent(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.float32)
    return np.minimum(i + 1.0, n - i)


def stitch(pieces: Sequence[np.ndarray], plan: FramePlan) -> np.ndarray:
    """Tile maps blended into one map of ``plan.size`` (tent weights: a pixel inside one tile
    only keeps that tile's value; overlaps fade from one tile to the next)."""
    h, w = plan.size
    t = int(plan.tile)
    win = np.outer(_tent(t), _tent(t))
    acc = np.zeros((h, w), np.float64)
    wsum = np.zeros((h, w), np.float64)
    for (y, x), m in zip(plan.tiles, pieces):
        acc[y:y + t, x:x + t] += win * m
        wsum[y:y + t, x:x + t] += win
    return (acc / np.maximum(wsum, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------------------- results
@dataclass
class ImageResult:
    """One scored image.

    ``status``: ``ok``, ``unreadable`` (the input could not be decoded) or ``error`` (the model
    returned a non-finite score or map); ``error`` says why. ``score``: the image anomaly score
    (NaN unless ``ok``); ``decision``: ``anomalous`` (score at or above the image threshold),
    ``normal``, ``unknown`` (no threshold) or ``error``;
    ``map``: float32 (height, width) at the image's own size (None when maps were not asked for
    or the image failed); ``anomalous_area``: the fraction of scored pixels at or above the pixel
    threshold (None without one); ``size``: the image's (height, width); ``pieces``: how many
    forward inputs scored it (1 whole frame, or the number of tiles)."""

    source: str
    score: float
    decision: str
    map: np.ndarray | None = None
    anomalous_area: float | None = None
    size: tuple[int, int] = (0, 0)
    frame: str = "full"
    pieces: int = 1
    status: str = "ok"
    error: str = ""
    image: np.ndarray | None = field(default=None, repr=False)  #: the decoded RGB image when ``keep_images``

    def as_row(self) -> dict[str, Any]:
        return {"source": self.source, "status": self.status, "error": self.error, "score": self.score,
                "decision": self.decision, "anomalous_area": self.anomalous_area, "height": self.size[0],
                "width": self.size[1], "frame": self.frame, "pieces": self.pieces}


def _read_thresholds(thresholds: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if thresholds is None:
        return {}
    if isinstance(thresholds, Mapping):
        return dict(thresholds)
    path = Path(thresholds)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"thresholds file {path} does not exist: give the thresholds.json the evaluation "
                          f"stored, or image_threshold=") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"thresholds file {path} is not readable JSON ({e}): rerun the evaluation, or give "
                          f"image_threshold=") from None
    if not isinstance(data, dict):
        raise ConfigError(f"thresholds file {path} holds a {type(data).__name__}, not an object with 'image'")
    return data


def _decode(item: Any, index: int) -> tuple[str, np.ndarray]:
    """``(source, uint8 (H, W, 3))`` of one input: a path, a PIL image, a uint8 array (H, W),
    (H, W, 3) or (H, W, 4), or encoded image bytes."""
    from uad.data.images import ImageReadError, load_image, to_rgb_uint8

    if isinstance(item, (str, os.PathLike)):
        return str(item), load_image(item)
    if isinstance(item, Image.Image):
        return f"<image {index}>", to_rgb_uint8(item, f"<image {index}>")
    if isinstance(item, (bytes, bytearray, memoryview)):
        import io

        name = f"<bytes {index}>"
        try:
            im = Image.open(io.BytesIO(bytes(item)))
            im.load()
        except Exception as e:
            raise ImageReadError(name, f"not a decodable image ({type(e).__name__}: {e})") from None
        return name, to_rgb_uint8(im, name)
    arr = np.asarray(item)
    name = f"<array {index}>"
    if arr.dtype != np.uint8:
        raise ImageReadError(name, f"dtype {arr.dtype}: give uint8 RGB values 0-255 (e.g. np.asarray(PIL image))")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(name, f"shape {tuple(np.asarray(item).shape)}: give (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey")
    return name, np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------ inferencer
class Inferencer:
    """A trained method with its thresholds, scoring images of any size (see the module docstring).

    Build it with :meth:`from_checkpoint`, :meth:`from_catalog` or :meth:`from_model_folder`; or directly
    from a loaded ``method`` (the ``infer`` node does: the catalog already loaded the checkpoint).

    ``backend``: ``torch`` (default), ``onnxruntime`` or ``openvino``: the forward inputs go
    through the exported graph (``backend_model``: an exported ``.onnx`` / OpenVINO ``.xml``, fp32,
    fp16 or INT8; exported here in fp32 when None) with ``backend_precision`` (OpenVINO: ``fp32``
    or ``bf16``) and ``backend_threads``; an exported graph takes the training crop, so the full
    frame is tiled (``frame="crop"`` equals the torch backend's scores to 1e-4 in fp32).

    ``image_threshold`` / ``pixel_threshold`` override the stored ones. ``device``: ``auto``
    (CUDA when present), ``cpu``, ``cuda``, ...; ``precision``: ``bf16`` autocast on CUDA (as
    the engine), ``fp32`` everywhere. ``batch_size``: forward inputs per batch (tiles or whole
    frames of one shape)."""

    def __init__(self, method, thresholds: Mapping[str, Any] | str | os.PathLike | None = None, *,
                 class_name: str | None = None, classes: Sequence[str] = (), frame: str = "full",
                 short_side: int | None = None, max_side: int | None = 1024, tile_overlap: float = 0.25,
                 batch_size: int = 8, device: str = "auto", precision: str = "bf16", workers: int = 2,
                 image_threshold: float | None = None, pixel_threshold: float | None = None,
                 progress: bool | None = None, provenance: Mapping[str, Any] | None = None,
                 engine: Any = None, backend: str = "torch", backend_model: str | os.PathLike | bytes | None = None,
                 backend_precision: str = "fp32", backend_threads: int | None = None):
        from uad.engine import EngineConfig, Trainer

        if frame not in FRAMES:
            raise ConfigError(f"infer.frame: {frame!r} is not one of {', '.join(FRAMES)}; full scores every pixel, "
                              f"crop repeats the evaluation's centre crop")
        for key, val in (("batch_size", batch_size), ("workers", workers)):
            if not isinstance(val, int) or isinstance(val, bool) or val < (1 if key == "batch_size" else 0):
                raise ConfigError(f"infer.{key}: {val!r} is not a {'positive' if key == 'batch_size' else 'non-negative'} integer")
        if max_side is not None and (not isinstance(max_side, int) or max_side < int(method.input_spec["crop"])):
            raise ConfigError(f"infer.max_side: {max_side!r} is not an integer >= the crop "
                              f"({method.input_spec['crop']}); null scores any size whole")
        self.method = method
        self.frame, self.short_side, self.max_side, self.tile_overlap = frame, short_side, max_side, float(tile_overlap)
        self.batch_size, self.workers, self.progress = int(batch_size), int(workers), progress
        self.provenance = dict(provenance or {})
        self.class_name = class_name
        stored = _read_thresholds(thresholds)
        self.threshold_frame = "crop" if stored else "none"
        if frame == "full" and isinstance(stored.get("full"), Mapping):
            stored, self.threshold_frame = dict(stored["full"]), "full"
        elif frame == "full" and stored.get("image") is not None and image_threshold is None:
            log.warning("%s: the stored thresholds were set on the evaluation's centre crop; the full frame scores "
                        "the border too, so normal images may score higher (rerun the evaluation to store "
                        "full-frame thresholds, or set image_threshold)", method.name)
        self.thresholds = {
            "image": stored.get("image"), "image_source": stored.get("image_source", "stored" if stored.get("image") is not None else "none"),
            "pixel": stored.get("pixel"), "pixel_source": stored.get("pixel_source", "stored" if stored.get("pixel") is not None else "none")}
        for key, val in (("image", image_threshold), ("pixel", pixel_threshold)):
            if val is not None:
                try:
                    self.thresholds[key], self.thresholds[f"{key}_source"] = float(val), "user"
                except (TypeError, ValueError):
                    raise ConfigError(f"infer.{key}_threshold: {val!r} is not a number") from None
        self.class_id: int | None = None
        self.vocab = sorted(classes)
        self.wants_class = bool(method.wants_class_ids)
        if self.wants_class and class_name is not None:
            if class_name not in self.vocab:
                raise ConfigError(f"infer.class_name {class_name!r} is not a class of the model "
                                  f"({', '.join(self.vocab) or 'unknown classes'})")
            self.class_id = self.vocab.index(class_name)
        cfg = engine if engine is not None else EngineConfig.from_params({"device": device, "precision": precision})
        self.trainer = Trainer(cfg)
        self.trainer.prepare(method)
        method.eval_mode()
        self.device = self.trainer.device
        self.spec = method.input_spec
        self.multiple = method.input_multiple()
        self._mean = torch.tensor(self.spec["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.backend = backend
        self._runner = self._backend_runner(backend, backend_model, backend_precision, backend_threads)
        if self._runner is not None:
            self.multiple = None  # an exported graph takes the training crop: the full frame is tiled

    def _backend_runner(self, backend: str, model: Any, precision: str, threads: int | None):
        """None for ``torch``; else the exported graph (``model``: an ``.onnx`` / OpenVINO ``.xml``
        file or ONNX bytes; exported here in fp32 when None) on onnxruntime or OpenVINO
        (:func:`uad.deploy.runtime.make_runner`)."""
        from uad.deploy.runtime import BACKENDS, RuntimeConfigError, make_runner

        self.backend_check: dict[str, Any] = {"checked": False}

        if backend not in BACKENDS:
            raise ConfigError(f"infer.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "torch":
            return None
        if self.wants_class:
            raise ConfigError(f"infer.backend: {self.method.name} reads each image's class, which the exported graph "
                              f"does not take; use backend torch")
        if model is None:
            from uad.deploy.export import export_uint8_onnx

            log.info("%s: exporting the fp32 ONNX graph for the %s backend", self.method.name, backend)
            model, _ = export_uint8_onnx(self.method, check=False)
            self.method.to(self.device, None)
        elif not isinstance(model, (bytes, bytearray)) and not Path(model).is_file():
            raise ConfigError(f"infer.backend_model: {model} is not a file; give an exported .onnx or OpenVINO .xml "
                              f"(kedro run --pipeline=export writes them under data/06_models/<method>/deploy)")
        try:
            runner = make_runner(model, backend, threads, precision)
            self.backend_check = _check_deployed(runner, model, backend, precision)
            return runner
        except RuntimeConfigError as e:
            raise ConfigError(str(e)) from None
        except ImportError as e:
            raise ConfigError(f"infer.backend: {backend} is not installed ({e}); pip install -e \".[deploy]\"") from None

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, thresholds: Mapping[str, Any] | str | os.PathLike | None = None,
                        class_name: str | None = None, **options: Any) -> "Inferencer":
        """From a trained method's final checkpoint (``.safetensors`` written by a training run;
        the method and its parameters are read from it). ``thresholds``: a dict or the
        ``thresholds.json`` the evaluation stored; without one, pass ``image_threshold=`` or read
        only scores and maps (decisions are then ``unknown``)."""
        from uad.engine.checkpoint import load_state

        tensors, meta = load_state(path)
        method = load_trained(None, None, tensors, meta, str(path), class_name)
        prov = {"checkpoint": str(path), "method": meta.get("method"), "trained_in_run": meta.get("mlflow_run_id", ""),
                "classes": list(meta.get("classes") or []), "setting": meta.get("setting", "")}
        return cls(method, thresholds, class_name=class_name, classes=meta.get("classes") or (), provenance=prov, **options)

    @classmethod
    def from_catalog(cls, method: str, version: str | None = None, *, project_path: str | os.PathLike | None = None,
                     env: str | None = None, class_name: str | None = None, **options: Any) -> "Inferencer":
        """Inside a Kedro project: the method's (or plug-in namespace's, ``costfilter_patchcore``)
        latest trained checkpoint and thresholds from the catalog, or the checkpoint ``version``
        (a timestamp folder name)."""
        from uad.methods.declaration import split_namespace
        from uad.methods.registry import method_class

        root = Path(project_path or os.getcwd()).resolve()
        base_name = split_namespace(method)[0]
        try:
            stage = method_class(base_name).stages[-1]
        except Exception:
            raise ConfigError(f"unknown method {method!r}: give a method's pipeline name (dinomaly, costfilter_patchcore, ...)") from None
        ckpt_dir = root / "data" / "06_models" / method / f"{stage}.safetensors"
        thr_dir = root / "data" / "08_reporting" / method / "thresholds.json"
        ckpt = _version_file(ckpt_dir, version, f"no trained {method} model in {ckpt_dir}: run kedro run --pipeline={method} first")
        thr = _version_file(thr_dir, None, "")
        if thr is None:
            log.warning("%s: no stored thresholds in %s; scores and maps only (pass image_threshold=)", method, thr_dir)
        return cls.from_checkpoint(ckpt, thr, class_name=class_name, **options)

    @classmethod
    def from_model_folder(cls, folder: str | os.PathLike, **options: Any) -> "Inferencer":
        """From a model folder written by the ``export`` pipeline (the MLflow model's files, once
        downloaded: ``artifacts/<checkpoint>.safetensors``, ``thresholds.json``, ``inference.json``).
        :func:`uad.framework.mlflow_model.inferencer_from_mlflow` downloads one by its MLflow URI."""
        local = Path(folder)
        arts = local / "artifacts"
        ckpt = next(iter(sorted(arts.glob("*.safetensors"))), None) if arts.is_dir() else None
        if ckpt is None:
            raise ConfigError(f"{local} holds no checkpoint artifact: it was not written by this project's export pipeline")
        thr = arts / "thresholds.json"
        settings = json.loads((arts / "inference.json").read_text()) if (arts / "inference.json").is_file() else {}
        return cls.from_checkpoint(ckpt, thr if thr.is_file() else None, **{**settings, **options})

    # --------------------------------------------------------------------------------- scoring
    def settings(self) -> dict[str, Any]:
        """The frame settings (what the MLflow model stores beside the checkpoint)."""
        return {"frame": self.frame, "short_side": self.short_side, "max_side": self.max_side,
                "tile_overlap": self.tile_overlap, "class_name": self.class_name}

    def plan(self, height: int, width: int) -> FramePlan:
        return plan_frame(height, width, self.spec, self.multiple, self.frame, self.short_side, self.max_side,
                          self.tile_overlap)

    def _prepare(self, img: np.ndarray, plan: FramePlan) -> list[torch.Tensor]:
        """The forward inputs (uint8 (3, h, w) tensors) of one image under ``plan``."""
        h, w = plan.size
        if img.shape[:2] != (h, w):
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
        if not img.flags.writeable:  # PIL's arrays are read-only; torch wants to own writable memory
            img = img.copy()
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        if not plan.tiles:
            return [t]
        s = int(plan.tile)
        return [t[:, y:y + s, x:x + s] for y, x in plan.tiles]

    @torch.no_grad()
    def _forward(self, batch: list[torch.Tensor], class_ids: list[int] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        if self._runner is not None:  # the exported graph takes the uint8 batch and normalises it itself
            maps, scores = self._runner(torch.stack(batch).numpy())
            return np.asarray(scores, dtype=np.float32), list(np.asarray(maps, dtype=np.float32))
        x = normalise_uint8(torch.stack(batch).to(self.device, non_blocking=True), self._mean.to(self.device),
                            self._std.to(self.device))
        ids = torch.tensor(class_ids, dtype=torch.long, device=self.device) if self.wants_class else None
        out = forward(self.method, x, ids)
        maps = out.maps.float().cpu().numpy()
        return out.scores.float().cpu().numpy(), list(maps)

    def predict(self, images: Iterable[Any] | Any, maps: bool = True, keep_images: bool = False,
                strict: bool = False, class_names: Sequence[str] | None = None) -> list[ImageResult]:
        """Score ``images`` (paths, PIL images, uint8 arrays or encoded bytes; one or a list).

        An input that cannot be decoded is returned with ``status='error'`` and the reason (or
        raised with ``strict``). ``maps=False`` skips the maps (scores and decisions only);
        ``keep_images`` keeps each decoded image on its result (for overlays). ``class_names``:
        each image's class, for a method that reads it (CostFilter-AD over an embedding base);
        ``class_name`` of the constructor otherwise."""
        items = list(images) if isinstance(images, (list, tuple)) else (
            [images] if isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray, np.ndarray)) else list(images))
        self._ids = self._class_ids(len(items), class_names)
        from uad.progress import progress

        show = self.progress if self.progress is not None else len(items) > 16
        results: list[ImageResult] = []
        chunk = max(self.batch_size, 1) * 4
        bar = progress(total=len(items), desc=f"{self.method.name}:infer", unit="img", enabled=bool(show))
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            for start in range(0, len(items), chunk):
                part = list(enumerate(items[start:start + chunk], start))
                decoded = list(pool.map(lambda p: self._safe_decode(p[1], p[0], strict), part))
                results.extend(self._score_chunk(decoded, maps, keep_images, self._ids[start:start + chunk]))
                bar.update(len(part))
        bar.close()
        return results

    def _class_ids(self, n: int, class_names: Sequence[str] | None) -> list[int]:
        if not self.wants_class:
            return [0] * n
        if class_names is None:
            if self.class_id is None:
                raise ConfigError(f"{self.method.name} reads the class of each image: set infer.class_name to one of "
                                  f"{', '.join(self.vocab) or '(the training classes)'}")
            return [self.class_id] * n
        unknown = sorted(set(class_names) - set(self.vocab))
        if unknown or len(class_names) != n:
            raise ConfigError(f"class names {unknown or len(class_names)} do not match the model's classes "
                              f"({', '.join(self.vocab)}) or the {n} images")
        return [self.vocab.index(c) for c in class_names]

    def _safe_decode(self, item: Any, index: int, strict: bool):
        try:
            source, img = _decode(item, index)
            plan = self.plan(*img.shape[:2])
            return source, img, plan, self._prepare(img, plan), ""
        except ConfigError:
            raise
        except Exception as e:
            if strict:
                raise
            source = str(item) if isinstance(item, (str, os.PathLike)) else f"<input {index}>"
            return source, None, None, [], str(e) or type(e).__name__

    def _score_chunk(self, decoded: list, want_maps: bool, keep_images: bool, ids: list[int]) -> list[ImageResult]:
        # every forward input of the chunk, grouped by shape so whole frames of one size batch together
        jobs: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, (_, _, _, pieces, _) in enumerate(decoded):
            for k, p in enumerate(pieces):
                jobs.setdefault(tuple(p.shape[1:]), []).append((i, k))
        piece_scores: dict[tuple[int, int], float] = {}
        piece_maps: dict[tuple[int, int], np.ndarray] = {}
        for keys in jobs.values():
            for b in range(0, len(keys), self.batch_size):
                sel = keys[b:b + self.batch_size]
                scores, maps = self._forward([decoded[i][3][k] for i, k in sel], [ids[i] for i, _ in sel])
                for (i, k), s, m in zip(sel, scores, maps):
                    piece_scores[(i, k)], piece_maps[(i, k)] = float(s), m
        out = []
        for i, (source, img, plan, pieces, err) in enumerate(decoded):
            if err:
                out.append(ImageResult(source, float("nan"), "error", status="unreadable", error=err, frame=self.frame))
                continue
            scores = [piece_scores[(i, k)] for k in range(len(pieces))]
            score = float(max(scores))
            amap = self._assemble([piece_maps[(i, k)] for k in range(len(pieces))], plan, img.shape[:2]) if want_maps else None
            out.append(self._result(source, score, amap, img, plan, keep_images))
        return out

    def _assemble(self, maps: list[np.ndarray], plan: FramePlan, size: tuple[int, int]) -> np.ndarray:
        """The scored map(s) of one image brought to its own ``size``."""
        h, w = size
        if plan.frame == "crop":
            # the crop's map placed in the square resize, then that square brought back to the image
            r = plan.size[0]
            canvas = torch.full((1, 1, r, r), float("nan"))
            (y, x), s = plan.tiles[0], int(plan.tile)
            canvas[0, 0, y:y + s, x:x + s] = torch.from_numpy(maps[0])
            valid = torch.zeros((1, 1, r, r))
            valid[0, 0, y:y + s, x:x + s] = 1.0
            filled = F.interpolate(torch.nan_to_num(canvas, nan=0.0), size=(h, w), mode="bilinear", align_corners=False)
            cover = F.interpolate(valid, size=(h, w), mode="bilinear", align_corners=False)
            res = filled[0, 0].numpy()
            res[cover[0, 0].numpy() < 0.999] = np.nan
            return res.astype(np.float32)
        grid = maps[0] if not plan.tiles else stitch(maps, plan)
        if grid.shape == (h, w):
            return np.ascontiguousarray(grid, dtype=np.float32)
        t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
        return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()

    def _result(self, source: str, score: float, amap: np.ndarray | None, img: np.ndarray, plan: FramePlan,
                keep_images: bool) -> ImageResult:
        thr = self.thresholds
        if not math.isfinite(score) or (amap is not None and not np.isfinite(amap[~np.isnan(amap)] if plan.frame == "crop" else amap).all()):
            return ImageResult(source, float("nan"), "error", None, None, tuple(img.shape[:2]), plan.frame, plan.pieces,
                               "error", "the model returned a non-finite score or map (a damaged checkpoint, or an "
                               "input far outside what it was trained on)", img if keep_images else None)
        decision = "unknown" if thr["image"] is None else ("anomalous" if score >= float(thr["image"]) else "normal")
        area = None
        if amap is not None and thr["pixel"] is not None:
            valid = amap[~np.isnan(amap)]
            area = float((valid >= float(thr["pixel"])).mean()) if valid.size else None
        return ImageResult(source, score, decision, amap, area, tuple(img.shape[:2]), plan.frame, plan.pieces,
                           image=img if keep_images else None)


def _check_deployed(runner, model: Any, backend: str, precision: str) -> dict[str, Any]:
    """A model file of an exported folder (``deploy.json`` beside it, with its self-test) checked
    on this CPU against the export's torch reference, as :class:`uad.deploy.runtime.DeployedModel`
    does on load; a bare file or bytes: not checked."""
    from uad.deploy.runtime import check_against_reference, read_manifest

    if isinstance(model, (bytes, bytearray)) or not (Path(model).parent / "deploy.json").is_file():
        return {"checked": False}
    spec = read_manifest(Path(model).parent)
    key = next((k for k, f in (spec.get("models") or {}).items() if f == Path(model).name), None)
    return {"checked": False} if key is None else check_against_reference(runner, spec, key, backend, precision)


def _version_file(folder: Path, version: str | None, missing: str) -> Path | None:
    """The file inside a Kedro versioned dataset's folder: ``<folder>/<version>/<folder name>``
    (the newest version when ``version`` is None)."""
    if version is not None:
        path = folder / version / folder.name
        if not path.is_file():
            have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise ConfigError(f"no version {version} of {folder}" + (f"; versions: {', '.join(have[-5:])}" if have else ""))
        return path
    found = sorted(p for p in folder.glob(f"*/{folder.name}") if p.is_file()) if folder.is_dir() else []
    if not found:
        if missing:
            raise ConfigError(missing)
        return None
    return found[-1]
