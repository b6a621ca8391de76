"""The fast paths against the eager path, with the real compiler: how far apart, and how fast.

For Dinomaly and INP-Former++ (random weights, same weights on every path), on one device:

* ``fp32 eager`` - the reference: no autocast, no compile;
* ``bf16, cast per call`` - autocast over fp32 weights (the path before this change);
* ``bf16, held`` - the frozen encoder's matmul weights held in bf16 once (must equal the row above
  bit for bit);
* ``bf16, held, compiled`` - plus ``torch.compile`` (inductor: C++ on CPU, Triton on GPU) of the
  encoder, the model and the map; ``--modes`` adds e.g. ``reduce-overhead`` (CUDA graphs);
* ``fp32, compiled`` - inductor against fp32 eager without bf16 in the way (the tightest check).

Each row: the largest |difference| of the maps and scores of a test batch to the row's reference
(bf16 rows: ``bf16, cast per call``; fp32 rows: ``fp32 eager``) and to ``fp32 eager``; for one
training step from the same state, the loss difference and the largest gradient difference (the
bottleneck dropout set to 0 so every path draws the same nothing); inference img/s and training
it/s of that path (back to back on CUDA, median of synchronised calls on CPU), and the one-off
compile time. On CPU, bf16 autocast runs through oneDNN and is slower than fp32: the bf16 rows
there check equality, not speed.

Core library only (no Kedro, no MLflow): runs on the accelerator machine as it is.

Usage::

    python benchmarks/check_fast_paths.py --device cpu --crop 112 --batch 4
    python benchmarks/check_fast_paths.py --device cuda --crop 392 --batch 16 --backbone vitb --modes default,reduce-overhead
"""

from __future__ import annotations

import copy
import sys
import time

import _bench_common as bc  # also puts src/ on sys.path for a bare checkout

import torch

from uad.engine.speed import CompileSpec
from uad.methods.registry import build_method


def _outputs(m, x):
    out = m.predict_on_device(x)
    return out.maps.float(), out.scores.float()


def _grads(m, stage, setup, batch):
    torch.manual_seed(0)
    loss = bc.train_step(m, stage, setup, batch, 500, sync=False)  # one step from the same state
    return float(loss), {n: p.grad.detach().float().clone() for n, p in m.model.named_parameters() if p.grad is not None}


def main(argv: list[str] | None = None) -> int:
    ap = bc.common_parser(__doc__)
    ap.add_argument("--methods", default="dinomaly,inpformer")
    ap.add_argument("--backbone", default="vits")
    ap.add_argument("--crop", type=int, default=None, help="default 392 on CUDA, 112 on CPU")
    ap.add_argument("--modes", default="default", help="compile modes for the bf16 rows (comma list)")
    ap.add_argument("--no-compile", action="store_true", help="only the bf16 held / cast rows")
    ap.add_argument("--fp32-compile", choices=["auto", "yes", "no"], default="auto",
                    help="the fp32 compiled row (auto: on CPU only; on a GPU each compile costs a minute)")
    args = ap.parse_args(argv)
    run = bc.setup_run(args)
    crop = args.crop or (392 if run.cuda else 112)
    backbone = bc.BACKBONES.get(args.backbone, args.backbone)
    low = torch.bfloat16
    print(bc.header(run, "check_fast_paths.py", argv))
    print()
    print("| method | path | max abs diff map / score to the row's reference | to fp32 eager | train loss diff / "
          "max grad diff | infer img/s | train it/s | compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in [n for n in args.methods.split(",") if n]:
        params = {"backbone": backbone, "weights": "random", "allow_random": True, "resize": crop, "crop": crop,
                  "bottleneck_dropout": 0.0}
        base = build_method(name, params)
        stage = base.stages[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(run.infer_batch, 3, crop, crop, generator=g).to(run.device)
        batch = {"image": torch.randn(run.batch, 3, crop, crop, generator=g).to(run.device),
                 "mask": torch.zeros(run.batch, 1, crop, crop, device=run.device)}
        paths = [("fp32 eager", None, True, None), ("bf16, cast per call", low, False, None), ("bf16, held", low, True, None)]
        if not args.no_compile:
            paths += [(f"bf16, held, compiled ({mode})", low, True, mode) for mode in args.modes.split(",") if mode]
            if args.fp32_compile == "yes" or (args.fp32_compile == "auto" and not run.cuda):
                paths += [("fp32, compiled (default)", None, True, "default")]
        ref: dict[str, tuple] = {}
        for label, dtype, hold, mode in paths:
            m = copy.deepcopy(base)
            m.hold_frozen_encoder = hold
            m.to(run.device, dtype)
            t0 = time.perf_counter()
            if mode:
                m.enable_compile(CompileSpec.parse(mode))
            outs = _outputs(m, x)
            setup = m.configure_optimization(stage, 1000)
            loss, grads = _grads(m, stage, setup, batch)
            compile_s = time.perf_counter() - t0 if mode else None
            if mode and not m.compiled:
                label += " **fell back to eager**"
            mine = (outs, loss, grads)
            key = "fp32" if dtype is None else "bf16"
            ref.setdefault(key, mine)
            ref.setdefault("fp32", mine)

            def diff(a, b):
                (ma, sa), la, ga = a
                (mb, sb), lb, gb = b
                d_map = float((ma - mb).abs().max())
                d_score = float((sa - sb).abs().max())
                d_grad = max(float((ga[k] - gb[k]).abs().max()) for k in ga)
                return f"{d_map:.1e} / {d_score:.1e}", f"{abs(la - lb):.1e} / {d_grad:.1e}"

            own, own_train = diff(mine, ref[key])
            to32, _ = diff(mine, ref["fp32"])
            m.eval_mode()
            inf = bc.rate(lambda i: m.predict_on_device(x), run.warmup, run.iters, run.device, run.pipelined) * run.infer_batch
            train = bc.rate(lambda i: bc.train_step(m, stage, setup, batch, 1000 + i, sync=not run.pipelined),
                            run.warmup, run.iters, run.device, run.pipelined)
            print(f"| {name} | {label} | {own} | {to32} | {own_train} | {inf:.2f} | {train:.3f} | "
                  f"{'' if compile_s is None else f'{compile_s:.0f}'} |", flush=True)
            del m, setup
            bc.release(run)
    print()
    print(bc.footer(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
