"""Speed of RLR: training iterations/s and inference images/s.

Measures, for each CNN backbone and input size,

* ``train it/s``: full optimisation steps per second (frozen CNN forward under no_grad, 3x3 local
  averaging, feature jitter, the per-level reconstructors forward/backward with masked LCA + MLKA
  through the fused attention kernel, MSE + cosine loss, Adam step) at the training batch size;
* ``infer img/s``: images per second through :meth:`RLR.predict` (encoder, reconstruction, maps of
  every level upsampled to the input, sigma-4 smoothing for the score, copy to CPU).

Weights are random (speed does not depend on them). On CUDA the method runs under bf16 autocast,
as the training engine does. Core library only (no Kedro, no MLflow). The comparison with the
public code at the same batch and size is ``equiv_rlr.py``.

Usage::

    python benchmarks/bench_rlr.py --device cpu --batch 2 --infer-batch 2       # B6 at 256 (the paper)
    python benchmarks/bench_rlr.py --device cuda --batch 16 --infer-batch 16
    python benchmarks/bench_rlr.py --backbones tf_efficientnet_lite0 --crops 128,256
"""

from __future__ import annotations

import sys

import _bench_common as bc  # also puts src/ on sys.path for a bare checkout

from uad.methods.rlr import RLR


def main(argv: list[str] | None = None) -> int:
    return bc.bench_method(RLR, "bench_rlr.py", __doc__, argv,
                           defaults={"backbones": "tf_efficientnet_b6", "crops": "256"})


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
