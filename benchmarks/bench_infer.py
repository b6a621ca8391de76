"""Inference speed of a trained model: the torch path (``method.predict``) against the exported
ONNX graph run by onnxruntime, same inputs, same batch.

For each method and crop: export time, ONNX file size, images/s of both paths, and the largest
difference of their maps and scores (they must agree to 1e-4 in fp32). Weights are random (speed
does not depend on them). CPU by default; ``--device cuda`` times the torch path on the GPU in bf16
autocast (onnxruntime stays on CPU here: the registry's onnxruntime build is CPU-only).
Core library only (no Kedro, no MLflow).

Usage::

    python benchmarks/bench_infer.py --methods dinomaly,inpformer,agpnet --crops 224 --infer-batch 8
"""

from __future__ import annotations

import sys
import time

import _bench_common as bc  # also puts src/ on sys.path for a bare checkout

import numpy as np
import torch

from uad.export import export_onnx
from uad.methods.registry import build_method

BACKBONE = {"dinomaly": "dinov2_vits14_reg", "inpformer": "dinov2_vits14_reg", "agpnet": "dino_vits16",
            "rlr": "tf_efficientnet_b6", "patchcore": "wide_resnet50_2"}


def main(argv: list[str] | None = None) -> int:
    ap = bc.common_parser(__doc__)
    ap.add_argument("--methods", default="dinomaly,inpformer,agpnet")
    ap.set_defaults(crops="224", backbones="")
    args = ap.parse_args(argv)
    run = bc.setup_run(args)
    import onnxruntime as ort

    print(bc.header(run, "bench_infer.py", argv))
    print()
    print("| method | backbone | crop | batch | export s | ONNX MB | torch img/s | onnxruntime img/s | max diff map / score |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        for crop in run.crops:
            params = {"backbone": BACKBONE.get(name, "dino_vits16"), "weights": "random", "allow_random": True,
                      "resize": crop, "crop": crop}
            m = build_method(name, params)
            t0 = time.perf_counter()
            data, info = export_onnx(m, batch=2)
            t_export = time.perf_counter() - t0
            x = torch.randn(run.infer_batch, 3, crop, crop)
            sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            feed = {"images": x.numpy()}
            onnx_rate = bc.rate(lambda i: sess.run(None, feed), run.warmup, run.iters, torch.device("cpu"))
            maps, scores = sess.run(["maps", "scores"], feed)
            ref = m.predict(x)
            diff = max(float(np.abs(maps - ref.maps.numpy()).max()), 0.0), float(np.abs(scores - ref.scores.numpy()).max())
            m.to(run.device, run.autocast_dtype)
            xd = x.to(run.device)
            torch_rate = bc.rate(lambda i: m.predict(xd), run.warmup, run.iters, run.device)
            print(f"| {name} | {params['backbone']} | {crop} | {run.infer_batch} | {t_export:.0f} | {len(data) / 2**20:.0f} | "
                  f"{torch_rate * run.infer_batch:.2f} | {onnx_rate * run.infer_batch:.2f} | {diff[0]:.1e} / {diff[1]:.1e} |",
                  flush=True)
            del m, sess
            bc.release(run)
    print()
    print(bc.footer(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
