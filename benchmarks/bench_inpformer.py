"""Speed of INP-Former++: training iterations/s of both stages and inference images/s.

For each backbone size and crop size:

* ``rec it/s``: full optimisation steps per second of the "reconstruction" stage (frozen encoder
  under no_grad, INP extractor + bottleneck + 8 INP-guided decoder blocks forward/backward,
  soft mining loss + 0.2 soft INP coherence loss, grad-norm clip 0.1, StableAdamW, schedule);
* ``res it/s``: steps per second of the "residual" stage (encoder and reconstruction model under
  no_grad, eq. 7 residual, seg head forward/backward, Dice loss; the pseudo anomalies are made by
  the data loader and not timed here);
* ``infer img/s``: images per second through :meth:`INPFormer.predict` (eq. 9 map: A_rec + seg
  head, upsampling to the crop, Gaussian blur, top-1% score, copy to CPU).

Weights are random (speed does not depend on them). CUDA runs under bf16 autocast like the
engine. Only the core library is imported (no Kedro, no MLflow). Timing helpers (command line,
median-based rates, training step) are shared in ``_bench_common.py``.

Usage::

    python benchmarks/bench_inpformer.py --device cpu                  # batch 2, 1 + 3 iterations
    python benchmarks/bench_inpformer.py --device cpu --threads 2 --batch 8 --infer-batch 8 --warmup 2 --iters 5
    python benchmarks/bench_inpformer.py --device cuda --batch 16 --infer-batch 16

Rates come from the *median* time of the timed iterations (robust to bursts of other work on a
shared machine). ``load avg`` is the 1-minute load average when a row started.
"""

from __future__ import annotations

import sys

import _bench_common as bc  # also puts src/ on sys.path for a bare checkout
import torch

from uad.methods.inpformer import INPFormer


def main(argv: list[str] | None = None) -> int:
    args = bc.common_parser(__doc__).parse_args(argv)
    run = bc.setup_run(args)
    print(bc.header(run, "bench_inpformer.py", argv))
    print()
    print("| backbone | crop | tokens | train batch | rec it/s | rec img/s | res it/s | res img/s | infer batch | infer img/s | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in run.backbones:
        for crop in run.crops:
            m = bc.build(INPFormer, name, crop, run)
            load = bc.load_avg()
            images = torch.randn(run.batch, 3, crop, crop, device=run.device)
            mask = torch.zeros(run.batch, 1, crop, crop, device=run.device)
            mask[:, :, crop // 4: crop // 2, crop // 4: crop // 2] = 1
            batch = {"image": images, "mask": mask}
            rates = {}
            for stage in m.stages:
                setup = m.configure_optimization(stage, 1000)
                rates[stage] = bc.rate(lambda i: bc.train_step(m, stage, setup, batch, 200 + i), run.warmup, run.iters, run.device)
            test = torch.randn(run.infer_batch, 3, crop, crop, device=run.device)
            inf = bc.rate(lambda i: m.predict(test), run.warmup, run.iters, run.device) * run.infer_batch
            n = (crop // m.encoder.patch_size) ** 2
            rec, res = rates["reconstruction"], rates["residual"]
            print(f"| {name} | {crop} | {n} | {run.batch} | {rec:.3f} | {rec * run.batch:.2f} | {res:.3f} | "
                  f"{res * run.batch:.2f} | {run.infer_batch} | {inf:.2f} | {load:.2f} |", flush=True)
            del m, setup
            bc.release(run)
    print()
    print(bc.footer(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
