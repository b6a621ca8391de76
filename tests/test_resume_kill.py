"""Resume after ``kill -9`` reproduces the uninterrupted run exactly, for methods whose training
draws random numbers (Dinomaly's dropout, RLR's feature jitter).

Each run is a real subprocess of the shared engine; the killed one sends itself SIGKILL right after
a step (no clean-up, no final checkpoint), then the same command resumes from its last periodic
checkpoint and finishes. Its final weights must equal those of a run that was never interrupted.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import logging, os, signal, sys
    import torch
    from safetensors.torch import save_file
    from torch.utils.data import Dataset
    from uad.engine import EngineConfig, Trainer
    from uad.methods.registry import build_method

    logging.basicConfig(level=logging.INFO)
    name, ckpt_dir, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    params = {
        "dinomaly": dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=56, crop=56),
        "rlr": dict(backbone="tf_efficientnet_lite0", weights="bundled", resize=64, crop=64, windows=[5, 3, 3]),
    }[name]

    class Images(Dataset):
        def __len__(self):
            return 10
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            size = params["crop"]
            return {"image": torch.randn(3, size, size, generator=g)}

    method = build_method(name, params)
    cfg = EngineConfig(device="cpu", seed=5, iterations=12, batch_size=3, num_workers=0, checkpoint_dir=ckpt_dir,
                       checkpoint_every=4, log_every=1, progress=False)

    def on_log(stage, step, loss):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer(cfg, key="kill-test", on_log=on_log).fit(method, "train", Images())
    save_file(method.state_dict(), out)
    """
)


def _run(script, name, ckpt, out, kill_at=0):
    return subprocess.run([sys.executable, str(script), name, str(ckpt), str(out), str(kill_at)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dinomaly", "rlr"])
def test_kill_minus_nine_then_resume_equals_the_uninterrupted_run(tmp_path, name):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    full = _run(script, name, tmp_path / "ck_full", tmp_path / "full.safetensors")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _run(script, name, tmp_path / "ck_kill", tmp_path / "resumed.safetensors", kill_at=10)
    assert killed.returncode == -9, f"the run was not killed: {killed.returncode} {killed.stderr[-2000:]}"
    assert not (tmp_path / "resumed.safetensors").exists()
    resumed = _run(script, name, tmp_path / "ck_kill", tmp_path / "resumed.safetensors")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "from step 8" in resumed.stderr

    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys()
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diffs, f"resumed weights differ from the uninterrupted run: {sorted(diffs.items())[:5]}"
