"""Torch dataset: shapes, resize/crop alignment of image and mask, augment hook, loaders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image

from uad.data.images import load_image
from uad.data.index import INDEX_COLUMNS
from uad.data.torch_data import AnomalyImageDataset, SeededAugment, denormalize, make_loader, resize_and_crop

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _index(tmp_path, n_normal=3):
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(img).save(tmp_path / "bad.png")
    Image.fromarray(mask).save(tmp_path / "bad_mask.png")
    rows = [dict(dataset="t", class_name="b", split="test", label=1, defect_type="x",
                 image_path=str(tmp_path / "bad.png"), mask_path=str(tmp_path / "bad_mask.png"))]
    rng = np.random.default_rng(0)
    for i in range(n_normal):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"n{i}.png")
        rows.append(dict(dataset="t", class_name="a", split="train", label=0, defect_type="good",
                         image_path=str(tmp_path / f"n{i}.png"), mask_path=""))
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def test_shapes_and_alignment(tmp_path):
    df = _index(tmp_path)
    ds = AnomalyImageDataset(df, resize=16, crop=12, mean=MEAN, std=STD)
    s = ds[0]
    assert s["image"].shape == (3, 12, 12) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (1, 12, 12) and s["mask"].dtype == torch.float32
    assert set(s["mask"].unique().tolist()) == {0.0, 1.0}
    assert s["label"].dtype == torch.int64 and int(s["label"]) == 1
    assert int(s["class_id"]) == 1 and int(s["index"]) == 0  # classes sorted: a=0, b=1
    # the square spans [8, 24) of 32 -> [4, 12) of 16 -> [2, 10) after the centre crop of 12
    m = s["mask"][0].numpy().astype(bool)
    rows = np.flatnonzero(m.any(1))
    assert rows[0] == 2 and rows[-1] == 9
    bright = denormalize(s["image"], MEAN, STD)[0, ..., 0] > 127
    assert np.array_equal(bright, m)  # the mask square ends where the image square ends
    n = ds[1]
    assert n["image"].shape == (3, 12, 12) and n["mask"].sum() == 0 and int(n["label"]) == 0


def test_normalisation_roundtrip_and_cache(tmp_path):
    df = _index(tmp_path)
    ds = AnomalyImageDataset(df, resize=24, crop=20, mean=MEAN, std=STD, cache_decoded=True)
    ref = resize_and_crop(load_image(df.image_path[1]), 24, 20)
    out = ds[1]
    assert np.array_equal(denormalize(out["image"][None], MEAN, STD)[0], ref)
    (tmp_path / "n0.png").unlink()  # served from the cache from now on
    assert torch.equal(ds[1]["image"], out["image"])


def test_augment_hook_and_epoch(tmp_path):
    df = _index(tmp_path)

    def synth(image, rng):
        mask = np.zeros(image.shape[:2], bool)
        r = int(rng.integers(0, image.shape[0] - 2))
        mask[r : r + 2] = True
        image = image.copy()
        image[mask] = 0
        return image, mask, 1

    aug = SeededAugment(synth, seed=7)
    ds = AnomalyImageDataset(df, resize=16, crop=16, augment=aug)
    a0 = ds[1]
    assert int(a0["label"]) == 1 and a0["mask"].sum() == 2 * 16
    assert torch.equal(ds[1]["mask"], a0["mask"])  # same epoch, same index -> same draw
    masks = set()
    for e in range(6):
        ds.set_epoch(e)
        masks.add(int(ds[1]["mask"][0].any(1).nonzero()[0]))
    assert len(masks) > 1  # the epoch changes the draw
    # an augment returning no mask only changes the image
    ds2 = AnomalyImageDataset(df, resize=16, crop=16, augment=lambda im, i: (255 - im, None, 1))
    s = ds2[0]
    assert int(s["label"]) == 1 and s["mask"].sum() > 0
    assert int(ds2[1]["label"]) == 0


def test_loaders(tmp_path):
    df = _index(tmp_path, n_normal=5)
    ds = AnomalyImageDataset(df, resize=16, crop=16)
    order = lambda seed: torch.cat([b["index"] for b in make_loader(ds, 2, shuffle=True, seed=seed)]).tolist()  # noqa: E731
    assert order(1) == order(1) and sorted(order(1)) == list(range(6))
    # infinite: tiny dataset still gives full batches and cycles epochs
    small = AnomalyImageDataset(df.iloc[:3].reset_index(drop=True), resize=16, crop=16)
    it = make_loader(small, 4, shuffle=True, seed=0, drop_last=True, infinite=True)
    batches = [next(it) for _ in range(5)]
    assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)
    assert it.epoch >= 4 and small.epoch == it.epoch


def test_epoch_reaches_persistent_worker(tmp_path):
    df = _index(tmp_path, n_normal=1)

    class EpochProbe:
        epoch = 0

        def __call__(self, image, index):
            image = image.copy()
            image[...] = self.epoch
            return image, None, 0

    ds = AnomalyImageDataset(df, resize=8, crop=8, mean=(0, 0, 0), std=(1 / 255,) * 3, augment=EpochProbe())
    it = make_loader(ds, 1, shuffle=False, num_workers=2, seed=0, infinite=True)
    seen = [(int(b["index"][0]), int(b["image"][0, 0, 0, 0])) for b in (next(it) for _ in range(6))]
    assert seen == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]  # (sample, epoch) in every worker


def test_shared_decoded_cache_is_filled_by_workers_and_read_by_all(tmp_path):
    import pickle

    from torch.utils.data import DataLoader

    (tmp_path / "img").mkdir()
    df = _index(tmp_path / "img", n_normal=5)
    plain = AnomalyImageDataset(df, resize=24, crop=20, mean=MEAN, std=STD, cache_decoded=False)
    ds = AnomalyImageDataset(df, resize=24, crop=20, mean=MEAN, std=STD, shared_cache=str(tmp_path / "cache"))
    assert ds.shared.filled() == 0
    # two worker processes fill the one file (a worker gets a pickled copy that re-maps it)
    first = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert ds.shared.filled() == len(df)
    # every image deleted: all served from the shared file now, equal to the plain decode
    expected = [plain[i] for i in range(len(df))]
    for p in df.image_path:
        (tmp_path / "img" / p.split("/")[-1]).unlink(missing_ok=True)
    again = pickle.loads(pickle.dumps(ds))
    for i in range(len(df)):
        a, b = again[i], first[i // 2]
        assert torch.equal(a["image"], b["image"][i % 2]) and torch.equal(a["mask"], b["mask"][i % 2])
        assert torch.equal(a["image"], expected[i]["image"]) and torch.equal(a["mask"], expected[i]["mask"])
    # the bad image's mask survived the round trip (row state: image + mask)
    assert again[0]["mask"].sum() > 0 and again[1]["mask"].sum() == 0
    # another crop, or a changed file, is another cache file: never a stale row
    other = AnomalyImageDataset(df, resize=24, crop=16, mean=MEAN, std=STD, shared_cache=str(tmp_path / "cache"))
    assert other.shared.path != ds.shared.path and other.shared.filled() == 0


def test_uint8_batches_normalised_on_the_device_equal_the_float_samples(tmp_path):
    from torch.utils.data import Subset

    from uad.data.torch_data import SkipUnreadable, finish_batch, uint8_twin

    df = _index(tmp_path)
    ds = AnomalyImageDataset(df, resize=24, crop=20, mean=MEAN, std=STD)
    wrapped = Subset(SkipUnreadable(ds), [0, 2, 3])
    twin, leaf = uint8_twin(wrapped)
    assert not ds.uint8_output and leaf.uint8_output  # the caller's dataset is left as it was
    for j, i in enumerate([0, 2, 3]):
        raw, ref = twin[j], ds[i]
        assert raw["image"].dtype == torch.uint8 and raw["mask"].dtype == torch.uint8
        done = finish_batch({k: v[None] if isinstance(v, torch.Tensor) else v for k, v in raw.items()}, leaf.normalise)
        assert torch.equal(done["image"][0], ref["image"]) and torch.equal(done["mask"][0], ref["mask"])
    assert uint8_twin(torch.utils.data.TensorDataset(torch.zeros(2))) is None
