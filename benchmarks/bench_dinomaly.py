"""Speed of Dinomaly: training iterations/s and inference images/s.

Measures, for each backbone size and crop size,

* ``train it/s``: full optimisation steps per second (frozen encoder forward under no_grad,
  bottleneck + decoder forward/backward, Loose Loss with hard mining, grad-norm clip 0.1,
  StableAdamW step, schedule step) at the given training batch size;
* ``infer img/s``: images per second through :meth:`Dinomaly.predict` (encoder, decoder, cosine
  maps, upsampling to the crop, Gaussian blur, top-1% score, copy to CPU).

Weights are random (speed does not depend on them, and no download is needed). On CUDA the
method runs under bf16 autocast, as the training engine does. Only the core library is imported
(no Kedro, no MLflow): the accelerator machine has just torch, timm and torchvision.

Usage::

    python benchmarks/bench_dinomaly.py --device cpu                   # small batch, few iterations
    python benchmarks/bench_dinomaly.py --device cuda --batch 16 --infer-batch 16
    python benchmarks/bench_dinomaly.py --backbones vits --crops 224 --warmup 1 --iters 2

Rates come from the *median* time of the timed iterations (robust to bursts of other work on a
shared machine). ``load avg`` is the 1-minute load average when a row started.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

try:
    import uad  # noqa: F401
except ImportError:  # a bare checkout (the accelerator machine): use src/ directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from uad.methods.dinomaly import Dinomaly

BACKBONES = {"vits": "dinov2_vits14_reg", "vitb": "dinov2_vitb14_reg", "vitl": "dinov2_vitl14_reg"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    proc = platform.processor() or platform.machine()
    return f"{proc}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(backbone: str, crop: int, device: torch.device) -> Dinomaly:
    m = Dinomaly({"backbone": backbone, "weights": "random", "allow_random": True, "resize": crop, "crop": crop})
    return m.to(device, torch.bfloat16 if device.type == "cuda" else None)


def bench_train(m: Dinomaly, batch: int, crop: int, warmup: int, iters: int, device: torch.device) -> float:
    setup = m.configure_optimization("train", 1000)
    images = torch.randn(batch, 3, crop, crop, device=device)

    def step(i: int) -> None:
        m.train_mode("train")
        with m.autocast():
            loss = m.training_step("train", {"image": images}, 1000 + i)
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(setup.parameters, setup.grad_clip_norm)
        setup.optimizer.step()
        setup.scheduler.step()

    for i in range(warmup):
        step(i)
    times = []
    for i in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        step(warmup + i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def bench_infer(m: Dinomaly, batch: int, crop: int, warmup: int, iters: int, device: torch.device) -> float:
    images = torch.randn(batch, 3, crop, crop, device=device)
    for _ in range(warmup):
        m.predict(images)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        m.predict(images)  # returns CPU tensors: includes the device -> host copy
        _sync(device)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    ap.add_argument("--backbones", default="vits,vitb", help=f"comma list of {sorted(BACKBONES)}")
    ap.add_argument("--crops", default="224,392", help="comma list of crop sizes (multiples of 14)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 16 on CUDA, 1 on CPU)")
    ap.add_argument("--infer-batch", type=int, default=None, help="inference batch (default 16 on CUDA, 1 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 5 CUDA, 2 CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 CUDA, 3 CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    logging.getLogger("uad.backbones").setLevel(logging.ERROR)  # random weights on purpose
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    cuda = device.type == "cuda"
    batch = args.batch or (16 if cuda else 1)
    infer_batch = args.infer_batch or (16 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    iters = args.iters or (20 if cuda else 3)
    if cuda:
        torch.backends.cudnn.benchmark = True

    print(f"device: {device_name(device)}; torch {torch.__version__}; "
          f"{'bf16 autocast' if cuda else 'fp32'}; {warmup} warm-up + {iters} timed iterations (median); "
          f"{_dt.date.today().isoformat()}")
    print(f"command: python benchmarks/bench_dinomaly.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print()
    print("| backbone | crop | tokens | train batch | train it/s | train img/s | infer batch | infer img/s | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        name = BACKBONES.get(key, key)
        for crop in [int(c) for c in args.crops.split(",") if c.strip()]:
            m = build(name, crop, device)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            tr = bench_train(m, batch, crop, warmup, iters, device)
            inf = bench_infer(m, infer_batch, crop, warmup, iters, device)
            n = (crop // m.encoder.patch_size) ** 2
            print(f"| {name} | {crop} | {n} | {batch} | {tr:.3f} | {tr * batch:.2f} | {infer_batch} | {inf:.2f} | {load:.1f} |",
                  flush=True)
            del m
            if cuda:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
