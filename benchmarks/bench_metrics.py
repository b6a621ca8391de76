"""Benchmark of :func:`uad.metrics.compute_metrics` at MVTec-AD test-set scale.

Generates 1,725 anomaly maps of 256x256 (113M pixels, float32, nearly all values distinct: the
worst case for exact metrics) in 15 classes, about half of the images anomalous with 1-4
elliptic blobs of very different sizes, images of all classes shuffled together. Each run
happens in a fresh Python process which records

* ``wall``: wall time of ``compute_metrics`` (all seven metrics, every class, plus the mean),
* ``peak RSS``: the process's ``ru_maxrss`` after the call, and ``delta``: that minus
  ``ru_maxrss`` just before the call (the inputs are already resident then; the generator is
  chunked so its own temporaries stay below that level).

Usage::

    python benchmarks/bench_metrics.py                  # 2 runs, prints a table
    python benchmarks/bench_metrics.py --runs 3 --with-one-class --out docs/benchmarks.md

``--out FILE`` writes (or replaces) the section ``## Metrics (issue 2)`` of a markdown file,
keeping everything else in it. ``--machine`` names the machine in that section.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SECTION = "## Metrics (issue 2)"


def make_data(n_images: int, size: int, n_classes: int, seed: int):
    """Synthetic test set: labels, scores, masks (N,S,S) bool, maps (N,S,S) float32, classes."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n_images) < 0.5).astype(np.int64)
    classes = np.array([f"class_{i:02d}" for i in range(n_classes)])[
        rng.permutation(np.arange(n_images) % n_classes)
    ]
    masks = np.zeros((n_images, size, size), dtype=np.bool_)
    maps = np.empty((n_images, size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = size * np.exp(rng.uniform(np.log(0.004), np.log(0.25), 2))
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        if not masks[i].any():
            masks[i, int(cy) % size, int(cx) % size] = True
    chunk = 64
    for s in range(0, n_images, chunk):  # chunked: no full-size float64 temporaries
        e = min(n_images, s + chunk)
        block = rng.standard_normal((e - s, size, size), dtype=np.float32)
        block *= 0.5
        block += masks[s:e] * rng.uniform(0.3, 2.0, (e - s, 1, 1)).astype(np.float32)
        maps[s:e] = block
    scores = maps.reshape(n_images, -1).max(axis=1) + rng.normal(0, 0.2, n_images)
    return labels, scores, masks, maps, classes


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args: argparse.Namespace) -> dict:
    import torch

    from uad.metrics import compute_metrics

    t0 = time.perf_counter()
    data = make_data(args.images, args.size, args.classes, args.seed)
    t_gen = time.perf_counter() - t0
    before = _rss_mb()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    df = compute_metrics(*data)
    wall = time.perf_counter() - t0
    after = _rss_mb()
    return {
        "wall_s": wall,
        "load1": load,
        "gen_s": t_gen,
        "rss_before_mb": before,
        "peak_rss_mb": after,
        "delta_mb": after - before,
        "pixels": int(data[3].size),
        "anomalous_pixel_pct": 100.0 * float(data[2].mean()),
        "torch_threads": torch.get_num_threads(),
        "mean": df.loc["mean"].round(4).to_dict(),
    }


def run_fresh(args: argparse.Namespace, classes: int | None = None) -> dict:
    classes = args.classes if classes is None else classes
    cmd = [sys.executable, __file__, "--worker", "--images", str(args.images), "--size",
           str(args.size), "--classes", str(classes), "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(args: argparse.Namespace, results: list[dict], command: str,
             one_class: dict | None = None) -> str:
    best = min(results, key=lambda r: r["wall_s"])
    lines = [
        SECTION,
        "",
        f"`uad.metrics.compute_metrics`, all seven metrics (image AUROC/AP/F1-max, pixel "
        f"AUROC/AP/F1-max/AUPRO) per class plus the mean, on {args.images:,} synthetic maps of "
        f"{args.size}x{args.size} ({results[0]['pixels']:,} float32 pixels, nearly all distinct), "
        f"{args.classes} classes shuffled together, about half the images anomalous "
        f"({results[0]['anomalous_pixel_pct']:.1f} % of all pixels anomalous, in 1-4 elliptic "
        "blobs per anomalous image).",
        "",
        f"- command: `{command}`",
        f"- machine: {args.machine}",
        f"- date: {_dt.date.today().isoformat()}",
        f"- software: Python {platform.python_version()}, numpy {np.__version__}, "
        f"torch {__import__('torch').__version__} ({results[0]['torch_threads']} threads)",
        f"- runs: {len(results)}, each in a fresh process; the machine was shared with other "
        "jobs, so the best run is the headline and every run is listed",
        "",
        "| run | wall time (s) | peak RSS (MB) | RSS before call (MB) | delta (MB) "
        "| load avg (1 min) at start |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(results, 1):
        lines.append(f"| {i} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_before_mb']:.0f} | {r['delta_mb']:.0f} | {r['load1']:.1f} |")
    lines += [
        "",
        f"Best: **{best['wall_s']:.1f} s**, peak RSS **{best['peak_rss_mb'] / 1024:.2f} GB** "
        f"(of which {best['rss_before_mb'] / 1024:.2f} GB are the inputs and the interpreter). "
        "Targets: <= 30 s and <= 4 GB.",
        "",
    ]
    if one_class is not None:
        lines += [
            f"Stress case (`--with-one-class`, same run): all {one_class['pixels']:,} pixels in "
            f"**one** class: {one_class['wall_s']:.1f} s, peak RSS "
            f"{one_class['peak_rss_mb']:.0f} MB (delta {one_class['delta_mb']:.0f} MB, "
            f"load {one_class['load1']:.1f}).",
            "",
        ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    if path.exists():
        text = path.read_text()
    else:
        text = ("# Benchmarks\n\nEvery figure here names the machine and the command that "
                "produced it.\n")
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def _machine() -> str:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - description only
        gpu = "GPU unknown"
    return f"{os.cpu_count()} CPU cores, {mem_gb:.0f} GB, {gpu}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1725)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--classes", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="markdown file to write the section to")
    p.add_argument("--machine", default=_machine(),
                   help="machine description written with the figures")
    p.add_argument("--with-one-class", action="store_true",
                   help="also time one run with every image in a single class")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = []
    for i in range(args.runs):
        r = run_fresh(args)
        results.append(r)
        print(f"run {i + 1}: wall {r['wall_s']:.2f} s | peak RSS {r['peak_rss_mb']:.0f} MB | "
              f"before {r['rss_before_mb']:.0f} MB | delta {r['delta_mb']:.0f} MB | "
              f"load {r['load1']:.1f} | "
              f"(data generation {r['gen_s']:.1f} s)", flush=True)
    print("mean row:", results[0]["mean"])
    best = min(results, key=lambda r: r["wall_s"])
    print(f"best: {best['wall_s']:.2f} s, peak RSS {best['peak_rss_mb']:.0f} MB")
    one = None
    if args.with_one_class:
        one = run_fresh(args, classes=1)
        print(f"one class: wall {one['wall_s']:.2f} s | peak RSS {one['peak_rss_mb']:.0f} MB | "
              f"delta {one['delta_mb']:.0f} MB | load {one['load1']:.1f}")
    if args.out is not None:
        command = "python " + " ".join(
            [Path(sys.argv[0]).as_posix()] + [shlex.quote(a) for a in sys.argv[1:]]
        )
        write_section(args.out, markdown(args, results, command, one))
        print(f"wrote section '{SECTION}' to {args.out}")


if __name__ == "__main__":
    main()
