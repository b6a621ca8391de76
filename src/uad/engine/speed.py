"""GPU fast paths shared by the methods: frozen weights held in the autocast dtype, and
``torch.compile`` with an eager fallback.

Both are exact or bounded rewrites of the eager path, never a different computation:

* :func:`hold_frozen_weights`. Under autocast every ``linear`` / ``conv`` casts its fp32 weight and
  bias to bf16 at every call; autocast caches that cast only for leaf tensors that require grad,
  so a *frozen* encoder pays it at every forward (hundreds of copy kernels per batch). Holding
  the weights and biases of the frozen module's Linear / Conv layers in the autocast dtype once
  gives the kernels the very same bf16 tensors autocast would have made, so the output is
  bit-for-bit that of the autocast path (tested on CPU). Norms, position embeddings, class /
  register tokens and layer-scale stay in fp32, as autocast leaves them. The fp32 values are kept
  on the CPU, so moving the method back to fp32 restores them exactly.
* :class:`HostResults`: the scoring loop's results gathered on the host behind the computation
  (maps cast to float16 on the device, copied through pinned buffers asynchronously).
* :class:`CompiledFn`. A callable compiled with ``torch.compile`` on its first call; if compiling
  or running the compiled graph raises (no C++ compiler, an unsupported op, a backend bug), one
  warning names the function and the error and the eager function is used from then on. Never a
  crash that eager would not have had.

:class:`CompileSpec` is the engine's ``compile`` setting parsed: off, or a mode and a backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger("uad.engine")

__all__ = ["CompileSpec", "CompiledFn", "GpuUtilisation", "HELD_LAYERS", "HostResults", "hold_frozen_weights",
           "held_dtype"]

#: module types whose weight and bias autocast casts to the lower precision at every call
HELD_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_MASTER = "_uad_fp32_master"  # attribute of the module holding the fp32 copies (CPU)


def held_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype ``module``'s matmul weights are held in by :func:`hold_frozen_weights`, or None."""
    return getattr(module, "_uad_held_dtype", None)


@torch.no_grad()
def hold_frozen_weights(module: nn.Module, dtype: torch.dtype | None) -> int:
    """Hold the weights and biases of ``module``'s Linear / Conv layers in ``dtype`` (``None``:
    back to the original fp32 values). ``module`` must be frozen (no parameter requires grad).
    Returns the number of tensors converted. Idempotent; see the module docstring."""
    current = held_dtype(module)
    if dtype == current:
        return 0
    if dtype is not None and any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"{type(module).__name__} has trainable parameters: only a frozen module's weights can be "
                         "held in a lower precision")
    master: dict[str, torch.Tensor] = getattr(module, _MASTER, None) or {}
    n = 0
    for name, sub in module.named_modules():
        if not isinstance(sub, HELD_LAYERS):
            continue
        for pname, p in sub.named_parameters(recurse=False):
            if p is None or not p.is_floating_point():
                continue
            key = f"{name}.{pname}"
            if dtype is None:
                if key in master:
                    p.data = master[key].to(p.device)
                    n += 1
                continue
            if key not in master:
                master[key] = p.detach().to("cpu", copy=True)
            p.data = master[key].to(p.device, dtype)
            n += 1
    if dtype is None:
        if hasattr(module, _MASTER):
            delattr(module, _MASTER)
        module._uad_held_dtype = None
    else:
        setattr(module, _MASTER, master)
        module._uad_held_dtype = dtype
    return n


@dataclass(frozen=True)
class CompileSpec:
    """The engine's ``compile`` setting: ``False`` (eager), ``True`` (mode ``default``) or a
    ``torch.compile`` mode (``default``, ``reduce-overhead`` = CUDA graphs, ``max-autotune``,
    ``max-autotune-no-cudagraphs``), with the backend (``inductor``; ``aot_eager`` traces without
    generating code, as the CPU tests do)."""

    enabled: bool = False
    mode: str | None = None
    backend: Any = "inductor"

    MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

    @classmethod
    def parse(cls, value: Any, backend: Any = "inductor") -> "CompileSpec":
        from uad.errors import ConfigError

        if value in (None, False, "false", "off", "none", ""):
            return cls(False)
        if value is True or value in ("true", "on"):
            return cls(True, None, backend)
        if isinstance(value, str) and value in cls.MODES:
            return cls(True, None if value == "default" else value, backend)
        raise ConfigError(f"engine.compile must be false, true or one of {list(cls.MODES)}, got {value!r}")

    def describe(self) -> str:
        if not self.enabled:
            return "eager"
        backend = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "custom")
        return f"torch.compile({backend}, mode={self.mode or 'default'})"


class CompiledFn:
    """``fn`` compiled on first call, eager after a failure (one warning). See the module docstring."""

    def __init__(self, fn: Callable[..., Any], name: str, spec: CompileSpec, dynamic: bool | None = False,
                 on_fail: Callable[[BaseException], None] | None = None):
        """``on_fail(error)``: called instead of :meth:`fall_back` on a failure (a method switches
        all its compiled functions to eager at once, with one warning)."""
        self.fn = fn
        self.name = name
        self.spec = spec
        self.dynamic = dynamic
        self.on_fail = on_fail
        self._compiled: Callable[..., Any] | None = None
        self.failed: str | None = None  # the error that switched this function to eager

    @property
    def active(self) -> bool:
        return self.spec.enabled and self.failed is None

    def fall_back(self, error: BaseException, warn: bool = True) -> None:
        """Use the eager function from now on, with one warning (none with ``warn=False``)."""
        if self.failed is None:
            self.failed = describe_error(error)
            if warn:
                log.warning("torch.compile of %s failed (%s); running it eagerly from now on", self.name, self.failed)
        self._compiled = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self.fn(*args, **kwargs)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, mode=self.spec.mode, backend=self.spec.backend,
                                               dynamic=self.dynamic)
            return self._compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            (self.on_fail or self.fall_back)(e)
            return self.fn(*args, **kwargs)


def describe_error(error: BaseException) -> str:
    """One line naming the root cause of a compiler error (the backend's own exception)."""
    root = getattr(error, "inner_exception", None) or error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = " ".join(line.strip() for line in str(root).strip().splitlines() if line.strip())[:300]
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


class GpuUtilisation:
    """Samples the GPU's utilisation (percent of time a kernel ran, as ``nvidia-smi`` reports it)
    every ``every`` seconds in a background thread while training runs; :meth:`stop` returns the
    mean, or None off CUDA or where neither NVML (``torch.cuda.utilization``) nor ``nvidia-smi``
    answers. A context manager."""

    def __init__(self, device: torch.device, every: float = 1.0):
        self.device, self.every = device, float(every)
        self.samples: list[float] = []
        self._stop = None
        self._thread = None

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - no NVML bindings: ask nvidia-smi
            import subprocess

            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", str(index)], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return None

    def __enter__(self) -> "GpuUtilisation":
        if self.device.type != "cuda" or self._read() is None:
            return self
        import threading

        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.every):
                value = self._read()
                if value is None:
                    return
                self.samples.append(value)

        self._thread = threading.Thread(target=loop, name="uad-gpu-utilisation", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float | None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        return sum(self.samples) / len(self.samples) if self.samples else None

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class HostResults:
    """Scores (float32), maps (float16) and masks (uint8) of a scoring pass, gathered on the host
    into arrays allocated once. On CUDA each batch's maps are cast to float16 on the device and
    copied into one of two pinned buffers asynchronously; a batch is read into the arrays only
    after the next one has been queued, so the copy overlaps the model instead of stalling it.
    The float16 values are those ``numpy.astype(float16)`` gives (both round to nearest even)."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.cuda = int(n), device.type == "cuda"
        self.scores: np.ndarray | None = None
        self.maps: np.ndarray | None = None
        self.masks: np.ndarray | None = None
        self.filled = 0
        self._pinned: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._flip = 0
        self._inflight: tuple[Any, torch.Tensor, torch.Tensor, int, int] | None = None

    def _alloc(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        h, w = maps.shape[-2:]
        self.scores = np.empty(self.n, np.float32)
        self.maps = np.empty((self.n, h, w), np.float16)
        self.masks = np.empty((self.n, *masks.shape[-2:]), np.uint8)

    def add(self, scores: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor) -> None:
        b = int(maps.shape[0])
        if self.maps is None:
            self._alloc(maps, masks)
        lo, hi = self.filled, self.filled + b
        if hi > self.n:
            raise ValueError(f"more results ({hi}) than samples ({self.n})")
        self.masks[lo:hi] = masks[:, 0].numpy().astype(np.uint8)
        self.filled = hi
        if not (self.cuda and maps.is_cuda):
            self.scores[lo:hi] = scores.float().cpu().numpy()
            self.maps[lo:hi] = maps.float().cpu().numpy().astype(np.float16)
            return
        if not self._pinned or self._pinned[0][1].shape[0] < b or self._pinned[0][1].shape[1:] != maps.shape[1:]:
            self._pinned = [(torch.empty(b, dtype=torch.float32, pin_memory=True),
                             torch.empty((b, *maps.shape[1:]), dtype=torch.float16, pin_memory=True)) for _ in range(2)]
            self._drain()  # the old buffers may still be in flight
        hs, hm = self._pinned[self._flip]
        self._flip ^= 1
        hs[:b].copy_(scores.float(), non_blocking=True)
        hm[:b].copy_(maps.to(torch.float16), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._drain()  # the previous batch: its copy has had this batch's compute to finish
        self._inflight = (event, hs, hm, lo, hi)

    def _drain(self) -> None:
        if self._inflight is None:
            return
        event, hs, hm, lo, hi = self._inflight
        self._inflight = None
        event.synchronize()
        self.scores[lo:hi] = hs[: hi - lo].numpy()
        self.maps[lo:hi] = hm[: hi - lo].numpy()

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._drain()
        if self.maps is None or self.filled != self.n:
            raise ValueError(f"scored {self.filled} of {self.n} samples")
        return self.scores, self.maps, self.masks
