"""Timing helpers shared by the method benchmarks (``bench_<method>.py``).

Core library only (no Kedro, no MLflow), so the scripts run on the accelerator machine that has
just torch, timm and torchvision. Importing this module also puts ``src/`` on ``sys.path`` when
the ``uad`` package is not installed (a bare checkout).

* :func:`common_parser` - the shared command line (device, backbones, crops, batch sizes,
  warm-up / timed iterations, CPU threads) with CPU-friendly defaults;
* :func:`setup_run` - applies it: device, thread count, defaults per device, cudnn benchmark;
* :func:`device_name`, :func:`sync`, :func:`header`;
* :func:`rate` - calls per second of a function after warm-up calls (device-synchronised);
* :func:`train_step` - one optimisation step exactly as :class:`uad.engine.Trainer` runs it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

try:
    import uad  # noqa: F401
except ImportError:  # a bare checkout (the accelerator machine): use src/ directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

__all__ = [
    "BACKBONES",
    "RunSettings",
    "common_parser",
    "device_name",
    "header",
    "rate",
    "setup_run",
    "sync",
    "train_step",
]

BACKBONES = {"vits": "dinov2_vits14_reg", "vitb": "dinov2_vitb14_reg", "vitl": "dinov2_vitl14_reg"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    proc = platform.processor() or platform.machine()
    return f"{proc}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[int], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Calls of ``fn(i)`` per second over ``iters`` timed calls after ``warmup`` untimed ones."""
    for i in range(warmup):
        fn(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(iters):
        fn(warmup + i)
    sync(device)
    return iters / (time.perf_counter() - t0)


def train_step(method, stage: str, setup, batch: Mapping[str, torch.Tensor], step: int) -> float:
    """One step as the engine does it: train mode, autocast, loss, backward, clip, optimiser and
    schedule step. Returns the loss."""
    method.train_mode(stage)
    with method.autocast():
        loss = method.training_step(stage, batch, step)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if setup.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(setup.parameters, setup.grad_clip_norm)
    setup.optimizer.step()
    if setup.scheduler is not None:
        setup.scheduler.step()
    return float(loss.detach())


def common_parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    ap.add_argument("--backbones", default="vits,vitb", help=f"comma list of {sorted(BACKBONES)} or backbone names")
    ap.add_argument("--crops", default="224,392", help="comma list of crop sizes (multiples of 14)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 16 on CUDA, 2 on CPU)")
    ap.add_argument("--infer-batch", type=int, default=None, help="inference batch (default 16 on CUDA, 2 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 5 CUDA, 1 CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 CUDA, 3 CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return ap


@dataclass
class RunSettings:
    device: torch.device
    cuda: bool
    batch: int
    infer_batch: int
    warmup: int
    iters: int
    backbones: list[str]
    crops: list[int]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.cuda else None


def setup_run(args: argparse.Namespace) -> RunSettings:
    logging.getLogger("uad.backbones").setLevel(logging.ERROR)  # random weights on purpose
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    return RunSettings(
        device=device,
        cuda=cuda,
        batch=args.batch or (16 if cuda else 2),
        infer_batch=args.infer_batch or (16 if cuda else 2),
        warmup=args.warmup if args.warmup is not None else (5 if cuda else 1),
        iters=args.iters or (20 if cuda else 3),
        backbones=[BACKBONES.get(b.strip(), b.strip()) for b in args.backbones.split(",") if b.strip()],
        crops=[int(c) for c in args.crops.split(",") if c.strip()],
    )


def header(run: RunSettings, script: str, argv: list[str] | None) -> str:
    """Two lines naming the device, precision, iteration counts, date and the exact command."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    return (
        f"device: {device_name(run.device)}; torch {torch.__version__}; "
        f"{'bf16 autocast' if run.cuda else 'fp32'}; {run.warmup} warm-up + {run.iters} timed iterations; "
        f"{_dt.date.today().isoformat()}\ncommand: python benchmarks/{script} {args}".rstrip()
    )
