"""The CostFilter-AD plug-in table of the ``calibrated`` preset, printed from the learning-curve
reports (``benchmarks/learning_curve.py --params preset=calibrated ...``), never typed by hand.

For each base: at the chosen budget, the base alone, P alone and the calibrated blend on the same
test images (image AUROC / pixel AUROC / pixel AUPRO, mean over classes), the gain of the blend
over the base, the weights the validation chose (map, score) and P's and the base's validation
AUROC (held-out normals + pseudo anomalies), and the filter's training seconds to that budget.
Reports that carry them add: the gain of the earlier chooser (the filter's own recipe, no bootstrap
test) on the same filter, and the largest gain any weight gives when swept on the test split itself
(an upper bound no run may use; means over classes like the other columns; reports made before the
sweep carried AUPRO pooled their AUROC over the classes, an indication only).

Usage::

    python benchmarks/costfilter_calibrated_table.py docs/figures/costfilter_calibrated_*.json [--steps 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def _fmt(m: dict) -> str:
    return " / ".join(f"{m[k]:.3f}" for k in KEYS)


def rows(paths: list[Path], steps: int | None, every: bool = False) -> list[str]:
    out = ["| base | steps | base alone | P alone | calibrated blend | gain (points) | weights map / score "
           "| validation image AUROC / pixel AUROC / AUPRO: P, base | own recipe, no bootstrap: gain "
           "| test sweep: best gain | filter training (s) |",
           "| --- | ---: | --- | --- | --- | --- | --- | --- | --- | --- | ---: |"]
    for path in paths:
        rep = json.loads(path.read_text())
        pts = rep["points"]
        pick = [p for p in pts if steps is None or p["steps"] == steps] or pts
        for p in (pick if every else pick[-1:]):
            out.append(_row(rep, p))
    return out


def _row(rep: dict, p: dict) -> str:
    v = p["validation"]
    gain = " / ".join(f"{100 * (p['blend'][k] - p['base'][k]):+.1f}" for k in KEYS)
    own = (p.get("variants") or {}).get("own")
    old = " / ".join(f"{100 * (own['test_without_bootstrap'][k] - p['base'][k]):+.1f}" for k in KEYS) if own else "-"
    if p.get("test_sweep"):
        sweep = p["test_sweep"]
        at0 = next(c for c in sweep if c[0] == 0.0)
        bound = " / ".join(f"{100 * (max(c[i] for c in sweep) - at0[i]):+.1f}" for i in range(1, len(at0)))
        if len(at0) < 4:
            bound += " (pooled)"
    else:
        bound = "-"

    def val(who: str) -> str:
        return " / ".join(f"{v.get(f'val_{who}_{k}', float('nan')):.3f}" for k in KEYS)
    return (f"| `{rep['pipeline'].split('_', 1)[1]}` | {p['steps']} | {_fmt(p['base'])} | {_fmt(p['p'])} | "
            f"{_fmt(p['blend'])} | {gain} | {v['map_weight']:g} / {v['score_weight']:g} | "
            f"{val('p')}, {val('base')} | {old} | {bound} | {p['train_seconds']:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, default=None, help="the budget to read (default: each report's last)")
    ap.add_argument("--every", action="store_true", help="a row for every budget of each report")
    args = ap.parse_args()
    print("\n".join(rows(args.reports, args.steps, args.every)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
