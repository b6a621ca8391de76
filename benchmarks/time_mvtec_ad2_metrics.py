"""Seconds the evaluation's metrics take on synthetic maps: the seven metrics and the three beside
them (SegF1 with its validation threshold, AU-PRO to 0.05, AUPIMO), at the embedded tree's size and
at MVTec AD 2's size. Usage: python benchmarks/time_mvtec_ad2_metrics.py [embedded|ad2|ad2_full]"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from uad.metrics.metrics import compute_metrics
from uad.metrics.mvtec_ad2 import extra_metrics

# (classes, test images per class, anomalous per class, validation images per class, map side)
SIZES = {"embedded": (4, 25, 15, 8, 112),          # the smoke e2e: 4 classes, crop 112
         "ad2": (8, 125, 80, 40, 392),             # MVTec AD 2 test_public (~1,000 images) at a 392 crop
         "ad2_full": (1, 40, 25, 20, 2048)}        # one object, 2048 x 2048 maps (near full resolution)


def maps_of(classes: int, n: int, n_bad: int, side: int, rng):
    labels = np.tile(np.r_[np.zeros(n - n_bad, np.int64), np.ones(n_bad, np.int64)], classes)
    maps = rng.random((classes * n, side, side), dtype=np.float32)
    masks = np.zeros(maps.shape, bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, side - side // 8, 2)
        masks[i, y:y + side // 10, x:x + side // 12] = True
    maps[masks] += 0.5
    names = np.repeat([f"c{k}" for k in range(classes)], n)
    return labels, maps, masks, names


def main(which: str) -> dict:
    classes, n, n_bad, n_val, side = SIZES[which]
    rng = np.random.default_rng(0)
    labels, maps, masks, names = maps_of(classes, n, n_bad, side, rng)
    vmaps = rng.random((classes * n_val, side, side), dtype=np.float32)
    vnames = np.repeat([f"c{k}" for k in range(classes)], n_val)
    t0 = time.perf_counter()
    compute_metrics(labels, maps.max(axis=(1, 2)), masks, maps, names)
    t1 = time.perf_counter()
    extra_metrics(labels, masks, maps, names, vmaps, vnames)
    t2 = time.perf_counter()
    return {"size": which, "classes": classes, "test_maps": int(maps.shape[0]), "validation_maps": int(vmaps.shape[0]),
            "side": side, "seven_metrics_s": round(t1 - t0, 2), "segf1_aupro005_aupimo_s": round(t2 - t1, 2)}


if __name__ == "__main__":
    for which in sys.argv[1:] or ["embedded", "ad2"]:
        print(json.dumps(main(which)), flush=True)
