"""Speed of the training data path: decoding + resizing MVTec-size images into batches.

Reads the training images of a folder tree (``make_mvtec_tree.py`` writes an MVTec-sized one)
through the project's own loader (``AnomalyImageDataset`` + the engine's DataLoader settings:
workers, pinned memory when CUDA is present, prefetch 4), batch 16, resize 448 / crop 392 (Dinomaly's
preprocessing), no model. For each worker count it times, in one process:

* ``decode``: a first pass that decodes every PNG and resizes it (what every epoch costs without a
  shared cache; with it, only the first);
* ``cached``: a second pass served by the shared decoded-image cache (``engine.decoded_cache``:
  one memory-mapped file all workers fill and read);
* ``samples``: float32 (normalised in the workers, as on CPU) or uint8 (normalised on the device
  after the copy, what runs on CUDA: ``engine.uint8_batches``);
* ``per-worker LRU``: the second epoch with the per-worker in-memory cache instead (what runs when
  no ``decoded_cache`` folder is set): each worker caches only what it decoded itself, and the
  next epoch's permutation sends most images to another worker.

Epochs are streamed as the engine streams training batches (a new permutation per epoch).

Images / second of wall time, and for the decode pass the CPU time per image (so a machine with
more cores can be estimated: ``cores / (CPU s per image)``). Needs numpy, Pillow, pandas, torch.

Usage::

    python benchmarks/make_mvtec_tree.py --out /tmp/mvtec_sized
    python benchmarks/bench_data.py --root /tmp/mvtec_sized --workers 2
    python benchmarks/bench_data.py --root /tmp/mvtec_sized --workers 8,16 --limit 0
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _bench_common as bc  # also puts src/ on sys.path for a bare checkout

import torch

from uad.data.layouts import scan_dataset
from uad.data.torch_data import AnomalyImageDataset
from uad.engine import EngineConfig, Trainer


def _epochs(loader, steps_per_epoch: int) -> list[tuple[int, float]]:
    """(images, wall seconds) of each epoch of a step-stream loader."""
    out, n, t0 = [], 0, time.perf_counter()
    for i, batch in enumerate(loader, start=1):
        n += int(batch["image"].shape[0])
        if i % steps_per_epoch == 0:
            out.append((n, time.perf_counter() - t0))
            n, t0 = 0, time.perf_counter()
    return out


def _cpu_ms(ds: AnomalyImageDataset, n: int) -> tuple[float, float]:
    """CPU ms per image in this process: decode + resize + crop, then a whole sample (with the
    normalisation to float32) served from the prepared rows."""
    idx = list(range(min(n, len(ds))))
    t = time.process_time()
    for i in idx:
        ds.load_prepared(i)
    decode = (time.process_time() - t) / len(idx) * 1000
    t = time.process_time()
    for i in idx:
        ds[i]
    sample = (time.process_time() - t) / len(idx) * 1000
    return decode, sample


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="an MVTec-layout folder")
    ap.add_argument("--workers", default="2", help="comma list of loader worker counts")
    ap.add_argument("--resize", type=int, default=448)
    ap.add_argument("--crop", type=int, default=392)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--limit", type=int, default=400, help="training images to read (0: all)")
    ap.add_argument("--cache-dir", default=None, help="where the shared cache goes (default: a temporary folder)")
    ap.add_argument("--uint8", choices=["no", "yes", "both"], default="both",
                    help="samples as float32 (no), as uint8 for normalisation on the device (yes, what runs on CUDA), or both")
    args = ap.parse_args(argv)
    df = scan_dataset(args.root, layout="mvtec")
    df = df[df["split"] == "train"].reset_index(drop=True)
    if args.limit:
        df = df.sample(n=min(args.limit, len(df)), random_state=0).reset_index(drop=True)
    sizes = df["image_path"].map(lambda p: os.path.getsize(p)).mean() / 2**20
    print(f"machine: {bc.device_name(torch.device('cpu'))}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"command: python benchmarks/bench_data.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{len(df)} training images of {args.root} (mean PNG {sizes:.2f} MB), resize {args.resize} / crop {args.crop}, "
          f"batch {args.batch}")
    print()
    probe = AnomalyImageDataset(df, args.resize, args.crop, cache_max_bytes=2**34)
    decode_ms, sample_ms = _cpu_ms(probe, 48)
    del probe
    print(f"one process, CPU time per image: decode + resize + crop {decode_ms:.1f} ms; a sample from the prepared "
          f"row (normalise to float32, tensors) {sample_ms:.1f} ms. Estimate for W workers on W free cores: "
          f"W x {1000 / (decode_ms + sample_ms):.0f} img/s decoding, W x {1000 / sample_ms:.0f} img/s cached.")
    print()
    print("| workers | samples | epoch 1: decode img/s | epoch 2: shared cache img/s | epoch 2: per-worker LRU img/s |")
    print("| ---: | --- | ---: | ---: | ---: |")
    kinds = {"no": [False], "yes": [True], "both": [False, True]}[args.uint8]
    for w in [int(v) for v in args.workers.split(",") if v.strip()]:
        for u8 in kinds:
            folder = Path(args.cache_dir or tempfile.mkdtemp(prefix="uad-decoded-"))
            try:
                # uint8_batches forced on, as on CUDA: the loader's samples are uint8, normalised later
                trainer = Trainer(EngineConfig(device="cpu", num_workers=w, progress=False, uint8_batches=u8))
                steps = len(df) // args.batch
                # the training loader: a fresh permutation every epoch, as the engine streams batches
                shared = AnomalyImageDataset(df, args.resize, args.crop, shared_cache=str(folder))
                (n, t_decode), (n2, t_cached) = _epochs(
                    trainer.loader(shared, args.batch, shuffle=True, num_steps=2 * steps, uint8=True), steps)
                lru = AnomalyImageDataset(df, args.resize, args.crop)  # the per-worker in-memory cache
                _, (n3, t_lru) = _epochs(trainer.loader(lru, args.batch, shuffle=True, num_steps=2 * steps, uint8=True),
                                         steps)
                label = "uint8" if u8 else "float32"
                print(f"| {w} | {label} | {n / t_decode:.1f} | {n2 / t_cached:.1f} | {n3 / t_lru:.1f} |", flush=True)
            finally:
                if not args.cache_dir:
                    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
