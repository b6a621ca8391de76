"""What a trained CostFilter-AD's output is made of, base by base: its filter's map P alone, the
base's own map and score, and the output (P, or the blend ``lambda P + (1 - lambda) M_base``),
each scored on the test split; and how P is spread (its mean on normal and on defective pixels,
the share of pixels where it says "anomalous", the base map's range next to lambda P's).

Reads the latest ``costfilter_<base>.checkpoint_filter`` of the catalog for each base given (the
filter, its base and its settings are all in it) and ``test_index`` (same ``--env`` as the runs).

Usage::

    python benchmarks/costfilter_parts.py --bases patchcore,dinomaly,inpformer,rlr,agpnet
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_curve import ROOT, _metrics, _session_params  # noqa: E402


@torch.no_grad()
def parts(method, ds, df) -> dict:
    from torch.utils.data import DataLoader

    method.eval_mode()
    size = (method.input_spec["crop"],) * 2
    out = {"P": [], "output": [], "base": []}
    scores = {"P": [], "output": [], "base": []}
    masks = []
    for batch in DataLoader(ds, batch_size=8):
        x = batch["image"].to(method.device)
        view = method.base.view(x, with_prediction=True)
        logits, _ = method.filter(view)
        prob = method.probability(logits, size)
        maps, s = method.output(logits, view, size)
        for key, m, sc in (("P", prob, method.image_score(prob)), ("output", maps, s),
                           ("base", view.prediction.maps, view.prediction.scores)):
            out[key].append(m.float().cpu())
            scores[key].append(sc.float().cpu())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    mask = np.concatenate(masks)
    labels, classes = df["label"].to_numpy(), df["class_name"].to_numpy()
    report = {}
    for key in out:
        maps = torch.cat(out[key]).numpy()
        report[key] = _metrics(labels, torch.cat(scores[key]).numpy(), mask, maps, classes)
    p = torch.cat(out["P"]).numpy()
    base = torch.cat(out["base"]).numpy()
    report["P_mean_normal_pixels"] = float(p[~mask].mean())
    report["P_mean_defect_pixels"] = float(p[mask].mean()) if mask.any() else None
    report["P_share_above_half"] = float((p > 0.5).mean())
    report["base_map_p1_p99"] = [float(np.percentile(base, 1)), float(np.percentile(base, 99))]
    report["blend"] = float(method.cfg.blend)
    report["base_map"] = method.cfg.base_map
    report["preset"] = method.cfg.preset
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bases", default="patchcore,dinomaly,inpformer,rlr,agpnet")
    ap.add_argument("--env", default="quick")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import os

    os.chdir(ROOT)
    from uad.methods.registry import build_method
    from uad.engine.orchestration import method_dataset as _dataset

    params, catalog = _session_params(args.env)
    test_index = catalog.load("test_index")
    result = {}
    for base in args.bases.split(","):
        ckpt = catalog.load(f"costfilter_{base}.checkpoint_filter")
        method = build_method("costfilter", ckpt["meta"]["params"])
        method.load_state_dict(ckpt["tensors"])
        method.to("cpu")
        classes = sorted(set(ckpt["meta"].get("classes") or []) | set(test_index["class_name"].unique()))
        ds = _dataset(method, test_index, classes)
        result[base] = {"checkpoint": str(ckpt.get("path")), **parts(method, ds, test_index)}
        print(json.dumps({base: result[base]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
