"""One benchmark results file -> the Markdown table the README shows, with where it came from.

    python benchmarks/readme_tables.py                       # latest data/08_reporting/benchmark/comparison.csv
    python benchmarks/readme_tables.py path/to/comparison.csv --metrics image_auroc,pixel_auroc,pixel_aupro

Reads a ``comparison.csv`` written by ``kedro run --pipeline=benchmark`` (one row per method x
setting x seed: the mean metrics of the child run, its training seconds and scoring rate, its
MLflow run id) and prints a Markdown table: one row per method (and setting, when there are
several), one column per metric, metrics to 3 decimals; with several seeds a cell is
``mean ± sd`` over them. Above the table, one line says which file, when it was written, the
commit and Kedro env of the child runs and the command that makes it again (rebuilt from the
methods and seeds in the file; ``--command`` states it when the run had other ``--params``).

The date is the Kedro version folder the file sits in (``comparison.csv/<UTC timestamp>/``), else
the file's modification time. The commit and env come from the child runs' MLflow tags
(``git_commit``, ``kedro_env``; store: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the
project's ``mlflow.db``); ``--commit`` / ``--env`` give them when no store can be read.

Every figure of one table comes from one file: regenerate the file, then the table, never edit
a figure by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "data" / "08_reporting" / "benchmark" / "comparison.csv"
METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
HEADERS = {
    "image_auroc": "image AUROC", "image_ap": "image AP", "image_f1max": "image F1-max",
    "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP", "pixel_f1max": "pixel F1-max",
    "pixel_aupro": "pixel AUPRO", "train_seconds": "training (s)", "scoring_img_per_s": "scoring (img/s)",
}
#: decimals of a column (metrics: 3)
DECIMALS = {"train_seconds": 0, "scoring_img_per_s": 1}
DEFAULT_COLUMNS = "image_auroc,pixel_auroc,pixel_aupro,train_seconds,scoring_img_per_s"
DEFAULT_METHODS = ("patchcore", "dinomaly", "inpformer", "rlr", "agpnet")
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")


def resolve(path: Path) -> Path:
    """The CSV file: ``path`` itself, or the latest version inside a Kedro versioned folder."""
    if path.is_file():
        return path
    if path.is_dir():
        versions = sorted(d for d in path.iterdir() if d.is_dir() and _VERSION.match(d.name) and (d / path.name).is_file())
        if versions:
            return versions[-1] / path.name
    raise SystemExit(f"no results file at {path}; run `kedro run --pipeline=benchmark` first or name a comparison.csv")


def written_at(csv: Path) -> str:
    """UTC time the file was written: its Kedro version folder, else its modification time."""
    if _VERSION.match(csv.parent.name):
        return dt.datetime.strptime(csv.parent.name, "%Y-%m-%dT%H.%M.%S.%fZ").strftime("%Y-%m-%d %H:%M UTC")
    return dt.datetime.fromtimestamp(csv.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_tags(run_ids: list[str], tracking_uri: str | None) -> dict[str, dict[str, str]]:
    """MLflow tags of each child run ({} when no store can be read)."""
    ids = [str(r) for r in run_ids if isinstance(r, str) and r]
    if not ids:
        return {}
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        db = ROOT / "mlflow.db"
        if not db.is_file():
            return {}
        uri = f"sqlite:///{db}"
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        return {r: dict(client.get_run(r).data.tags) for r in ids}
    except Exception as exc:  # noqa: BLE001 - provenance is best effort; the table still prints
        print(f"(could not read the child runs from {uri}: {exc})", file=sys.stderr)
        return {}


def _one(values: set[str], given: str | None) -> str:
    if given:
        return given
    values = {v for v in values if v}
    return ", ".join(sorted(values)) if values else "unknown"


def command(table: pd.DataFrame, env: str) -> str:
    """The ``kedro run`` that writes this table again (methods and seeds as in the file)."""
    methods = list(dict.fromkeys(table["method"].astype(str)))
    seeds = sorted({int(s) for s in table["seed"]}) if "seed" in table else []
    parts = [] if tuple(methods) == DEFAULT_METHODS else ["benchmark.methods=" + "+".join(methods)]
    if len(seeds) > 1:
        parts.append("benchmark.seeds=" + "+".join(str(s) for s in seeds))
    elif seeds and seeds[0] != 1:  # 1: the base profile's engine.seed
        parts.append(f"engine.seed={seeds[0]}")
    cmd = f"kedro run --pipeline=benchmark --env={env}"
    settings = sorted(set(table["setting"].astype(str))) if "setting" in table else []
    note = "" if settings in ([], ["multi_class"]) else f" (settings: {', '.join(settings)}; as in params:benchmark)"
    return cmd + (f' --params="{",".join(parts)}"' if parts else "") + note


def cell(values: pd.Series, decimals: int) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "—"
    if len(v) == 1:
        return f"{v.iloc[0]:.{decimals}f}"
    sd = float(v.std(ddof=1))
    return f"{v.mean():.{decimals}f} ± {sd:.{decimals}f}" if math.isfinite(sd) else f"{v.mean():.{decimals}f}"


def markdown(table: pd.DataFrame, columns: list[str]) -> str:
    several_settings = table["setting"].nunique() > 1 if "setting" in table else False
    seeds = table["seed"].nunique() if "seed" in table else 1
    head = ["method"] + (["setting"] if several_settings else []) + [HEADERS.get(c, c) for c in columns]
    if seeds > 1:
        head.append("seeds")
    lines = ["| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] * (1 + several_settings) + ["---:"] * (len(head) - 1 - several_settings)) + " |"]
    keys = ["method", "setting"] if "setting" in table else ["method"]
    for key, rows in table.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = [f"`{key[0]}`"] + ([str(key[1])] if several_settings else [])
        row += [cell(rows[c], DECIMALS.get(c, 3)) if c in rows else "—" for c in columns]
        if seeds > 1:
            row.append(str(rows["seed"].nunique()))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", type=Path, default=DEFAULT,
                    help="comparison.csv, or its Kedro versioned folder (latest version); default: %(default)s")
    ap.add_argument("--metrics", default=DEFAULT_COLUMNS,
                    help=f"columns, comma-separated, of {', '.join(METRICS)}, train_seconds, scoring_img_per_s")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store of the child runs (commit and env)")
    ap.add_argument("--commit", default=None, help="the commit, when no MLflow store can be read")
    ap.add_argument("--env", default=None, help="the Kedro env, when no MLflow store can be read")
    ap.add_argument("--command", default=None,
                    help="the command that wrote the file, when it had more --params than methods and seeds")
    args = ap.parse_args(argv)

    csv = resolve(args.path)
    table = pd.read_csv(csv)
    if table.empty or "method" not in table:
        raise SystemExit(f"{csv}: not a benchmark comparison table (no rows or no 'method' column)")
    columns = [c.strip() for c in args.metrics.split(",") if c.strip()]
    unknown = [c for c in columns if c not in table.columns]
    if unknown:
        raise SystemExit(f"{csv}: no column(s) {unknown}; it has {list(table.columns)}")
    tags = run_tags(list(table["run_id"]) if "run_id" in table else [], args.tracking_uri)
    commit = _one({t.get("git_commit", "") for t in tags.values()}, args.commit)
    env = _one({t.get("kedro_env", "") for t in tags.values()}, args.env)
    try:
        shown = csv.resolve().relative_to(ROOT)
    except ValueError:
        shown = csv
    reused = int(table["reused"].astype(str).str.lower().eq("true").sum()) if "reused" in table else 0
    print(f"From `{shown}`, written {written_at(csv)}, commit {commit}, env {env}"
          + (f" ({reused} of {len(table)} child runs reused from an earlier benchmark)" if reused else "")
          + f"; made by `{args.command or command(table, env if env != 'unknown' else '<env>')}`; "
          f"table: `python benchmarks/readme_tables.py {shown}`.")
    print()
    print(markdown(table, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
