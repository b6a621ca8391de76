"""Timing helpers shared by the method benchmarks (``bench_<method>.py``).

Core library only (no Kedro, no MLflow), so the scripts run on the accelerator machine that has
just torch, timm and torchvision. Importing this module also puts ``src/`` on ``sys.path`` when
the ``uad`` package is not installed (a bare checkout).

* :func:`common_parser` - the shared command line (device, backbones, crops, batch sizes,
  warm-up / timed iterations, CPU threads) with CPU-friendly defaults;
* :func:`setup_run` - applies it: device, thread count, defaults per device, cudnn benchmark;
* :func:`device_name`, :func:`sync`, :func:`header`, :func:`footer` (total wall time),
  :func:`load_avg`;
* :func:`build` - a method with random weights at a crop, on the device (bf16 on CUDA);
  :func:`release` - frees the CUDA cache after a configuration;
* :func:`rate` - calls per second of a function after warm-up calls, from the *median* time of
  the timed calls (each bracketed by a device synchronisation; robust to bursts of other work on
  a shared machine);
* :func:`train_step` - one optimisation step exactly as :class:`uad.engine.Trainer` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import os
import platform
import statistics
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
    "float64_everywhere",
    "BACKBONES",
    "RunSettings",
    "build",
    "common_parser",
    "device_name",
    "footer",
    "header",
    "load_avg",
    "rate",
    "release",
    "setup_run",
    "sync",
    "train_step",
]

BACKBONES = {"vits": "dinov2_vits14_reg", "vitb": "dinov2_vitb14_reg", "vitl": "dinov2_vitl14_reg"}


@contextlib.contextmanager
def float64_everywhere():
    """For an equivalence check in float64: new tensors default to float64, ``Tensor.float()``
    keeps float64 and the legacy ``torch.FloatTensor(...)`` constructor makes float64 tensors (the
    released codes and ours call them: CostFilter-AD's focal loss builds its one-hot target with
    ``torch.FloatTensor``, whose float32 ``1 - 1e-5`` alone moves the loss by ~1e-9 of itself), for
    the duration of the block."""
    saved_float, saved_dtype, saved_ft = torch.Tensor.float, torch.get_default_dtype(), torch.FloatTensor
    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = lambda self, *a, **k: self.to(torch.float64)  # type: ignore[method-assign]
    torch.FloatTensor = torch.DoubleTensor  # type: ignore[misc]
    try:
        yield
    finally:
        torch.Tensor.float = saved_float  # type: ignore[method-assign]
        torch.FloatTensor = saved_ft  # type: ignore[misc]
        torch.set_default_dtype(saved_dtype)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    proc = platform.processor() or platform.machine()
    return f"{proc}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_spreads: list[float] = []  # max / min time of the timed calls, one entry per rate() figure


def load_avg() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def rate(fn: Callable[[int], Any], warmup: int, iters: int, device: torch.device, pipelined: bool = False) -> float:
    """Calls of ``fn(i)`` per second after ``warmup`` untimed calls.

    ``pipelined=False``: 1 / the median time of ``iters`` calls, each bracketed by a device
    synchronisation (robust to bursts of other work on a shared CPU machine). ``pipelined=True``:
    ``iters`` calls back to back with one synchronisation at each end, as a training loop or the
    scoring loop runs them (the CPU queues call ``i + 1`` while the GPU runs call ``i``): the
    throughput a run gets on a GPU."""
    for i in range(warmup):
        fn(i)
    if pipelined:
        sync(device)
        t0 = time.perf_counter()
        for i in range(iters):
            fn(warmup + i)
        sync(device)
        return iters / (time.perf_counter() - t0)
    times = []
    for i in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn(warmup + i)
        sync(device)
        times.append(time.perf_counter() - t0)
    _spreads.append(max(times) / min(times))
    return 1.0 / statistics.median(times)


def train_step(method, stage: str, setup, batch: Mapping[str, torch.Tensor], step: int, sync: bool = True):
    """One step exactly as the engine runs it (:func:`uad.engine.trainer.optimisation_step`).
    Returns the loss as a float (``sync=False``: the device tensor, no host sync)."""
    from uad.engine.trainer import optimisation_step

    loss = optimisation_step(method, stage, setup, batch, step)
    return float(loss) if sync else loss


def build(method_cls: type, backbone: str, crop: int, run: "RunSettings"):
    """``method_cls`` (a :class:`uad.methods` method) with random weights, resize = crop, on the
    run's device with the engine's autocast dtype (bf16 on CUDA): its frozen encoder held in bf16
    unless ``--no-hold``, its hot functions compiled when ``--compile`` says so."""
    from uad.engine.speed import CompileSpec

    m = method_cls({"backbone": backbone, "weights": "random", "allow_random": True, "resize": crop, "crop": crop})
    if not run.hold:
        m.hold_frozen_encoder = False
    m.to(run.device, run.autocast_dtype)
    spec = CompileSpec.parse(run.compile)
    if spec.enabled:
        m.enable_compile(spec)
    return m


def release(run: "RunSettings") -> None:
    """Call after dropping a configuration's model: returns cached CUDA memory."""
    if run.cuda:
        torch.cuda.empty_cache()


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
    ap.add_argument("--infer-batches", default=None,
                    help="comma list of inference batches to time (default: --infer-batch); e.g. 16,64")
    ap.add_argument("--compile", default="false", help="engine.compile: false, true, reduce-overhead, max-autotune")
    ap.add_argument("--no-hold", action="store_true",
                    help="keep the frozen encoder in fp32 under autocast (the path before the bf16-held encoder)")
    ap.add_argument("--timing", choices=["auto", "median", "pipelined"], default="auto",
                    help="median of synchronised calls, or back-to-back calls (auto: pipelined on CUDA)")
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
    started: float = 0.0  # time.perf_counter() when the run was set up
    compile: str = "false"
    hold: bool = True
    pipelined: bool = False

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
        started=time.perf_counter(),
        compile=str(getattr(args, "compile", "false")),
        hold=not getattr(args, "no_hold", False),
        pipelined=getattr(args, "timing", "auto") == "pipelined" or (getattr(args, "timing", "auto") == "auto" and cuda),
    )


def header(run: RunSettings, script: str, argv: list[str] | None) -> str:
    """Two lines naming the device, precision, iteration counts, date and the exact command."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    return (
        f"device: {device_name(run.device)}; torch {torch.__version__}; "
        f"{'bf16 autocast' if run.cuda else 'fp32'}{'' if not run.cuda else (', encoder held in bf16' if run.hold else ', encoder fp32 cast per call')}; "
        f"compile: {run.compile}; {run.warmup} warm-up + {run.iters} timed iterations "
        f"({'back to back' if run.pipelined else 'median'}); "
        f"{_dt.date.today().isoformat()}\ncommand: python benchmarks/{script} {args}".rstrip()
    )


def footer(run: RunSettings) -> str:
    """Total wall time since :func:`setup_run`, the 1-minute load average now, and the largest
    slowest / fastest ratio of the timed iterations behind any one figure (stability check)."""
    spread = f"{(max(_spreads) - 1) * 100:.0f} %" if _spreads else "n/a"
    return (f"total wall time: {time.perf_counter() - run.started:.0f} s; load avg at end: {load_avg():.2f}; "
            f"largest spread of the timed iterations of one figure (slowest / fastest - 1): {spread}")


def infer_rate(m, b: int, crop: int, run: "RunSettings") -> float:
    """Images per second of the scoring loop's path at batch ``b``: ``predict_on_device`` (maps and
    scores left on the device), then :class:`uad.engine.speed.HostResults` (float16 on the device,
    pinned asynchronous copy, read behind the next batch)."""
    from uad.engine.speed import HostResults

    test = torch.randn(b, 3, crop, crop, device=run.device)
    masks = torch.zeros(b, 1, crop, crop)
    host = HostResults(b * (run.warmup + run.iters), run.device)
    predict = getattr(m, "predict_on_device", m.predict)
    r = rate(lambda i: host.add(*_scores_maps(predict(test)), masks), run.warmup, run.iters, run.device, run.pipelined)
    host.result()
    return r * b


def _scores_maps(out) -> tuple[torch.Tensor, torch.Tensor]:
    return out.scores, out.maps


def bench_method(method_cls: type, script: str, doc: str | None, argv: list[str] | None,
                 stage_labels: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None) -> int:
    """The benchmark table of one method: training it/s and img/s of every stage it declares,
    then inference img/s. The batch carries an image and a pseudo-anomaly mask, so stages that
    learn from synthetic anomalies (INP-Former++'s residual stage) time their real step.
    ``defaults``: the method's own command-line defaults (e.g. its backbones and sizes)."""
    parser = common_parser(doc)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    run = setup_run(args)
    print(header(run, script, argv))
    print()
    labels = None
    infer_batches = [int(b) for b in str(args.infer_batches or run.infer_batch).split(",") if b.strip()]
    for name in run.backbones:
        for crop in run.crops:
            m = build(method_cls, name, crop, run)
            if labels is None:
                labels = [(stage_labels or {}).get(s, s) for s in m.stages]
                cols = "".join(f" {lab} it/s | {lab} img/s |" for lab in labels)
                inf_cols = "".join(f" infer img/s @{b} |" for b in infer_batches)
                print(f"| backbone | crop | tokens | train batch |{cols}{inf_cols} encoder alone img/s @{infer_batches[0]} | load avg |")
                print("|" + " --- |" * (6 + 2 * len(labels) + len(infer_batches)))
            load = load_avg()
            mask = torch.zeros(run.batch, 1, crop, crop, device=run.device)
            mask[:, :, crop // 4: crop // 2, crop // 4: crop // 2] = 1
            batch = {"image": torch.randn(run.batch, 3, crop, crop, device=run.device), "mask": mask}
            cells = ""
            for stage in m.stages:
                setup = m.configure_optimization(stage, 1000)
                r = rate(lambda i: train_step(m, stage, setup, batch, 1000 + i, sync=not run.pipelined),
                         run.warmup, run.iters, run.device, run.pipelined)
                cells += f" {r:.3f} | {r * run.batch:.2f} |"
                del setup
            for b in infer_batches:
                cells += f" {infer_rate(m, b, crop, run):.2f} |"
            enc = "n/a"
            if hasattr(m, "_encoder_forward"):  # the frozen ViT alone, as the method runs it
                test = torch.randn(infer_batches[0], 3, crop, crop, device=run.device)
                m.eval_mode()
                enc = f"{rate(lambda i: m.encode(test), run.warmup, run.iters, run.device, run.pipelined) * infer_batches[0]:.2f}"
            grid = getattr(m, "grid", None)  # a method that knows its token grid says it
            n = grid[0] * grid[1] if isinstance(grid, tuple) else (crop // m.encoder.patch_size) ** 2
            print(f"| {name} | {crop} | {n} | {run.batch} |{cells} {enc} | {load:.2f} |", flush=True)
            del m
            release(run)
    print()
    print(footer(run))
    return 0
