"""MVTec AD 2 (Heckler-Kram, Neudeck, Scheler, König, Steger: "The MVTec AD 2 Dataset: Advanced
Scenarios for Unsupervised Anomaly Detection", arXiv 2503.21622, 2025): its objects, the counts of
its private test sets, and :func:`make_mvtec_ad2_tree`, an MVTec-AD-2-shaped tree re-arranged
from an MVTec-layout dataset (the embedded one) so the whole path, from ingest to the submission
folders, runs in CI.

The dataset's rules this project follows (section "Evaluation" of the paper and the README of its
public code): training uses ``train/good`` only; ``validation/good`` (anomaly-free) is the only
data a threshold or any other choice may be made on; ``test_public`` (with ground truth) is for
reporting during development; ``test_private`` and ``test_private_mixed`` (the latter under
changed lighting) have no public ground truth and are evaluated by the server from the submitted
continuous maps (``.tiff``, float16, one channel, at the image's own size) and thresholded maps
(``.png``, 0 / 255).
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS

__all__ = ["MVTEC_AD2_OBJECTS", "PRIVATE_FILE_COUNTS", "make_mvtec_ad2_tree"]

#: the eight objects and, per object, the number of images in each of test_private and
#: test_private_mixed (the counts the dataset's upload checker expects)
PRIVATE_FILE_COUNTS: dict[str, int] = {"can": 321, "fabric": 314, "fruit_jelly": 255, "rice": 277,
                                       "sheet_metal": 142, "vial": 276, "wallplugs": 232, "walnuts": 228}
MVTEC_AD2_OBJECTS: tuple[str, ...] = tuple(sorted(PRIVATE_FILE_COUNTS))


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_mvtec_ad2_tree(src_root: str | os.PathLike, dest: str | os.PathLike, seed: int = 0,
                        validation_fraction: float = 0.25) -> Path:
    """Re-arrange the MVTec-layout dataset at ``src_root`` into the MVTec AD 2 layout at ``dest``.

    Per class: a seeded ``validation_fraction`` of ``train/good`` becomes ``validation/good`` (at
    least one), the rest ``train/good``; every test image goes to ``test_public`` (``good`` or
    ``bad``, the masks to ``ground_truth/bad/<stem>_mask.png``, names ``NNN_regular.png`` as in
    the dataset); the same test images in a seeded order are ``test_private/NNN_regular.png`` and,
    darkened to 60 % (a lighting change, like the dataset's mixed set), ``test_private_mixed/
    NNN_mixed.png``. Files are hard links where possible. Returns ``dest``."""
    from PIL import Image

    src, out = Path(src_root), Path(dest)
    for cdir in sorted(d for d in src.iterdir() if d.is_dir() and (d / "train" / "good").is_dir()):
        cls, cout = cdir.name, out / cdir.name
        rng = np.random.default_rng([int(seed), zlib.crc32(cls.encode())])
        train = _images(cdir / "train" / "good")
        n_val = min(len(train) - 1, max(1, int(round(validation_fraction * len(train)))))
        val = set(rng.choice(len(train), size=n_val, replace=False).tolist())
        for k, p in enumerate(train):
            _link(p, cout / ("validation" if k in val else "train") / "good" / f"{k:03d}_regular{p.suffix}")
        tests: list[Path] = []
        n_bad = 0
        for ddir in sorted(d for d in (cdir / "test").iterdir() if d.is_dir()):
            for p in _images(ddir):
                tests.append(p)
                if ddir.name == "good":
                    _link(p, cout / "test_public" / "good" / f"{len(tests) - 1:03d}_regular{p.suffix}")
                    continue
                name = f"{len(tests) - 1:03d}_regular"
                _link(p, cout / "test_public" / "bad" / f"{name}{p.suffix}")
                mask = next((m for m in _images(cdir / "ground_truth" / ddir.name)
                             if m.stem in (f"{p.stem}_mask", p.stem)), None)
                if mask is not None:
                    _link(mask, cout / "test_public" / "ground_truth" / "bad" / f"{name}_mask{mask.suffix}")
                n_bad += 1
        order = rng.permutation(len(tests))
        for k, i in enumerate(order):
            p = tests[int(i)]
            _link(p, cout / "test_private" / f"{k:03d}_regular{p.suffix}")
            with Image.open(p) as im:
                dark = (np.asarray(im.convert("RGB"), dtype=np.float32) * 0.6).astype(np.uint8)
            (cout / "test_private_mixed").mkdir(parents=True, exist_ok=True)
            Image.fromarray(dark).save(cout / "test_private_mixed" / f"{k:03d}_mixed.png")
    return out
