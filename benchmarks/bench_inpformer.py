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

from uad.methods.inpformer import INPFormer


def main(argv: list[str] | None = None) -> int:
    return bc.bench_method(INPFormer, "bench_inpformer.py", __doc__, argv, stage_labels={"reconstruction": "rec", "residual": "res"})


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
