"""Sample-index validation: every problem reported at once, each naming its file."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from uad.data.index import INDEX_COLUMNS, DatasetValidationError, index_fingerprint, validate_index


def _png(path, size=(8, 8), value=128, mask=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask is not None:
        Image.fromarray(np.asarray(mask, np.uint8)).save(path)
    else:
        Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return str(path)


def _row(cls, split, label, defect, img, mask=""):
    return dict(dataset="toy", class_name=cls, split=split, label=label, defect_type=defect, image_path=img,
                mask_path=mask)


def _good_index(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:4] = 255
    rows = [
        _row("a", "train", 0, "good", _png(tmp_path / "a/train/0.png")),
        _row("a", "test", 0, "good", _png(tmp_path / "a/test/good/0.png")),
        _row("a", "test", 1, "crack", _png(tmp_path / "a/test/crack/0.png"),
             _png(tmp_path / "a/gt/crack/0_mask.png", mask=m)),
    ]
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def test_valid_index_passes(tmp_path):
    df = _good_index(tmp_path)
    validate_index(df)
    validate_index(df, full_decode=True, max_workers=2)


def test_collects_every_problem(tmp_path):
    df = _good_index(tmp_path)
    corrupt = tmp_path / "a/test/crack/corrupt.png"
    corrupt.write_bytes(b"garbage")
    m_big = np.zeros((16, 16), np.uint8)
    m_big[0, 0] = 255
    m_multi = np.zeros((8, 8), np.uint8)
    m_multi[0, 0], m_multi[1, 1] = 100, 255
    extra = [
        _row("a", "test", 1, "crack", str(corrupt), _png(tmp_path / "a/gt/crack/c_mask.png", mask=(m_multi > 0) * 255)),
        _row("a", "test", 1, "crack", _png(tmp_path / "a/test/crack/nomask.png")),
        _row("a", "test", 1, "crack", _png(tmp_path / "a/test/crack/sz.png"), _png(tmp_path / "a/gt/crack/sz_mask.png", mask=m_big)),
        _row("a", "test", 1, "crack", _png(tmp_path / "a/test/crack/nb.png"), _png(tmp_path / "a/gt/crack/nb_mask.png", mask=m_multi)),
        _row("b", "train", 0, "good", _png(tmp_path / "b/train/0.png")),  # class b has no test images
    ]
    df = pd.concat([df, pd.DataFrame(extra, columns=INDEX_COLUMNS)], ignore_index=True)
    with pytest.raises(DatasetValidationError) as ei:
        validate_index(df)
    msg = str(ei.value)
    probs = ei.value.problems
    assert len(probs) == 5, probs
    assert "corrupt.png" in msg and "unreadable image" in msg
    assert "nomask.png" in msg and "without mask" in msg
    assert "sz_mask.png" in msg and "size mismatch" in msg
    assert "nb_mask.png" in msg and "non-binary" in msg
    assert "toy/b has no test images" in msg
    assert msg.count("\n") >= 5  # one line per problem
    # the same dataset with the nonzero policy no longer flags the multi-valued mask
    with pytest.raises(DatasetValidationError) as ei2:
        validate_index(df, mask_policy="nonzero")
    assert len(ei2.value.problems) == 4


def test_bad_values_and_missing_columns(tmp_path):
    df = _good_index(tmp_path)
    with pytest.raises(DatasetValidationError, match="missing columns"):
        validate_index(df.drop(columns=["mask_path"]))
    bad = df.copy()
    bad.loc[0, "split"] = "val"
    bad.loc[1, "label"] = 3
    bad.loc[2, "mask_path"] = str(tmp_path / "nowhere_mask.png")
    with pytest.raises(DatasetValidationError) as ei:
        validate_index(bad)
    msg = str(ei.value)
    assert "bad split 'val'" in msg and "bad label 3" in msg and "nowhere_mask.png" in msg
    assert "toy/a has no train images" in msg


def test_thread_pool_path(tmp_path):
    rows = [_row("a", "train", 0, "good", _png(tmp_path / f"t{i}.png")) for i in range(70)]
    rows.append(_row("a", "test", 0, "good", str(tmp_path / "missing.png")))
    with pytest.raises(DatasetValidationError, match="missing.png"):
        validate_index(pd.DataFrame(rows, columns=INDEX_COLUMNS), max_workers=2)


def test_fingerprint(tmp_path):
    df = _good_index(tmp_path)
    f = index_fingerprint(df)
    assert len(f) == 64
    assert index_fingerprint(df.iloc[::-1]) == f  # row order does not matter
    other = df.copy()
    other.loc[0, "label"] = 1
    assert index_fingerprint(other) != f
    assert index_fingerprint(df, root=tmp_path) != f  # relative paths


@pytest.mark.parametrize("fmt", ["BMP", "JPEG", "TIFF", "PNG"])
def test_changing_rows_in_the_middle_of_an_image_changes_the_fingerprint(tmp_path, fmt):
    """An uncompressed BMP / TIFF (and a JPEG, a PNG) edited in place in its middle rows, same size
    on disk: the content fingerprint changes (every byte is hashed), and an unchanged tree keeps it
    (served from the stat-keyed cache without reading the files again)."""
    import numpy as np
    from PIL import Image

    from uad.data import index as idx

    rng = np.random.default_rng(0)
    ext = {"BMP": "bmp", "JPEG": "jpg", "TIFF": "tif", "PNG": "png"}[fmt]
    paths = []
    for i in range(3):
        p = tmp_path / f"{i:03d}.{ext}"
        Image.fromarray(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(p, format=fmt)
        paths.append(str(p))
    df = pd.DataFrame({"dataset": "d", "class_name": "c", "split": "train", "label": 0, "defect_type": "good",
                       "image_path": paths, "mask_path": ""})
    before = idx.content_fingerprint(df)
    assert idx.content_fingerprint(df) == before
    target = paths[1]
    size = os.path.getsize(target)
    with open(target, "r+b") as fh:  # 8 rows' worth of bytes in the middle, file size unchanged
        fh.seek(size // 2)
        chunk = bytearray(fh.read(8 * 400 * 3))
        fh.seek(size // 2)
        fh.write(bytes(255 - b for b in chunk))
    assert os.path.getsize(target) == size
    assert idx.content_fingerprint(df) != before


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    from uad.data import index as idx

    files = []
    for i in range(3):
        f = tmp_path / f"{i}.bin"
        f.write_bytes(os.urandom(1000))
        files.append(str(f))
    first = idx.file_digests(files)
    read = []
    monkeypatch.setattr(idx, "_hash_file", lambda p: read.append(p) or "x")
    assert idx.file_digests(files) == first and read == []
    os.utime(files[0], ns=(1, 1))  # a changed stat: hashed again
    idx.file_digests(files)
    assert read == [os.path.realpath(files[0])]
