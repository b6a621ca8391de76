"""This project's PatchCore next to anomalib's, same images, same backbone weights, same coreset
ratio, one script run.

Both get the embedded dataset's images prepared once, identically (RGB uint8, PIL bilinear 256 ->
centre crop 224, then the backbone's mean / std): 128 training normals of the 4 classes in one
model, 100 test images. The backbone is the bundled ImageNet EfficientNet-Lite0 (timm's
``tf_efficientnet_lite0``) in both: loaded here through :mod:`uad.backbones`, handed to anomalib as
a safetensors file of its tensors (loaded by name into anomalib's own timm feature extractor; no
pickle), stages ``blocks.2`` + ``blocks.4`` (timm feature indices 2, 3). Coreset ratio 0.1 in both.

anomalib runs in its own virtual environment (``--anomalib-python``, default
``/work/venvs/anomalib/bin/python``), never imported by this project: a child process drives its
``PatchcoreModel`` (the torch module its Lightning ``Patchcore`` wraps: ``training_step`` is a
forward in train mode, ``fit`` is ``subsample_embedding``, ``validation_step`` a forward in eval
mode) without Lightning's loop, so its times hold no trainer overhead. The child returns scores and
maps; both sides' AUROC come from :func:`uad.metrics.compute_metrics` here.

Timed: fit seconds (feature extraction of the training images + coreset), and images/s of
inference at batch 8 (and 1) on CPU, each side with the same torch thread count.
This project's rows: the quick profile (1,024-d patch features, the paper's default) and the
same run at anomalib's own feature width (``target_dim`` = 40 + 112 = 152 channels: anomalib
concatenates the two stages without reducing them), and each deployed through ``uad.deploy`` on
OpenVINO: fp32, bf16 (where the CPU has it), INT8 as the export writes it (the memory-bank product
in float) and INT8 with the bank product quantised too.

Usage::

    flock /tmp/uad_heavy.lock python benchmarks/vs_anomalib.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r'''
import json, statistics, sys, time
import numpy as np, torch
from safetensors.torch import load_file
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import anomalib
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
data = np.load(args["data"])
mean = torch.tensor(args["mean"]).view(1, 3, 1, 1); std = torch.tensor(args["std"]).view(1, 3, 1, 1)
norm = lambda u: (torch.from_numpy(u).float() / 255.0 - mean) / std
model = PatchcoreModel(layers=["blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0", pre_trained=False,
                       num_neighbors=9)
fx = model.feature_extractor.feature_extractor
weights = load_file(args["weights"])
own = fx.state_dict()
missing = [k for k in own if k not in weights]
if missing:
    raise SystemExit(f"anomalib's extractor has tensors the bundled weights lack: {missing[:5]}")
fx.load_state_dict({k: weights[k] for k in own}, strict=True)
x_train, x_test = data["train"], data["test"]
t0 = time.perf_counter()
model.train()
with torch.no_grad():
    for i in range(0, len(x_train), 16):
        model(norm(x_train[i:i + 16]))
    model.subsample_embedding(args["coreset_ratio"])
fit_s = time.perf_counter() - t0
model.eval()
scores, maps = [], []
with torch.no_grad():
    for i in range(0, len(x_test), 8):
        out = model(norm(x_test[i:i + 8]))
        scores.append(out.pred_score.reshape(-1).numpy()); maps.append(out.anomaly_map[:, 0].numpy())
rates = {}
for b in (1, 8):
    x = norm(x_test[:b]); times = []
    with torch.no_grad():
        for k in range(args["warmup"] + args["iters"]):
            t = time.perf_counter(); model(x); dt = time.perf_counter() - t
            if k >= args["warmup"]: times.append(dt)
    rates[b] = b / statistics.median(times)
np.savez(args["out"], scores=np.concatenate(scores), maps=np.concatenate(maps))
print(json.dumps({"fit_s": fit_s, "rate1": rates[1], "rate8": rates[8], "bank": list(model.memory_bank.shape),
                  "anomalib": anomalib.__version__, "torch": torch.__version__}))
'''


def _timed(fn, warmup: int, iters: int) -> float:
    """Median seconds of one call (cpu_deploy.timed gives its inverse, calls per second)."""
    from cpu_deploy import timed

    return 1.0 / timed(fn, warmup, iters)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anomalib-python", default="/work/venvs/anomalib/bin/python")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "uad_cpu_deploy" / "synthetic"))
    args = ap.parse_args(argv)
    if not Path(args.anomalib_python).is_file():
        print(f"Error: --anomalib-python {args.anomalib_python} does not exist: python -m venv /work/venvs/anomalib && "
              f"/work/venvs/anomalib/bin/pip install anomalib", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import logging

    import numpy as np
    import torch
    from safetensors.torch import save_file

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from uad.data.layouts import scan_dataset
    from uad.data.synthetic import ensure_synthetic_dataset
    from uad.data.torch_data import AnomalyImageDataset
    from uad.deploy.export import calibration_images, export_uint8_onnx, keep_fp32_nodes, quantize_int8, to_openvino
    from uad.deploy.runtime import make_runner
    from uad.engine.scoring import normalise_uint8
    from uad.methods.registry import build_method
    from uad.metrics import compute_metrics

    root = ensure_synthetic_dataset(args.data, seed=0)
    idx = scan_dataset(root, "mvtec")
    train, test = idx[idx.split == "train"], idx[idx.split == "test"].reset_index(drop=True)
    base = dict(backbone="tf_efficientnet_lite0", weights="bundled", layers=[2, 3], resize=256, crop=224,
                coreset_ratio=args.coreset_ratio)
    probe = build_method("patchcore", base)
    spec = probe.input_spec
    x_train = calibration_images(train.image_path, 256, 224, limit=len(train))
    x_test = calibration_images(test.image_path, 256, 224, limit=len(test))
    ds = AnomalyImageDataset(test, 256, 224, spec["mean"], spec["std"])
    masks = np.stack([ds[i]["mask"][0].numpy() > 0.5 for i in range(len(ds))])
    labels, classes = test.label.to_numpy(), test.class_name.to_numpy()
    tmp = Path(tempfile.mkdtemp(prefix="uad_vs_anomalib_"))
    np.savez(tmp / "data.npz", train=x_train, test=x_test)
    save_file({k: v.contiguous() for k, v in probe.encoder.model.state_dict().items()}, str(tmp / "lite0.safetensors"))

    def metrics(scores, maps):
        t = compute_metrics(labels, scores, masks, maps, classes)
        row = t.loc["mean"]  # the class mean (the papers' protocol)
        return float(row["image_auroc"]), float(row["pixel_auroc"])

    rows, notes = [], []
    # anomalib, in its own environment
    job = {"data": str(tmp / "data.npz"), "weights": str(tmp / "lite0.safetensors"), "mean": list(spec["mean"]),
           "std": list(spec["std"]), "threads": args.threads, "coreset_ratio": args.coreset_ratio,
           "warmup": args.warmup, "iters": args.iters, "out": str(tmp / "anomalib.npz")}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([args.anomalib_python, "-c", WORKER, json.dumps(job)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        print("Error: the anomalib run failed (its error above)", file=sys.stderr)
        return 1
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    out = np.load(tmp / "anomalib.npz")
    a_img, a_px = metrics(out["scores"], out["maps"])
    rows.append((f"anomalib {res['anomalib']} PatchcoreModel (torch)", f"{res['bank'][1]}-d", res["bank"][0],
                 res["fit_s"], res["rate1"], res["rate8"], a_img, a_px))
    anomalib_row = rows[-1]
    # this project
    fitted = {}
    for label, dim in (("uad PatchCore, quick profile (torch)", 1024), ("uad PatchCore at anomalib's width (torch)", 152)):
        m = build_method("patchcore", {**base, "target_dim": dim})
        mean, std = (torch.tensor(spec[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = torch.cat([m.features(normalise_uint8(torch.from_numpy(x_train[i:i + 16]), mean, std))
                               for i in range(0, len(x_train), 16)])
            m.fit_from_features(feats)
        fit_s = time.perf_counter() - t0
        m.eval_mode()

        def run(u, m=m, mean=mean, std=std):
            with torch.no_grad():
                o = m.predict(normalise_uint8(torch.from_numpy(u), mean, std))
            return o.maps.numpy(), o.scores.numpy()

        maps, scores = zip(*[run(x_test[i:i + 8]) for i in range(0, len(x_test), 8)])
        img, px = metrics(np.concatenate(scores), np.concatenate(maps))
        r1 = 1 / _timed(lambda: run(x_test[:1]), args.warmup, args.iters)
        r8 = 8 / _timed(lambda: run(x_test[:8]), args.warmup, args.iters)
        rows.append((label, f"{dim}-d", int(m.memory_bank.shape[0]), fit_s, r1, r8, img, px))
        fitted[dim] = (m, fit_s)
    # the deployed paths (uad.deploy, OpenVINO) of both widths: fp32, bf16 where the CPU has it, and INT8 as the
    # export writes it (calibrated on 64 training normals, the bank product in float) and with the bank product
    # quantised too (only the map filter kept in float)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    calib = calibration_images(train.image_path, 256, 224, limit=64)
    for dim in (1024, 152):
        m, fit_s = fitted[dim]
        onnx32, _ = export_uint8_onnx(m, check=False)
        int8, _ = quantize_int8(onnx32, calib)
        int8_bank, _ = quantize_int8(onnx32, calib, keep_fp32=keep_fp32_nodes(onnx32, bank=False))
        variants = [("fp32", onnx32, "fp32")]
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            variants.append(("bf16", onnx32, "bf16"))
        variants += [("INT8", int8, "fp32"), ("INT8 + bank", int8_bank, "fp32")]
        for label, model, prec in variants:
            xml, bin_ = to_openvino(model)
            (tmp / "ov.xml").write_bytes(xml)
            (tmp / "ov.bin").write_bytes(bin_)
            run = make_runner(tmp / "ov.xml", "openvino", args.threads, precision=prec)
            maps, scores = zip(*[run(x_test[i:i + 8]) for i in range(0, len(x_test), 8)])
            img, px = metrics(np.concatenate(scores), np.concatenate(maps))
            r1 = 1 / _timed(lambda: run(x_test[:1]), args.warmup, args.iters)
            r8 = 8 / _timed(lambda: run(x_test[:8]), args.warmup, args.iters)
            what = "quick profile" if dim == 1024 else "at anomalib's width"
            rows.append((f"uad PatchCore, {what} (OpenVINO {label})", f"{dim}-d", int(m.memory_bank.shape[0]), fit_s,
                         r1, r8, img, px))
            print(f"  {rows[-1][0]}: {r8:.2f} img/s (b8), AUROC {img:.4f} / {px:.4f}", flush=True)

    import openvino as ov

    print(f"# vs_anomalib.py  {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"command: python benchmarks/vs_anomalib.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"cpu: {os.cpu_count()} logical cores, torch threads {args.threads} on both sides; "
          f"torch ATen kernels {torch.backends.cpu.get_cpu_capability()}")
    print(f"versions: this project's venv python {platform.python_version()}, torch {torch.__version__}, openvino "
          f"{ov.__version__.split('-')[0]}; anomalib's venv: anomalib {res['anomalib']}, torch {res['torch']}")
    print(f"data: embedded dataset, {len(x_train)} training normals (4 classes, one model), {len(x_test)} test images, "
          f"256 -> 224; coreset ratio {args.coreset_ratio}; backbone tf_efficientnet_lite0, bundled ImageNet weights, "
          f"stages blocks.2 + blocks.4")
    print(f"load average at start: {load0:.2f}")
    print()
    print("| implementation | patch feature | memory bank | fit s | img/s batch 1 | img/s batch 8 | image AUROC | pixel AUROC | "
          "x anomalib img/s (b8) | x anomalib fit |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.4f} | {r[7]:.4f} | "
              f"{r[5] / anomalib_row[5]:.2f} | {anomalib_row[3] / r[3]:.2f} |")
    for n in notes:
        print(f"- {n}")
    print(f"total wall time: {time.perf_counter() - t_start:.0f} s; load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
