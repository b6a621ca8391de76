"""One configuration, one result: training with the quick profile's loader settings is bit-identical.

The quick profile differs from smoke in its loader (``engine.num_workers: 2``: persistent worker
processes, prefetch 4) and its checkpoints (``checkpoint_every: 200`` inside a 300-step run). These
tests train a small segmentation network on pseudo anomalies (DRAEM recipe, procedural textures)
over images of the embedded dataset through the engine, across epoch boundaries, and hold the
losses and weights equal to the bit:

* two runs in one process (no state leaks from the first into the second);
* 2 workers against none (which worker decodes a sample does not change it);
* a run interrupted mid-epoch and resumed from its checkpoint against a straight run.

The one setting measured to change the bits is torch's intra-op thread count (float sums in
another order); a run is reproducible on the same thread count, which these tests keep fixed.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from uad.data.torch_data import AnomalyImageDataset
from uad.engine import EngineConfig, Trainer
from uad.methods.base import AnomalyMethod, OptimSetup, Prediction
from uad.synthesis import ProceduralTextureSource, PseudoAnomalySynthesizer, SynthesisAugment, SynthesisConfig

CROP = 32
ITERATIONS = 12  # 16 images, batch 4: 4 steps an epoch, 3 epochs


class TinySeg(AnomalyMethod):
    """A two-layer conv net that segments the pseudo anomalies (dropout: global RNG draws too)."""

    name = "tinyseg"

    def __init__(self, params=None):
        super().__init__(params)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.2), nn.Conv2d(8, 1, 1))

    @property
    def input_spec(self):
        return {"resize": CROP, "crop": CROP, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

    def modules(self):
        return {"net": self.net}

    def configure_optimization(self, stage, num_train_samples):
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        return OptimSetup(opt, None, iterations=ITERATIONS, grad_clip_norm=1.0)

    def training_step(self, stage, batch, step):
        logits = self.net(batch["image"])
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["mask"].float())

    def predict(self, images):
        m = torch.sigmoid(self.net(images))[:, 0]
        return Prediction(m.flatten(1).amax(1), m)


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    rows = [{"class_name": c, "label": 0, "image_path": str(p), "mask_path": ""}
            for c in ("fabric", "washer") for p in sorted((synthetic_root / c / "train" / "good").glob("*.png"))[:8]]
    synth = PseudoAnomalySynthesizer(ProceduralTextureSource(), SynthesisConfig(anomaly_probability=0.75))
    return AnomalyImageDataset(pd.DataFrame(rows), resize=CROP, crop=CROP, augment=SynthesisAugment(synth, seed=1))


def _train(dataset, folder, workers: int, iterations: int = ITERATIONS):
    cfg = EngineConfig(device="cpu", seed=1, iterations=iterations, batch_size=4, num_workers=workers,
                       checkpoint_dir=str(folder), checkpoint_every=5, progress=False, log_every=1)
    method = TinySeg()
    out = Trainer(cfg, key="k").fit(method, "train", dataset)
    return method, out


def _same_bits(a: TinySeg, b: TinySeg) -> None:
    for (name, x), (_, y) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(x, y), f"{name} differs by up to {(x - y).abs().max().item():.3g}"


def test_two_trainings_with_loader_workers_are_bit_identical(dataset, tmp_path):
    first, a = _train(dataset, tmp_path / "a", workers=2)
    second, b = _train(dataset, tmp_path / "b", workers=2)
    assert a["resumed_from"] == b["resumed_from"] == 0
    assert [loss for _, loss in a["history"]] == [loss for _, loss in b["history"]]
    _same_bits(first, second)


def test_worker_count_does_not_change_a_training(dataset, tmp_path):
    workers, a = _train(dataset, tmp_path / "w2", workers=2)
    inline, b = _train(dataset, tmp_path / "w0", workers=0)
    assert [loss for _, loss in a["history"]] == [loss for _, loss in b["history"]]
    _same_bits(workers, inline)


def test_a_resumed_training_with_workers_equals_a_straight_one(dataset, tmp_path):
    straight, a = _train(dataset, tmp_path / "straight", workers=2)
    # "killed" at step 6 (mid-epoch 1): a run of 6 iterations leaves its checkpoint at step 6
    _train(dataset, tmp_path / "resumed", workers=2, iterations=6)
    resumed, b = _train(dataset, tmp_path / "resumed", workers=2)
    assert b["resumed_from"] == 6
    assert [loss for s, loss in a["history"] if s > 6] == [loss for _, loss in b["history"]]
    _same_bits(straight, resumed)
