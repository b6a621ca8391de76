"""The shared engine: exact resume, NaN guard, atomic pickle-free checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from uad.engine import CheckpointError, EngineConfig, NonFiniteLossError, Trainer, load_state, save_state
from uad.engine.trainer import StepSampler
from uad.methods.base import AnomalyMethod, OptimSetup, Prediction


class Toy(Dataset):
    def __init__(self, n=13):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.epoch = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        # depends on the epoch so the test also checks that the epoch reaches the dataset
        return {"image": self.x[i] + 0.01 * self.epoch, "index": i}


class ToyAE(AnomalyMethod):
    name = "toy"

    def __init__(self, params=None, blow_up_at=None):
        super().__init__(params)
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6))
        self.blow_up_at = blow_up_at

    @property
    def input_spec(self):
        return {"resize": 8, "crop": 8, "mean": (0, 0, 0), "std": (1, 1, 1)}

    def modules(self):
        return {"net": self.net}

    def configure_optimization(self, stage, num_train_samples):
        opt = torch.optim.AdamW(self.net.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
        return OptimSetup(opt, sched, iterations=20, grad_clip_norm=1.0)

    def training_step(self, stage, batch, step):
        x = batch["image"]
        loss = ((self.net(x) - x) ** 2).mean()
        if self.blow_up_at is not None and step == self.blow_up_at:
            loss = loss * float("nan")
        return loss

    def predict(self, images):
        err = ((self.net(images) - images) ** 2).mean(-1)
        return Prediction(err, err[:, None, None])


def _fit(tmp_path, iterations=20, blow=None, key="k"):
    m = ToyAE(blow_up_at=blow)
    cfg = EngineConfig(device="cpu", iterations=iterations, batch_size=4, checkpoint_dir=str(tmp_path),
                       checkpoint_every=5, progress=False, log_every=1)
    out = Trainer(cfg, key=key).fit(m, "train", Toy())
    return m, out


def test_step_sampler_resume_is_a_suffix():
    full = list(StepSampler(13, 4, 10, seed=7))
    tail = list(StepSampler(13, 4, 10, seed=7, start_step=6))
    assert tail == full[6 * 4:]
    assert len(full) == 40
    # every epoch is a permutation of the 13 samples
    assert sorted(v % 13 for v in full[:13]) == list(range(13))


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight, _ = _fit(tmp_path / "a")
    # "kill" after 10 steps: a run limited to 10 iterations leaves its checkpoint at step 10
    _fit(tmp_path / "b", iterations=10)
    ckpt = tmp_path / "b" / "toy-train-k" / "last.safetensors"
    _, meta = load_state(ckpt)
    assert meta["step"] == 10
    resumed, out = _fit(tmp_path / "b", iterations=20)
    assert out["resumed_from"] == 10
    for a, b in zip(straight.net.parameters(), resumed.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_checkpoint_that_no_longer_fits_is_retrained_not_a_crash(tmp_path, caplog):
    """Same key, different network (a code default changed): warn, put the method back, train
    from scratch; the result equals a fresh training."""
    _fit(tmp_path / "b", iterations=10)
    fresh, _ = _fit(tmp_path / "a", iterations=20)

    class Wider(ToyAE):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.net = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6))
            self.head = nn.Linear(2, 2)

        def modules(self):
            return {"net": self.net, "head": self.head}

    cfg = EngineConfig(device="cpu", iterations=20, batch_size=4, checkpoint_dir=str(tmp_path / "b"),
                       checkpoint_every=5, progress=False, log_every=1)
    m = Wider()
    with caplog.at_level("WARNING"):
        out = Trainer(cfg, key="k").fit(m, "train", Toy())
    assert out["resumed_from"] == 0 and "cannot resume" in caplog.text
    for a, b in zip(fresh.net.parameters(), m.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(NonFiniteLossError, match="step 3"):
        _fit(tmp_path, blow=3)


def test_checkpoint_is_safetensors_and_never_a_pickle(tmp_path):
    p = save_state(tmp_path / "x.safetensors", {"w": torch.arange(4.0)}, {"step": 3, "note": "hi"})
    raw = p.read_bytes()
    with pytest.raises(Exception):
        pickle.loads(raw)
    t, meta = load_state(p)
    assert meta == {"step": 3, "note": "hi"} and torch.equal(t["w"], torch.arange(4.0))
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = save_state(tmp_path / "x.safetensors", {"w": torch.zeros(100)})
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_state(p)


def test_unknown_engine_parameter_is_rejected():
    with pytest.raises(ValueError, match="iteratons"):
        EngineConfig.from_params({"iteratons": 3})


def test_a_checkpoint_with_flipped_tensor_bytes_is_refused_at_load(tmp_path):
    """Bytes flipped inside the tensor data (header intact) no longer load silently: the digest
    stored at save time names the damaged file; an intact file loads, and so does one of an older
    version without a digest."""
    import pytest
    import torch
    from safetensors.torch import save_file

    from uad.engine.checkpoint import CheckpointError, load_state, save_state

    path = save_state(tmp_path / "a.safetensors", {"w": torch.randn(64, 64), "b": torch.arange(5)}, {"stage": "x"})
    tensors, meta = load_state(path)
    assert meta == {"stage": "x"} and set(tensors) == {"b", "w"}
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 100] ^= 0x5A  # inside w's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"a\.safetensors is damaged"):
        load_state(path)
    old = tmp_path / "old.safetensors"
    save_file({"w": torch.ones(2)}, str(old), metadata={"uad": "{}"})
    assert torch.equal(load_state(old)[0]["w"], torch.ones(2))


def test_disk_full_while_saving_names_the_folder_and_the_space_needed(tmp_path, monkeypatch):
    import errno

    import pytest
    import torch

    import uad.engine.checkpoint as ck
    from uad.errors import UadError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(UadError, match=r"no space left in .*ckpts: writing needed about 0\.2 MiB") as err:
        ck.save_state(tmp_path / "ckpts" / "a.safetensors", {"w": torch.zeros(256, 256)})
    assert "\n" not in str(err.value) and not list((tmp_path / "ckpts").glob("*.tmp"))  # nothing half-written left
