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


def _on_ci() -> bool:
    """True where the environment says CI (``CI=true``, as .ci/run and the usual CI services set)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


@pytest.fixture
def chromium() -> str:
    """The headless browser for the browser tests (Debian's ``chromium``): its path.

    Missing, the test skips with the reason on a workstation, but under ``CI=true`` it fails:
    .ci/run installs the browser, so a CI machine without one is a broken CI machine, and a skip
    there would turn the browser checks off without anyone noticing."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    advice = "install Debian's chromium package (apt-get install chromium)"
    if _on_ci():
        pytest.fail(f"CI={os.environ['CI']} but no chromium on PATH: a browser test cannot be skipped in CI; "
                    f".ci/run installs it, or {advice}", pytrace=False)
    pytest.skip(f"no chromium on PATH: {advice} to run this browser test (under CI=true it fails instead)")
