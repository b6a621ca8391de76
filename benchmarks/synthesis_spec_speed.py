"""What the synthesis stage costs on a DTD-sized texture folder (issue 24).

Makes a folder shaped like DTD (47 categories x 120 JPEGs of about DTD's size; noise, so the
files are as large as real photos) unless ``--dtd`` names a real one, then times
``uad.synthesis.spec.build_spec`` (list + digest of every file) cold (no digest cache) and warm
(digests cached by file stat), and ``check_spec_current`` (what every training node runs).

    python benchmarks/synthesis_spec_speed.py [--dtd /data/dtd] [--work /tmp/uad-dtd-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def make_dtd(root: Path, categories: int = 47, per: int = 120, size: tuple[int, int] = (480, 400)) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    for c in range(categories):
        d = root / "images" / f"cat{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per):
            p = d / f"cat{c:02d}_{i:04d}.jpg"
            if p.exists():
                continue
            small = np.roll(base, (c * 7 + i) % 50, axis=1) ^ rng.integers(0, 64, base.shape, dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.BILINEAR)
            arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(p, quality=90)
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtd", default=None)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "uad-dtd-bench"))
    args = ap.parse_args()
    work = Path(args.work)
    dtd = Path(args.dtd) if args.dtd else make_dtd(work / "dtd")
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["UAD_CACHE_DIR"] = str(cache)  # a fresh digest cache: the first build reads every byte

    from uad.synthesis.spec import build_spec, check_spec_current

    files = [p for p in (dtd / "images").rglob("*") if p.is_file()]
    mb = sum(p.stat().st_size for p in files) / 2**20
    train = pd.DataFrame([{"image_path": "", "mask_path": "", "label": 0, "class_name": "x", "defect_type": "good",
                           "split": "train", "dataset": "d"}])
    synth = {"texture_source": "dtd", "dtd_root": str(dtd)}
    rows = []
    for label in ("build_spec, cold (no digest cache)", "build_spec, warm (cached digests)"):
        t = time.perf_counter()
        spec = build_spec("inpformer", {"residual": "draem"}, train, synth, 1, [None])
        rows.append((label, time.perf_counter() - t))
    t = time.perf_counter()
    check_spec_current(spec, 1)
    rows.append(("check_spec_current (each training node)", time.perf_counter() - t))
    print(f"{len(files)} files, {mb:.0f} MB under {dtd}; cores {os.cpu_count()}; load {os.getloadavg()}")
    print("| step | seconds |\n| --- | ---: |")
    for label, sec in rows:
        print(f"| {label} | {sec:.2f} |")


if __name__ == "__main__":
    main()
