"""Test-wide settings: offline, quiet, few threads, and one shared embedded dataset."""

from __future__ import annotations

import os

# Before anything imports torch / huggingface_hub / kedro.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# file digests (uad.data.index.file_digests) cached in a throw-away folder, not the user's ~/.cache
os.environ.setdefault("UAD_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="uad-test-cache-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# under pytest-xdist (make test: two workers on two cores) one thread per worker, and per process
# it starts: two threads each oversubscribed the cores and made the suite 1,375 s against 866 s
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The embedded synthetic dataset, generated once per test session."""
    from uad.data.synthetic import ensure_synthetic_dataset

    return ensure_synthetic_dataset(tmp_path_factory.mktemp("embedded") / "synthetic", seed=0)
