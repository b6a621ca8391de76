"""Names never collide: every scored image of a folder keeps its own overlay (``x.png`` beside
``x.jpg``, ``sub/y.png`` beside ``sub__y.png``), and ``max_overlays=0`` means no overlays. A
transparent stand-in method (tests/test_inference.py's redness) keeps it to milliseconds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from test_inference import THR, Redness


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "parts"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, rel in enumerate(["x.png", "x.jpg", "sub/y.png", "sub__y.png", "y_png.png"]):
        img = rng.integers(0, 120, (60, 70, 3), dtype=np.uint8)
        img[10 + 5 * k:20 + 5 * k, 10:20] = (255, 0, 0)  # a red square: scores differ, all above 0.3
        Image.fromarray(img).save(root / rel)
    return root


def _score(folder, limit):
    from uad.data.folder import scan_image_folder
    from uad.folder_scoring import score_folder
    from uad.inference import Inferencer

    inf = Inferencer(Redness(multiple=8), THR, device="cpu", workers=0, progress=False)
    return score_folder(inf, scan_image_folder(folder), "redness", limit, 64)


def test_every_scored_image_keeps_its_own_overlay(folder):
    from uad.folder_scoring import overlay_name

    # the collision the old naming made: sub/y.png and sub__y.png gave one file name
    assert overlay_name("sub/y.png") == overlay_name("sub__y.png")
    results, maps, pngs = _score(folder, None)
    assert (results["status"] == "ok").all() and len(results) == 5
    assert len(pngs) == 5 and sorted(results["overlay"]) == sorted(pngs)
    assert results["overlay"].str.lower().nunique() == 5  # unique even where case is ignored
    # each overlay is its own image's picture (its banner names its own file)
    by_path = dict(zip(results["relative_path"], results["overlay"]))
    assert by_path["sub/y.png"] != by_path["sub__y.png"] and by_path["x.png"] != by_path["x.jpg"]
    assert len({pngs[n] for n in pngs}) == 5
    # the N most anomalous keep unique names too
    results, _, pngs = _score(folder, 3)
    assert len(pngs) == 3 and (results["overlay"] != "").sum() == 3


def test_max_overlays_zero_writes_none_and_negative_is_refused(folder):
    results, maps, pngs = _score(folder, 0)
    assert pngs == {} and (results["overlay"] == "").all()
    assert len([k for k in maps if k.startswith("map_")]) == 5  # scores and maps as always
    with pytest.raises(ValueError, match="max_overlays: -1 is not a non-negative integer"):
        _score(folder, -1)
