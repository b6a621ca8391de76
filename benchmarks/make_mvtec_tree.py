"""Write an MVTec-AD-sized folder tree for timing the data path and the end-to-end pipeline.

Same layout, classes, image counts and image sizes as MVTec-AD (15 classes, 3,629 training and
1,725 test images, 700-1024 px, three grey-scale classes; every defective test image with its
``ground_truth`` mask), but generated pictures: a per-class texture (smooth noise at two scales,
grain) shifted and re-noised per image, with an elliptic defect on the defective test images.
The PNGs are about as large as MVTec's (around 1-2 MB at 1024 px, RGB), so decoding them costs
what decoding MVTec costs. Nothing here is meant to be detected well: random-weight models on it
measure speed, not accuracy.

Usage::

    python benchmarks/make_mvtec_tree.py --out /tmp/mvtec_sized            # the whole tree
    python benchmarks/make_mvtec_tree.py --out /tmp/mvtec_small --scale 0.05  # 5 % of the images

Then, for example::

    UAD_DATA_ROOT=/tmp/mvtec_sized kedro run --pipeline=dinomaly --env=mvtec
    python benchmarks/bench_data.py --root /tmp/mvtec_sized --workers 16

Only numpy and Pillow are needed. Images are written in parallel (``--jobs``, default: every core).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# class: (train good, test good, test defective, side in px, grey)  -- MVTec-AD's own figures
MVTEC_CLASSES: dict[str, tuple[int, int, int, int, bool]] = {
    "bottle": (209, 20, 63, 900, False),
    "cable": (224, 58, 92, 1024, False),
    "capsule": (219, 23, 109, 1000, False),
    "carpet": (280, 28, 89, 1024, False),
    "grid": (264, 21, 57, 1024, True),
    "hazelnut": (391, 40, 70, 1024, False),
    "leather": (245, 32, 92, 1024, False),
    "metal_nut": (220, 22, 93, 700, False),
    "pill": (267, 26, 141, 800, False),
    "screw": (320, 41, 119, 1024, True),
    "tile": (230, 33, 84, 840, False),
    "toothbrush": (60, 12, 30, 1024, False),
    "transistor": (213, 60, 40, 1024, False),
    "wood": (247, 19, 60, 1024, False),
    "zipper": (240, 32, 119, 1024, True),
}


def _smooth(rng: np.random.Generator, side: int, cells: int, channels: int) -> np.ndarray:
    low = rng.random((cells, cells, channels), dtype=np.float32)
    im = Image.fromarray((low * 255).astype(np.uint8).squeeze() if channels == 1 else (low * 255).astype(np.uint8))
    return np.asarray(im.resize((side, side), Image.BICUBIC), dtype=np.float32).reshape(side, side, channels) / 255.0


@functools.lru_cache(maxsize=2)
def _texture(cls: str, side: int, grey: bool) -> np.ndarray:
    rng = np.random.default_rng(sum(ord(c) * 31**i for i, c in enumerate(cls)) % 2**32)
    ch = 1 if grey else 3
    base = 0.55 * _smooth(rng, side, 6, ch) + 0.3 * _smooth(rng, side, 48, ch)
    return base + 0.08 * rng.random((side, side, ch), dtype=np.float32)


def _write(task: tuple[str, str, int, int, bool, bool, str]) -> int:
    cls, rel, index, side, grey, defect, root = task
    tex = _texture(cls, side, grey)
    rng = np.random.default_rng([index, side, len(cls), int(defect), len(rel)])
    img = np.roll(tex, (int(rng.integers(side)), int(rng.integers(side))), axis=(0, 1))
    img = img + 0.015 * rng.standard_normal(img.shape, dtype=np.float32)
    mask = None
    if defect:
        yy, xx = np.ogrid[:side, :side]
        cy, cx = rng.integers(side // 5, 4 * side // 5, size=2)
        ry, rx = rng.integers(side // 40, side // 10, size=2)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        img[mask] = 1.0 - img[mask]
    arr = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    arr = arr[..., 0] if grey else arr
    out = Path(root) / cls / rel / f"{index:03d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(out, compress_level=6)
    n = out.stat().st_size
    if mask is not None:
        mpath = Path(root) / cls / "ground_truth" / Path(rel).name / f"{index:03d}_mask.png"
        mpath.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mpath)
    return n


def tasks(root: Path, scale: float = 1.0, classes: list[str] | None = None) -> list[tuple]:
    out = []
    for cls, (n_train, n_good, n_bad, side, grey) in MVTEC_CLASSES.items():
        if classes and cls not in classes:
            continue
        k = lambda n: max(1, int(round(n * scale)))  # noqa: E731
        out += [(cls, "train/good", i, side, grey, False, str(root)) for i in range(k(n_train))]
        out += [(cls, "test/good", i, side, grey, False, str(root)) for i in range(k(n_good))]
        out += [(cls, "test/defect", i, side, grey, True, str(root)) for i in range(k(n_bad))]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write (created; existing files are overwritten)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of MVTec's image counts (sizes unchanged)")
    ap.add_argument("--classes", default="", help="comma list of classes (default: all 15)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    root = Path(args.out)
    todo = tasks(root, args.scale, [c for c in args.classes.split(",") if c])
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        sizes = list(pool.map(_write, todo, chunksize=8))
    n_train = sum(1 for t in todo if t[1].startswith("train"))
    print(f"wrote {len(todo)} images ({n_train} train, {len(todo) - n_train} test) to {root} in "
          f"{time.perf_counter() - t0:.0f} s; mean PNG {np.mean(sizes) / 2**20:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
