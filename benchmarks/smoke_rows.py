"""The README's smoke rows, reproduced from a commit: each pipeline's mean image AUROC, pixel AUROC
and pixel AUPRO, as whole ``kedro run --pipeline=<p> --env=smoke`` commands in a fresh worktree.

    python benchmarks/smoke_rows.py --ref HEAD
    python benchmarks/smoke_rows.py --ref 1d4499f --ref HEAD      # before / after, side by side

Each commit runs in its own git worktree (its own conf/, data/ and mlflow.db) with
``PYTHONPATH=<worktree>/src``, so only the project's code differs. Pipelines run in the order given
(a plug-in after its base). The metrics are read from each run's ``metrics_per_class.csv``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import KEDRO, ROOT, worktree  # noqa: E402

PIPELINES = ("patchcore", "dinomaly", "inpformer", "rlr", "agpnet", "costfilter_dinomaly")
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def run_rows(tree: Path, pipelines: list[str]) -> dict[str, tuple[float, ...]]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "KEDRO_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tree / 'mlflow.db'}"}
    rows = {}
    for p in pipelines:
        t0 = time.perf_counter()
        out = subprocess.run([*KEDRO, "run", f"--pipeline={p}", "--env=smoke"], cwd=tree, env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"Error: {p} failed in {tree}:\n{out.stderr[-3000:]}")
        table = tree / "data" / "08_reporting" / p / "metrics_per_class.csv"
        if table.is_dir():  # a versioned dataset: the newest version
            table = sorted(table.glob("*/metrics_per_class.csv"))[-1]
        mean = pd.read_csv(table).set_index("class_name").loc["mean"]
        rows[p] = tuple(float(mean[m]) for m in METRICS) + (time.perf_counter() - t0,)
        print(f"{tree.name} {p}: " + " / ".join(f"{v:.3f}" for v in rows[p][:3]) + f" ({rows[p][3]:.0f} s)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", action="append", help="a commit (give two for before / after); default HEAD")
    ap.add_argument("--pipelines", default="+".join(PIPELINES))
    args = ap.parse_args()
    refs = args.ref or ["HEAD"]
    pipelines = args.pipelines.split("+")
    tmp = Path(tempfile.mkdtemp(prefix="uad-smoke-"))
    results = {}
    try:
        for k, ref in enumerate(refs):
            tree = worktree(ref, tmp / f"t{k}")
            results[ref] = run_rows(tree, pipelines)
    finally:
        for k in range(len(refs)):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / f"t{k}")], capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
    head = " | ".join(f"{r}: image / pixel AUROC / AUPRO" for r in refs)
    print(f"\n| pipeline (smoke) | {head} | equal |\n|---|" + "---|" * len(refs) + "---|")
    for p in pipelines:
        cells = [" / ".join(f"{v:.3f}" for v in results[r][p][:3]) for r in refs]
        same = all(results[r][p][:3] == results[refs[0]][p][:3] for r in refs)
        print(f"| `{p}` | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
