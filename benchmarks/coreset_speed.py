"""PatchCore's greedy coreset: the dense selection against the lazy blocked one, same indices.

    python benchmarks/coreset_speed.py                 # real patch features, quick PatchCore
    python benchmarks/coreset_speed.py --random        # Gaussian blobs instead (the hard case)

The features are the quick profile's PatchCore patches (EfficientNet-Lite0 stages 2-3, bundled
ImageNet weights, 224 crop: 784 patches an image) of ``--per-class`` normal images of each class
of the embedded dataset (train, then test ``good`` images): 4 x 40 images = 125,440 patches, the
size of the quick profile on four classes of 40 images. Both selections run on the same 128-d
projection; the script checks the indices are equal and prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from uad.methods.patchcore import model as M  # noqa: E402


def real_features(per_class: int) -> torch.Tensor:
    import pandas as pd

    from uad.data.synthetic import ensure_synthetic_dataset
    from uad.data.torch_data import AnomalyImageDataset
    from uad.methods.registry import build_method

    root = ensure_synthetic_dataset(ROOT / "data/01_raw/synthetic", seed=0)
    rows = []
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = sorted((root / cls / "train/good").glob("*.png")) + sorted((root / cls / "test/good").glob("*.png"))
        rows += [{"image_path": str(f), "class_name": cls, "label": 0, "mask_path": ""} for f in files[:per_class]]
    df = pd.DataFrame(rows)
    method = build_method("patchcore", {"backbone": "tf_efficientnet_lite0", "weights": "auto", "layers": [2, 3],
                                         "resize": 256, "crop": 224})
    method.eval_mode()
    sp = method.input_spec
    ds = AnomalyImageDataset(df, sp["resize"], sp["crop"], sp["mean"], sp["std"])
    feats = []
    with torch.no_grad():
        for s in range(0, len(ds), 16):
            x = torch.stack([ds[i]["image"] for i in range(s, min(len(ds), s + 16))])
            feats.append(M.flatten_patches(method.features(x)))
    return torch.cat(feats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--ratio", type=float, default=0.1, help="coreset ratio (PatchCore's 10 %%)")
    ap.add_argument("--random", action="store_true", help="Gaussian blobs (125,440 x 1024) instead of real patches")
    ap.add_argument("--skip-dense", action="store_true", help="time only the lazy selection")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    if args.random:
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(200, 1024, generator=g) * 2
        feats = centres[torch.randint(200, (125440,), generator=g)] + torch.randn(125440, 1024, generator=g)
    else:
        feats = real_features(args.per_class)
    print(f"features {tuple(feats.shape)} in {time.perf_counter() - t0:.1f} s", flush=True)
    z = M.random_projection(feats, 128, seed=0)
    n = int(round(args.ratio * z.shape[0]))
    start = int(torch.randint(z.shape[0], (1,), generator=torch.Generator().manual_seed(1)))
    t0 = time.perf_counter()
    lazy = M._greedy_lazy(z, n, start)
    t_lazy = time.perf_counter() - t0
    print(f"lazy  {n} of {z.shape[0]}: {t_lazy:.1f} s", flush=True)
    if args.skip_dense:
        return
    t0 = time.perf_counter()
    dense = M._greedy_dense(z, n, start)
    t_dense = time.perf_counter() - t0
    same = bool(torch.equal(dense, lazy))
    print(f"dense {n} of {z.shape[0]}: {t_dense:.1f} s")
    print(f"same indices: {same}; speed-up x{t_dense / t_lazy:.1f} ({torch.get_num_threads()} thread(s))")
    if not same:
        first = int((dense != lazy).nonzero()[0])
        raise SystemExit(f"Error: the selections differ from step {first}")


if __name__ == "__main__":
    main()
