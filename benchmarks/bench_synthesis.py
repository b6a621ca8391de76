"""Throughput of the pseudo-anomaly synthesis (issue 4): images/s on ONE CPU core.

Single process, numpy / torch / BLAS threads set to 1. A DTD-like folder of 40 generated 640x480
JPEGs is written to a temporary directory, so texture decoding, resizing and the LRU cache are
exercised exactly as with DTD (the cache starts cold: the first use of each file decodes it). Each
measured image goes through the dataset hook ``SynthesisAugment`` (per-sample generator, Perlin
mask, texture sample + DRAEM augmentation, blend), at 256x256 and 392x392, with
``anomaly_probability`` 1.0 (worst case: every image gets an anomaly) and 0.5 (the default).
With the real DTD (5640 files) most samples miss any reasonable cache, so a row with the cache
disabled (every texture decoded and resized) shows that case; a row with the no-download
fallback source (self + procedural) is given too.

    python benchmarks/bench_synthesis.py            # full run (~1 min)
    python benchmarks/bench_synthesis.py --quick    # smoke run

Prints a Markdown table (images/s per core) and a per-stage breakdown at 256x256.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from uad.synthesis import (  # noqa: E402
    DTDTextureSource,
    ProceduralTextureSource,
    PseudoAnomalySynthesizer,
    SynthesisAugment,
    SynthesisConfig,
    augment_texture,
    blend_texture,
    make_texture_source,
    sample_perlin_params,
)
from uad.synthesis.perlin import perlin_noise  # noqa: E402


def _set_torch_threads() -> str:
    try:
        import torch
    except ImportError:  # the synthesis core does not need torch
        return "torch not installed"
    torch.set_num_threads(1)
    return f"torch {torch.__version__}, threads={torch.get_num_threads()}"


def write_fake_dtd(root: Path, n: int = 40, size=(480, 640), seed: int = 0) -> Path:
    """``n`` JPEGs of ``size`` (H, W) in ``root/dtd/images/<category>/`` (DTD layout)."""
    rng = np.random.default_rng(seed)
    proc = ProceduralTextureSource()
    cats = ["banded", "bubbly", "cracked", "dotted", "woven"]
    for i in range(n):
        d = root / "dtd" / "images" / cats[i % len(cats)]
        d.mkdir(parents=True, exist_ok=True)
        tex = proc.sample(rng, size)
        noise = rng.normal(0.0, 10.0, tex.shape)  # detail, so decoding costs what a photo costs
        tex = np.clip(tex + noise, 0, 255).astype(np.uint8)
        Image.fromarray(tex).save(d / f"{cats[i % len(cats)]}_{i:04d}.jpg", quality=90)
    return root / "dtd"


def normal_images(size: int, n: int = 8, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.full((size, size, 3), rng.integers(40, 120), np.uint8)
        a, b = size // 4, 3 * size // 4
        img[a:b, a:b] = rng.integers(100, 255, 3)
        out.append(np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8))
    return out


def throughput(augment: SynthesisAugment, images: list[np.ndarray], n: int) -> tuple[float, float, float]:
    """(images per CPU-second, images per wall-second, fraction with an anomaly) over ``n`` calls.

    The process CPU time is the figure per core (one thread does all the work); the wall-clock
    rate is lower when other work shares the machine."""
    labels = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        _, _, label = augment(images[i % len(images)], i)
        labels += label
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return n / cpu, n / wall, labels / n


def stage_breakdown(dtd_root: Path, size: int, n: int) -> dict[str, float]:
    """CPU milliseconds per image of each stage at ``size`` (warm texture cache)."""
    rng = np.random.default_rng(123)
    cfg = SynthesisConfig()
    src = DTDTextureSource(dtd_root)
    image = normal_images(size, 1)[0]
    for i in range(len(src)):  # warm the cache
        src.load(i, (size, size))
    times = dict.fromkeys(["perlin mask", "texture sample (cached)", "texture augment (3 of 10)", "blend"], 0.0)
    for _ in range(n):
        t0 = time.process_time()
        res, angle = sample_perlin_params(rng, cfg.min_scale_exp, cfg.max_scale_exp, cfg.rotate, cfg.rotation_range)
        mask = perlin_noise((size, size), res, rng, angle=angle) > cfg.threshold
        t1 = time.process_time()
        tex = src.sample(rng, (size, size))
        t2 = time.process_time()
        tex = augment_texture(tex, rng, 3)
        t3 = time.process_time()
        blend_texture(image, tex, mask, 0.4)
        t4 = time.process_time()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k] += dt
    cold = DTDTextureSource(dtd_root, cache_size=0)
    t0 = time.process_time()
    for i in range(len(cold)):
        cold.load(i, (size, size))
    times["texture decode+resize (cold, 640x480 JPEG)"] = (time.process_time() - t0) / len(cold) * n
    return {k: v / n * 1e3 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images, for a smoke check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = {256: 60, 392: 40} if args.quick else {256: 600, 392: 300}

    print(f"# bench_synthesis  {datetime.date.today().isoformat()}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} os.cpu_count()={os.cpu_count()}, "
          f"python {platform.python_version()}, numpy {np.__version__}, {_set_torch_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        dtd_root = write_fake_dtd(Path(tmp))
        rows = []
        for size in (256, 392):
            images = normal_images(size)
            for kind in ("dtd", "dtd-nocache", "fallback"):
                for p in (1.0, 0.5):
                    if kind != "dtd" and p == 0.5:
                        continue
                    if kind == "dtd-nocache":  # every sample decodes: what the full DTD costs
                        source = DTDTextureSource(dtd_root, cache_size=0)
                    else:
                        source, _ = make_texture_source(kind, dtd_root=dtd_root, images=images)
                    synth = PseudoAnomalySynthesizer(source, SynthesisConfig(anomaly_probability=p))
                    augment = SynthesisAugment(synth, seed=args.seed)
                    ips, wall_ips, frac = throughput(augment, images, counts[size])
                    rows.append((size, kind, p, counts[size], ips, wall_ips, frac))
        print()
        print("| size | texture source | anomaly_probability | images | images/s per core (CPU time) "
              "| images/s (wall clock) | anomalous fraction |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for size, kind, p, n, ips, wall_ips, frac in rows:
            src = {
                "dtd": "dtd (40 JPEG 640x480, LRU starts cold)",
                "dtd-nocache": "dtd, no cache (decode + resize every sample)",
                "fallback": "fallback (self + procedural)",
            }[kind]
            print(f"| {size}x{size} | {src} | {p} | {n} | {ips:.0f} | {wall_ips:.0f} | {frac:.2f} |")
        print()
        print("Per-stage cost at 256x256, CPU ms per image:")
        print()
        print("| stage | ms |")
        print("| --- | --- |")
        for k, v in stage_breakdown(dtd_root, 256, 100 if args.quick else 400).items():
            print(f"| {k} | {v:.2f} |")


if __name__ == "__main__":
    main()
