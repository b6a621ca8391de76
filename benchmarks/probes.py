"""Hostile probes of the command line, as a new user would meet them: bad data, bad parameters,
missing models, damaged files, a dead server, two runs at once. Each case runs real ``kedro run``
commands in a fresh copy of the project (smoke profile) and is judged on what the user sees:

* ``error``: exit 1, exactly one ``Error:`` line naming the file or setting, no traceback;
* ``recovered``: exit 0 and the promised result (the check named in the table).

    python benchmarks/probes.py            # all cases, then the table for the README
    python benchmarks/probes.py --only dead_server,bmp_change

The fast cases also live in tests/test_reliability.py; this script keeps the slow ones and the
whole table in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
_BIN = Path(sys.executable).parent / "kedro"
KEDRO = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "kedro"]


class Project:
    def __init__(self, where: Path):
        from kedro_harness import make_project_copy

        self.root = make_project_copy(where)
        self.env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "MPLBACKEND": "Agg",
                    "TQDM_DISABLE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{self.root / 'mlflow.db'}"}
        self.env.pop("UAD_DATA_ROOT", None)

    def run(self, *args: str, env: dict | None = None, background: bool = False):
        cmd = [*KEDRO, "run", "--env=smoke", *args]
        if background:
            return subprocess.Popen(cmd, cwd=self.root, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        return subprocess.run(cmd, cwd=self.root, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=900)


def _one_error(out, must: str) -> tuple[bool, str]:
    text = out.stdout + (out.stderr or "")
    errors = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    ok = out.returncode == 1 and "Traceback" not in text and len(errors) == 1 and must in errors[0]
    return ok, errors[0][:160] if errors else f"exit {out.returncode}, {text.count('Traceback')} traceback(s)"


def _images(folder: Path, n: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (i * 40, 80, 120)).save(folder / f"{i}.png")
    return folder


def _infer(p: "Project", tmp: Path, extra: str = ""):
    """``kedro run --pipeline=infer --namespaces=patchcore`` on a small folder of new images."""
    params = f"infer.images={_images(tmp / 'new')}" + (f",{extra}" if extra else "")
    return p.run("--pipeline=infer", "--namespaces=patchcore", f"--params={params}")


def _latest(folder: Path) -> Path:
    version = sorted(folder.iterdir())[-1]
    return version / folder.name


CASES: dict[str, tuple[str, Callable[[Project, Path], tuple[bool, str]]]] = {}


def case(name: str, kind: str):
    def deco(fn):
        CASES[name] = (kind, fn)
        return fn
    return deco


@case("missing_root", "error")
def _(p, tmp):
    return _one_error(p.run("--pipeline=ingest", "--params=data.root=/no/such/folder"), "data.root /no/such/folder")


@case("bad_batch_size", "error")
def _(p, tmp):
    return _one_error(p.run("--pipeline=dinomaly", "--params=engine.batch_size=abc"), "engine.batch_size")


@case("bad_learning_rate", "error")
def _(p, tmp):
    return _one_error(p.run("--pipeline=dinomaly", "--params=dinomaly.method.lr=fast"), "dinomaly.method.lr")


@case("checkpoint_every_zero", "error")
def _(p, tmp):
    return _one_error(p.run("--pipeline=dinomaly", "--params=engine.checkpoint_every=0"), "engine.checkpoint_every")


@case("negative_iterations", "error")
def _(p, tmp):
    return _one_error(p.run("--pipeline=dinomaly", "--params=engine.iterations=-5"), "engine.iterations")


@case("unknown_setting", "error")
def _(p, tmp):
    return _one_error(p.run("--pipeline=ingest", "--params=data.setting=bogus"), "data.setting")


@case("export_before_training", "error")
def _(p, tmp):
    return _one_error(p.run("--pipeline=export", "--namespaces=patchcore"), "no trained patchcore model")


@case("infer_before_training", "error")
def _(p, tmp):
    return _one_error(_infer(p, tmp), "no trained patchcore model")


@case("dead_tracking_server", "error")
def _(p, tmp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    ok, said = _one_error(p.run("--pipeline=synthesis", env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}),
                          "does not answer")
    return ok and time.monotonic() - t0 < 30, f"{said} ({time.monotonic() - t0:.0f} s)"


@case("split_file_outside_root", "error")
def _(p, tmp):
    root = tmp / "visa"
    _images(root / "candle/Data/Images/Normal", 1)
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text("object,split,label,image,mask\n"
                                            "candle,train,normal,candle/Data/Images/Normal/0.png,\n"
                                            "candle,test,normal,../../../../etc/hostname,\n")
    return _one_error(p.run("--pipeline=ingest", f"--params=data.root={root},data.layout=visa"), "outside the dataset root")


@case("train_patchcore", "recovered")
def _(p, tmp):
    out = p.run("--pipeline=patchcore")
    return out.returncode == 0, "trained (needed by the cases below)" if out.returncode == 0 else out.stderr[-300:]


@case("infer_threshold_not_a_number", "error")
def _(p, tmp):
    return _one_error(_infer(p, tmp, "infer.image_threshold=abc"), "infer.image_threshold")


@case("infer_max_overlays_zero", "recovered")
def _(p, tmp):
    out = _infer(p, tmp, "infer.max_overlays=0")
    if out.returncode != 0:
        return False, out.stderr[-300:]
    shots = list(_latest(p.root / "data/08_reporting/patchcore/infer_overlays").glob("*.png"))
    res = (_latest(p.root / "data/07_model_output/patchcore/infer/results.csv")).read_text().splitlines()
    return not shots and len(res) > 1, f"{len(res) - 1} images scored, {len(shots)} overlays written"


@case("same_names_in_subfolders", "recovered")
def _(p, tmp):
    from PIL import Image

    src = sorted((p.root / "data/01_raw/synthetic/wood/test/good").glob("*.png"))[:1]
    folder = tmp / "lines"
    for sub in ("line1", "line2"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(src[0], folder / sub / "a.png")
    Image.open(src[0]).save(folder / "line1" / "a.jpg")
    out = p.run("--pipeline=infer", "--namespaces=patchcore", f"--params=infer.images={folder}")
    overlays = list(_latest(p.root / "data/08_reporting/patchcore/infer_overlays").glob("*.png"))
    return out.returncode == 0 and len(overlays) == 3, f"{len(overlays)} overlays for 3 images of 2 names"


@case("flipped_checkpoint_bytes", "error")
def _(p, tmp):
    ckpt = _latest(p.root / "data/06_models/patchcore/fit.safetensors")
    backup = ckpt.read_bytes()
    raw = bytearray(backup)
    raw[len(raw) - 4096] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    try:
        return _one_error(_infer(p, tmp), "is damaged")
    finally:
        ckpt.write_bytes(backup)


@case("corrupt_thresholds_json", "error")
def _(p, tmp):
    thr = _latest(p.root / "data/08_reporting/patchcore/thresholds.json")
    backup = thr.read_bytes()
    thr.write_text("{not json")
    try:
        return _one_error(_infer(p, tmp), "thresholds.json")
    finally:
        thr.write_bytes(backup)


@case("bmp_change_retrains", "recovered")
def _(p, tmp):
    import numpy as np
    from PIL import Image

    root = tmp / "bmpdata"
    rng = np.random.default_rng(0)
    for split, n in (("train/good", 6), ("test/good", 2)):
        (root / "part" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(90, 160, (96, 96, 3), dtype=np.uint8)).save(root / "part" / split / f"{i}.bmp")
    args = ("--pipeline=dinomaly", f"--params=data.root={root},engine.iterations=4")
    first = p.run(*args)
    again = p.run(*args)  # unchanged: the finished training is reused (the check below can fail)
    reused = "reusing the finished training" in again.stdout + again.stderr
    target = root / "part/train/good/3.bmp"
    size = target.stat().st_size
    with open(target, "r+b") as fh:  # 8 rows in the middle, same size
        fh.seek(size // 2)
        fh.write(bytes(8 * 96 * 3))
    second = p.run(*args)
    text = second.stdout + second.stderr
    retrained = "reusing the finished training" not in text
    return first.returncode == 0 and second.returncode == 0 and reused and retrained, \
        f"unchanged: {'reused' if reused else 'NOT reused'}; 8 rows of one BMP changed: " + \
        ("retrained" if retrained else "reused a stale model")


@case("two_runs_at_once", "recovered")
def _(p, tmp):
    a = p.run("--pipeline=patchcore", "--params=data.classes=fabric", background=True)
    time.sleep(3)
    b = p.run("--pipeline=patchcore", "--params=data.classes=pcb", background=True)
    out_a, out_b = a.communicate(timeout=900)[0], b.communicate(timeout=900)[0]
    waited = "waiting for the run that holds this project" in out_b
    return a.returncode == 0 and b.returncode == 0 and waited, "the second waited, both finished" if waited else "no wait"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args()
    names = [n for n in CASES if not args.only or n in args.only.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="uad-probes-"))
    project = Project(tmp / "project")
    rows = []
    try:
        for name in names:
            kind, fn = CASES[name]
            t0 = time.monotonic()
            try:
                ok, said = fn(project, tmp / name)
            except Exception as exc:  # noqa: BLE001 - a probe that crashes is a failed probe
                ok, said = False, f"probe crashed: {type(exc).__name__}: {exc}"[:200]
            rows.append((name, kind, ok, said, time.monotonic() - t0))
            print(f"{'PASS' if ok else 'FAIL'}  {name} ({kind}, {time.monotonic() - t0:.0f} s): {said}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_err = sum(1 for r in rows if r[1] == "error")
    n_rec = len(rows) - n_err
    print(f"\n{len(rows)} cases: {sum(1 for r in rows if r[1] == 'error' and r[2])} of {n_err} clear one-line errors, "
          f"{sum(1 for r in rows if r[1] == 'recovered' and r[2])} of {n_rec} recovered\n")
    print("| case | expected | result | what the user sees |\n|---|---|---|---|")
    for name, kind, ok, said, _ in rows:
        print(f"| {name} | {kind} | {'pass' if ok else '**FAIL**'} | {said.replace('|', '/')} |")
    print(json.dumps({"cases": len(rows), "passed": sum(r[2] for r in rows)}))
    if not all(r[2] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
