"""Speed of Dinomaly: training iterations/s and inference images/s.

Measures, for each backbone size and crop size,

* ``train it/s``: full optimisation steps per second (frozen encoder forward under no_grad,
  bottleneck + decoder forward/backward, Loose Loss with hard mining, grad-norm clip 0.1,
  StableAdamW step, schedule step) at the given training batch size;
* ``infer img/s``: images per second through :meth:`Dinomaly.predict` (encoder, decoder, cosine
  maps, upsampling to the crop, Gaussian blur, top-1% score, copy to CPU).

Weights are random (speed does not depend on them, and no download is needed). On CUDA the
method runs under bf16 autocast, as the training engine does. Only the core library is imported
(no Kedro, no MLflow): the accelerator machine has just torch, timm and torchvision. Timing
helpers (command line, median-based rates, training step) are shared in ``_bench_common.py``.

Usage::

    python benchmarks/bench_dinomaly.py --device cpu                   # batch 2, 1 + 3 iterations
    python benchmarks/bench_dinomaly.py --device cpu --threads 2 --batch 8 --infer-batch 8 --warmup 2 --iters 5
    python benchmarks/bench_dinomaly.py --device cuda --batch 16 --infer-batch 16
    python benchmarks/bench_dinomaly.py --backbones vits --crops 224 --warmup 1 --iters 2

Rates come from the *median* time of the timed iterations (robust to bursts of other work on a
shared machine). ``load avg`` is the 1-minute load average when a row started.
"""

from __future__ import annotations

import sys

import _bench_common as bc  # also puts src/ on sys.path for a bare checkout

from uad.methods.dinomaly import Dinomaly


def main(argv: list[str] | None = None) -> int:
    return bc.bench_method(Dinomaly, "bench_dinomaly.py", __doc__, argv, stage_labels=None)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
