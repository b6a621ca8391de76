"""CPU deployment speed and accuracy of every backend, one script, one run.

For PatchCore (the quick profile: bundled ImageNet EfficientNet-Lite0, stages 2-3, 1,024-d,
10 % coreset, 256 -> 224, fitted here on the embedded dataset's 128 training normals) and Dinomaly
(ViT-S/14 with registers at 224, random weights: speed only): images/s at batch 1 and batch 8 of

* torch fp32 (``method.predict``, the library's path),
* onnxruntime fp32 and INT8 (static QDQ, calibrated on 64 training normals: ``uad.deploy``; for
  PatchCore also "INT8 + bank": the memory-bank product quantised too, as the export's
  ``openvino_int8`` does; its ``onnx_int8`` keeps the product in float),
* OpenVINO fp32, INT8 (the same QDQ file) and bf16 (the fp32 IR with ``INFERENCE_PRECISION_HINT
  bf16``; only where the CPU has AVX-512 BF16 or AMX),

and, for PatchCore (and each trained checkpoint given with ``--checkpoints``, e.g. the quick
RLR and AGPNet), image / pixel AUROC of each on the 100 test images (the evaluation's crop), next
to torch's, and the self-test a deployed folder runs when it loads (4 training normals against
torch fp32, its verdict at ``uad.deploy.runtime.SELF_CHECK_TOLERANCE``). The CPU's flags, the libraries' versions and the load average at start and end
are printed with the table. Every backend gets the same thread count (``--threads``, default all
cores).

``--isa avx2`` reruns the same in a child process restricted to AVX2 where the libraries allow it:
``ATEN_CPU_CAPABILITY=avx2`` (torch's ATen kernels) and ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN, which
torch's convolutions and OpenVINO's CPU plugin use); onnxruntime's MLAS has no such switch, so its
rows are marked as not restricted.

Usage (timings that are reported: on a quiet machine)::

    flock /tmp/uad_heavy.lock python benchmarks/cpu_deploy.py
    flock /tmp/uad_heavy.lock python benchmarks/cpu_deploy.py --isa avx2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def cpu_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or f in ("sse4_2",)]
    return model, keep


def timed(fn, warmup: int, iters: int) -> float:
    """Calls per second from the median of ``iters`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="patchcore,dinomaly")
    ap.add_argument("--isa", default="native", choices=("native", "avx2"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--crop", type=int, default=224, help="crop (PatchCore resizes to crop * 8 / 7 first); 56 for a dry run")
    ap.add_argument("--calibration", type=int, default=64, help="training normals the INT8 models are calibrated on")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "uad_cpu_deploy" / "synthetic"))
    ap.add_argument("--checkpoints", default="", help="trained checkpoints whose INT8 accuracy is measured too, "
                    "name=path,... (e.g. rlr=data/06_models/rlr/train.safetensors/<version>/train.safetensors; "
                    "a versioned folder takes its newest version); accuracy only, no speed rows")
    args = ap.parse_args(argv)
    if args.isa != "native" and os.environ.get("UAD_CPU_DEPLOY_CHILD") != "1":
        env = {**os.environ, **ISA_ENV[args.isa], "UAD_CPU_DEPLOY_CHILD": "1"}
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)

    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import logging

    import numpy as np
    import onnxruntime as ort
    import openvino as ov
    import torch

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("uad.backbones").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from uad.data.layouts import scan_dataset
    from uad.data.synthetic import ensure_synthetic_dataset
    from uad.data.torch_data import AnomalyImageDataset
    from uad.deploy.export import calibration_images, export_uint8_onnx, keep_fp32_nodes, quantize_int8, to_openvino
    from uad.deploy.runtime import SELF_CHECK_TOLERANCE, make_runner, self_test_difference
    from uad.engine.checkpoint import load_state
    from uad.inference import load_trained
    from uad.engine.scoring import normalise_uint8
    from uad.methods.registry import build_method
    from uad.metrics import compute_metrics

    model_name, flags = cpu_flags()
    has_bf16 = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    print(f"# cpu_deploy.py  {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"command: python benchmarks/cpu_deploy.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"cpu: {model_name}, {os.cpu_count()} logical cores; threads per backend: {args.threads}")
    print(f"cpu flags: {' '.join(flags)}")
    print(f"isa: {args.isa} ({' '.join(f'{k}={v}' for k, v in ISA_ENV.get(args.isa, {}).items()) or 'no restriction'}); "
          f"torch ATen kernels: {torch.backends.cpu.get_cpu_capability()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"openvino {ov.__version__.split('-')[0]}, numpy {np.__version__}")
    print(f"load average at start: {load0:.2f}")
    root = ensure_synthetic_dataset(args.data, seed=0)
    idx = scan_dataset(root, "mvtec")
    train, test = idx[idx.split == "train"], idx[idx.split == "test"].reset_index(drop=True)
    tmp = Path(tempfile.mkdtemp(prefix="uad_cpu_deploy_"))
    rows, acc_rows, notes = [], [], []

    def accuracy(name, method, backends, calib):
        """Image / pixel AUROC of each backend on the test images (the evaluation's crop), its
        largest differences to torch fp32 there, and the export's self-test on 4 training normals
        (the check a deployed folder runs when it loads: its verdict at SELF_CHECK_TOLERANCE)."""
        spec = method.input_spec
        resize, crop = int(spec["resize"]), int(spec["crop"])
        ds = AnomalyImageDataset(test, resize, crop, spec["mean"], spec["std"])
        masks = np.stack([ds[i]["mask"][0].numpy() > 0.5 for i in range(len(ds))])
        x_test = calibration_images(test.image_path, resize, crop, limit=len(test))
        ref = ref_self = None
        for backend, prec, run in backends:
            maps, scores = zip(*[run(x_test[i:i + 8]) for i in range(0, len(x_test), 8)])
            maps, scores = np.concatenate(maps), np.concatenate(scores)
            table = compute_metrics(test.label.to_numpy(), scores, masks, maps, test.class_name.to_numpy())
            mean_row = table.loc["mean"]  # the class mean (the papers' protocol)
            self_maps, self_scores = run(calib[:4])
            if ref is None:
                ref, ref_self = (scores, maps), (self_scores, self_maps)
            scale = float(np.abs(ref[0]).max())
            self_diff = self_test_difference(self_maps, self_scores, ref_self[1], ref_self[0])
            limit = SELF_CHECK_TOLERANCE["exact" if prec == "fp32" else "reduced"]
            acc_rows.append((name, backend, prec, float(mean_row["image_auroc"]), float(mean_row["pixel_auroc"]),
                             float(np.abs(scores - ref[0]).max()) / scale, float(np.abs(maps - ref[1]).max()) / scale,
                             f"{self_diff:.1e} {'pass' if self_diff <= limit else 'REFUSED'} (limit {limit:g})"))
            print(f"  {name} {backend} {prec}: AUROC {acc_rows[-1][3]:.4f} / {acc_rows[-1][4]:.4f}, self-test {acc_rows[-1][7]}",
                  flush=True)
    def make_backends(name, method, models):
        """torch fp32 (``method.predict`` on the normalised batch) and each exported model
        (``models``: precision label -> ONNX bytes, fp32 first) on onnxruntime and OpenVINO, plus
        OpenVINO bf16 of the fp32 model where the CPU has it."""
        spec = method.input_spec
        mean, std = (torch.tensor(spec[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        method.eval_mode()

        def torch_run(x):
            with torch.no_grad():
                out = method.predict(normalise_uint8(torch.from_numpy(x), mean, std))
            return out.maps.numpy(), out.scores.numpy()

        backends, ov = [("torch", "fp32", torch_run)], []
        for k, (prec, data) in enumerate(models.items()):
            onnx_file = tmp / f"{name}_{k}.onnx"
            onnx_file.write_bytes(data)
            xml, bin_ = to_openvino(data)
            xml_file = onnx_file.with_suffix(".xml")
            xml_file.write_bytes(xml)
            xml_file.with_suffix(".bin").write_bytes(bin_)
            backends.append(("onnxruntime", prec, make_runner(onnx_file, "onnxruntime", args.threads)))
            ov.append(("openvino", prec, make_runner(xml_file, "openvino", args.threads)))
        backends += ov
        if has_bf16:
            try:
                backends.append(("openvino", "bf16", make_runner(tmp / f"{name}_0.xml", "openvino", args.threads,
                                                                 precision="bf16")))
            except Exception as e:  # an ISA restricted below the CPU's bf16 support
                notes.append(f"{name}: OpenVINO bf16 not available here: {str(e).splitlines()[0][:160]}")
        return backends

    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "patchcore":
            params = dict(backbone="tf_efficientnet_lite0", weights="bundled", layers=[2, 3], resize=args.crop * 8 // 7,
                          crop=args.crop)
        elif name == "dinomaly":
            params = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=args.crop, crop=args.crop)
        else:
            raise SystemExit(f"Error: --models: {name!r} is not patchcore or dinomaly")
        method = build_method(name, params)
        spec = method.input_spec
        resize, crop = int(spec["resize"]), int(spec["crop"])
        mean, std = (torch.tensor(spec[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        calib = calibration_images(train.image_path, resize, crop, limit=args.calibration)
        if name == "patchcore":
            x_train = calibration_images(train.image_path, resize, crop, limit=len(train))
            t0 = time.perf_counter()
            with torch.no_grad():
                feats = torch.cat([method.features(normalise_uint8(torch.from_numpy(x_train[i:i + 16]), mean, std))
                                   for i in range(0, len(x_train), 16)])
                method.fit_from_features(feats)
            notes.append(f"{name}: fitted on {len(x_train)} training normals in {time.perf_counter() - t0:.1f} s, "
                         f"memory bank {tuple(method.memory_bank.shape)}")
        onnx32, info = export_uint8_onnx(method)
        int8, qinfo = quantize_int8(onnx32, calib)
        notes.append(f"{name}: ONNX export {info['export_s']} s (max diff to torch {info['check_max_abs_diff_scores'] / info['check_scale']:.1e} "
                     f"of max(1, the largest score)); INT8: {qinfo['quantised_nodes']} nodes quantised, "
                     f"{len(qinfo['kept_fp32'])} kept in float, {qinfo['calibration_images']} calibration images, "
                     f"{qinfo['quantize_s']} s")
        models = {"fp32": onnx32, "INT8": int8}
        if name == "patchcore":  # also the bank product in 8-bit (only the map filters kept in float)
            models["INT8 + bank"], _ = quantize_int8(onnx32, calib, keep_fp32=keep_fp32_nodes(onnx32, bank=False))
        backends = make_backends(name, method, models)
        rng = np.random.default_rng(0)
        batches = {b: rng.integers(0, 256, (b, 3, crop, crop), dtype=np.uint8) for b in (1, 8)}
        base = {}
        for backend, prec, run in backends:
            rates = {b: timed(lambda: run(x), args.warmup, args.iters) * b for b, x in batches.items()}
            if backend == "torch":
                base = rates
            restricted = "not restricted" if (args.isa != "native" and backend == "onnxruntime") else ""
            rows.append((name, backend, prec, rates[1], rates[8], rates[1] / base[1], rates[8] / base[8], restricted))
            print(f"  {name} {backend} {prec}: {rates[1]:.2f} / {rates[8]:.2f} img/s", flush=True)
        if name == "patchcore":
            accuracy(name, method, backends, calib)

    for item in [c.strip() for c in args.checkpoints.split(",") if c.strip()]:
        name, _, path = item.partition("=")
        path = Path(path)
        if path.is_dir():
            path = sorted(path.glob("*/*.safetensors"))[-1]
        tensors, meta = load_state(path)
        method = load_trained(name, None, tensors, meta, str(path))
        spec = method.input_spec
        calib = calibration_images(train.image_path, int(spec["resize"]), int(spec["crop"]), limit=args.calibration)
        onnx32, _ = export_uint8_onnx(method)
        int8, qinfo = quantize_int8(onnx32, calib)
        notes.append(f"{name}: checkpoint {path}; INT8: {qinfo['quantised_nodes']} nodes quantised, "
                     f"{len(qinfo['kept_fp32'])} kept in float")
        backends = make_backends(name, method, {"fp32": onnx32, "INT8": int8})
        accuracy(name, method, backends, calib)
    print()
    print("| model | backend | precision | img/s batch 1 | img/s batch 8 | x torch (b1) | x torch (b8) | note |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]} |")
    if acc_rows:
        print()
        print(f"Accuracy on the embedded test set (100 images, the evaluation's crop), each backend against torch fp32; "
              f"self-test: uad.deploy.runtime.self_test_difference on 4 training normals (largest score difference and "
              f"mean map difference, relative) and the verdict a deployed folder's load gives:")
        print()
        print("| model | backend | precision | image AUROC | pixel AUROC | max score diff (rel.) | max map diff (rel.) | self-test |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
        for r in acc_rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.1e} | {r[6]:.1e} | {r[7]} |")
        print()
        ref = {}
        for r in acc_rows:
            if r[1] == "torch":
                ref[r[0]] = r
            elif "INT8" in r[2]:
                t = ref[r[0]]
                print(f"- {r[0]} {r[1]} {r[2]} against fp32: image AUROC {100 * (r[3] - t[3]):+.2f}, "
                      f"pixel AUROC {100 * (r[4] - t[4]):+.2f} points")
    print()
    for n in notes:
        print(f"- {n}")
    print(f"total wall time: {time.perf_counter() - t_start:.0f} s; load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
