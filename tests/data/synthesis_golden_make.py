"""Make ``synthesis_golden.json``: the training losses of the two stages that learn from pseudo
anomalies (INP-Former++ residual, CostFilter-AD over Dinomaly), per step, as float.hex.

Run once at commit 7e3be83, before the synthesis stage existed (the training node then read
``params:synthesis`` itself); ``tests/test_synthesis_stage.py`` trains the same way through the
synthesis spec and must see the same bits. It calls the pre-change node API, so to remake the
file check that commit out: ``git worktree add /tmp/old 7e3be83 && cd /tmp/old &&
python /path/to/this/script.py /path/to/tests/data/synthesis_golden.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uad.data.synthetic import ensure_synthetic_dataset
from uad.pipelines.ingest.nodes import build_sample_index
from uad.pipelines.method.nodes import train_stage

ENGINE = {"device": "cpu", "progress": False, "log_every": 1, "seed": 3}
INP = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=64, crop=56,
           iterations=2, residual_iterations=3, batch_size=2)
DINO = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=64, crop=56,
            iterations=1, batch_size=2)
COST = dict(volume_size=16, base_width=8, batch_size=2, iterations=3)


def make_dtd(root: Path) -> Path:
    for i in range(4):
        d = root / "images" / ("banded" if i % 2 else "dotted")
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(100 + i)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"t{i}.jpg", quality=95)
    return root


def cases(work: Path):
    data = work / "parts"
    ensure_synthetic_dataset(data, seed=0, classes=["wood", "washer"], n_train=4, n_test_good=1, n_test_bad_per_defect=1)
    index = build_sample_index({"root": str(data), "layout": "mvtec"})
    train = index[index["split"] == "train"].reset_index(drop=True)
    dtd = make_dtd(work / "dtd")
    synth_fallback = {"texture_source": "fallback", "self_texture_images": 3, "foreground_classes": ["washer"]}
    synth_dtd = {"texture_source": "dtd", "dtd_root": str(dtd), "foreground_classes": ["washer"]}
    return train, {"fallback": synth_fallback, "dtd": synth_dtd}


def run_old(train, synth: dict) -> dict[str, list[str]]:
    out = {}
    rec, _, _ = train_stage("inpformer", "reconstruction", train, {}, INP, ENGINE, {}, synthesis=synth)
    _, hist, _ = train_stage("inpformer", "residual", train, {}, INP, ENGINE, {}, synthesis=synth, previous=rec)
    out["inpformer_residual"] = [float(r["value"]).hex() for r in hist["train_loss/residual"]]
    base, _, _ = train_stage("dinomaly", "train", train, {}, DINO, ENGINE, {})
    params = {**COST, "base": "dinomaly", "base_params": DINO}
    _, hist, _ = train_stage("costfilter", "filter", train, {}, params, ENGINE, {}, synthesis=synth, base=base)
    out["costfilter_filter"] = [float(r["value"]).hex() for r in hist["train_loss/filter"]]
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        train, synths = cases(Path(tmp))
        golden = {name: run_old(train, s) for name, s in synths.items()}
    Path(sys.argv[1]).write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(json.dumps(golden, indent=1))
