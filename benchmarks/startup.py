"""Start-up time of the project's commands, two commits side by side, as whole processes.

    python benchmarks/startup.py --old ae3899f --new HEAD --runs 5

Each commit is checked out into its own temporary git worktree (a project folder of its own:
its own conf/, data/ and mlflow.db) and run with ``PYTHONPATH=<worktree>/src``, so the installed
environment is shared and only the project's code differs. Every command runs once unmeasured in
each tree (the embedded dataset is generated, the MLflow store created), then ``--runs`` times
per tree, old and new interleaved so that a change in machine load hits both; the table gives the
medians, the ratio old/new and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BIN = Path(sys.executable).parent / "kedro"
KEDRO = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "kedro"]  # this environment's kedro
COMMANDS = {
    "kedro registry list": [*KEDRO, "registry", "list"],
    "kedro run --pipeline=ingest --env=smoke": [*KEDRO, "run", "--pipeline=ingest", "--env=smoke"],
    "kedro --help": [*KEDRO, "--help"],
    "python -c 'import uad.pipeline_registry'": [sys.executable, "-c", "import uad.pipeline_registry"],
}


#: where each commit keeps this package's ``kedro.init`` hook (it moved with the Kedro layer)
INIT_MODULES = ("uad.framework.kedro_internals", "uad.kedro_plugins")


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True,
                   capture_output=True)
    _forward_init_hook(where)
    return where


def _forward_init_hook(tree: Path) -> None:
    """The installed environment's ``kedro.init`` entry point names the module of the commit that was
    installed; a commit that keeps its hook elsewhere gets a two-line module there forwarding to its
    own, so each tree starts with its own start-up code (without it the old tree would lose its
    lazy plug-in commands and be measured slower than it is)."""
    import importlib.metadata

    eps = [ep for ep in importlib.metadata.entry_points(group="kedro.init") if ep.name == "uad"]
    if not eps:
        return
    wanted = eps[0].value.split(":")[0]
    path = tree / "src" / (wanted.replace(".", "/") + ".py")
    if path.exists():
        return
    own = next((m for m in INIT_MODULES if (tree / "src" / (m.replace(".", "/") + ".py")).exists()), None)
    if own is None:
        return
    for parent in path.relative_to(tree / "src").parents:
        init = tree / "src" / parent / "__init__.py"
        if parent != Path(".") and not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text("")
    path.write_text(f"from {own} import init  # noqa: F401  (benchmarks/startup.py: this commit's hook)\n")


def timed(cmd: list[str], tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "KEDRO_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"Error: {' '.join(cmd)} failed in {tree} (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="HEAD~1", help="the reference commit (default HEAD~1)")
    ap.add_argument("--new", default="HEAD", help="the commit measured against it (default HEAD)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="uad-startup-"))
    trees = {}
    try:
        for label, ref in (("old", args.old), ("new", args.new)):
            trees[label] = worktree(ref, tmp / label)
        load_before = os.getloadavg()
        rows = []
        for name, cmd in COMMANDS.items():
            for tree in trees.values():
                timed(cmd, tree)  # warm-up: dataset generated, store created, files cached
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.runs):
                for label, tree in trees.items():
                    times[label].append(timed(cmd, tree))
            old, new = statistics.median(times["old"]), statistics.median(times["new"])
            rows.append((name, old, new, old / new))
            print(f"{name}: old {old:.2f} s, new {new:.2f} s, x{old / new:.1f}", flush=True)
        load_after = os.getloadavg()
        print(f"\n{os.cpu_count()} CPU(s); load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/"
              f"{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; "
              f"median of {args.runs} runs each, old = {args.old}, new = {args.new}\n")
        print("| command | old (s) | new (s) | old / new |\n|---|---:|---:|---:|")
        for name, old, new, ratio in rows:
            print(f"| `{name}` | {old:.2f} | {new:.2f} | {ratio:.1f}x |")
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)


if __name__ == "__main__":
    main()
