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

import torch
from torch import nn

log = logging.getLogger("uad.engine")

__all__ = ["CompileSpec", "CompiledFn", "HELD_LAYERS", "hold_frozen_weights", "held_dtype"]

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
    """``fn`` compiled on first call, eager after a failure (one warning). See the module docstring.

    ``fallback_on_error=False`` re-raises errors of the compiled call instead (for tests)."""

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
