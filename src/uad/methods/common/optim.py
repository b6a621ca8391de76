"""Optimiser and learning-rate schedule of Dinomaly (Appendix B) and INP-Former++.

``StableAdamW`` is AdamW with per-tensor update clipping (Wortsman et al., "Stable and low-precision
training for large-scale vision-language models", 2023), with the AMSGrad option Dinomaly turns
on. Settled from the official Dinomaly optimiser:

* decoupled weight decay ``p <- p * (1 - lr * wd)`` is applied before the update;
* the clipping factor of a tensor is ``max(1, RMS(g / (sqrt(v_hat) + eps)) / clip_threshold)``
  with ``v_hat`` the bias-corrected (AMSGrad-maxed) second moment, i.e. the RMS of
  ``g^2 / v_hat`` under the square root; the step size ``lr / bias_correction1`` is divided by it;
* ``clip_threshold`` is 1.

``WarmCosineSchedule`` reproduces the official per-iteration schedule: ``lr`` rises linearly from
0 (iteration 0) to ``base_lr`` (iteration ``warmup_iters - 1``), then follows a cosine from
``base_lr`` (iteration ``warmup_iters``) towards ``final_lr``, and stays at ``final_lr`` from
``total_iters`` on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["EpochPlateau", "StableAdamW", "WarmCosineSchedule", "warm_cosine_lr"]


class StableAdamW(Optimizer):
    """AdamW + AMSGrad with StableAdamW update clipping; vectorised with ``torch._foreach_*``.

    State per parameter: ``step`` (a float32 CPU scalar tensor), ``exp_avg``, ``exp_avg_sq`` and,
    with AMSGrad, ``max_exp_avg_sq``: tensors only, so it flattens into safetensors.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        eps: float = 1e-10,
        amsgrad: bool = True,
        clip_threshold: float = 1.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid betas {betas}")
        if clip_threshold <= 0:
            raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
                        clip_threshold=clip_threshold)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        grads = [p.grad for p in params]
        states = []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(st)
        exp_avg = [st["exp_avg"] for st in states]
        exp_avg_sq = [st["exp_avg_sq"] for st in states]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1.0)
        step_vals = [float(s) for s in steps]  # CPU scalars: no device sync
        bc1 = [1.0 - beta1**s for s in step_vals]
        bc2_sqrt = [math.sqrt(1.0 - beta2**s) for s in step_vals]

        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)  # v = b2 v + (1 - b2) g^2
        second = exp_avg_sq
        if amsgrad:
            second = [st["max_exp_avg_sq"] for st in states]
            torch._foreach_maximum_(second, exp_avg_sq)
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)  # sqrt(v_hat) + eps

        # update clipping: RMS over each tensor of g / (sqrt(v_hat) + eps). Everything below stays
        # on the device as lists of 0-d tensors with Python-scalar factors: no host <-> device copy,
        # so the step never waits for the GPU.
        ratio = torch._foreach_div(grads, denom)
        clip = torch._foreach_norm(ratio)  # per tensor ||.||_2
        torch._foreach_div_(clip, [math.sqrt(float(p.numel())) for p in params])  # RMS
        torch._foreach_div_(clip, float(group["clip_threshold"]))
        torch._foreach_clamp_min_(clip, 1.0)  # the clip factor max(1, RMS / threshold)
        torch._foreach_mul_(clip, bc1)
        torch._foreach_reciprocal_(clip)
        torch._foreach_mul_(clip, float(lr))  # step size lr / (bias_correction1 * clip factor)

        update = torch._foreach_div(exp_avg, denom)  # m / (sqrt(v_hat) + eps)
        torch._foreach_mul_(update, clip)
        torch._foreach_sub_(params, update)


def warm_cosine_lr(it: int, base_lr: float, final_lr: float, total_iters: int, warmup_iters: int) -> float:
    """Learning rate at iteration ``it`` (0-based) of the official warm-up + cosine schedule."""
    if it >= total_iters:
        return float(final_lr)
    if it < warmup_iters:
        # numpy.linspace(0, base_lr, warmup_iters)[it]
        return float(base_lr) * it / (warmup_iters - 1) if warmup_iters > 1 else 0.0
    span = total_iters - warmup_iters
    return float(final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * (it - warmup_iters) / span)))


class WarmCosineSchedule(LRScheduler):
    """Per-iteration warm-up + cosine schedule (Dinomaly Appendix B); step it once per iteration.

    Sets every parameter group's ``lr`` to :func:`warm_cosine_lr` of the iteration count
    (``last_epoch``). ``state_dict``/``load_state_dict`` carry only plain numbers.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        base_lr: float,
        final_lr: float,
        total_iters: int,
        warmup_iters: int = 0,
        last_epoch: int = -1,
    ):
        if total_iters <= 0 or warmup_iters < 0 or warmup_iters > total_iters:
            raise ValueError(f"need 0 <= warmup_iters ({warmup_iters}) <= total_iters ({total_iters}), total > 0")
        self.base_lr = float(base_lr)
        self.final_lr = float(final_lr)
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, it: int) -> float:
        return warm_cosine_lr(it, self.base_lr, self.final_lr, self.total_iters, self.warmup_iters)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]


class EpochPlateau:
    """``ReduceLROnPlateau`` (mode min) stepped once per epoch on the epoch's last loss, driven by
    the engine's per-iteration ``step()`` (CostFilter-AD's released schedule).

    ``loss_fn()`` returns the last training loss (a float); ``steps_per_epoch`` iterations make an
    epoch. ``state_dict`` is JSON-friendly (the engine stores it in resume checkpoints)."""

    def __init__(self, optimizer: Optimizer, steps_per_epoch: int, loss_fn, factor: float = 0.5, patience: int = 5):
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.loss_fn = loss_fn
        self.iteration = 0

    def step(self) -> None:
        self.iteration += 1
        if self.iteration % self.steps_per_epoch == 0:
            self.plateau.step(float(self.loss_fn()))

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.plateau.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        inner = {k: v for k, v in self.plateau.state_dict().items() if k != "optimizer"}
        return {"iteration": self.iteration, "steps_per_epoch": self.steps_per_epoch,
                "plateau": {k: (float(v) if isinstance(v, float) else v) for k, v in inner.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        inner = dict(state["plateau"])
        for key in ("best", "mode_worse"):  # a JSON round trip writes inf as "inf"
            if key in inner:
                inner[key] = float("inf") if inner[key] is None else float(inner[key])
        self.plateau.load_state_dict({**self.plateau.state_dict(), **inner})
