"""The core library imports no kedro or mlflow, and the project keeps Kedro telemetry off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CORE_MODULES = [
    "uad.data", "uad.data.images", "uad.data.index", "uad.data.layouts", "uad.data.settings", "uad.data.synthetic",
    "uad.data.torch_data", "uad.data.semi", "uad.backbones", "uad.metrics", "uad.metrics.plots", "uad.engine",
    "uad.methods.registry", "uad.methods.common", "uad.methods.patchcore.method", "uad.methods.dinomaly.method",
    "uad.methods.inpformer.method", "uad.methods.rlr.method", "uad.methods.agpnet.method", "uad.methods.common.ema",
    "uad.synthesis", "uad.data.folder", "uad.data.augment", "uad.metrics.thresholds", "uad.export",
    "uad.inference", "uad.methods.costfilter.method",
]


def test_core_imports_without_kedro_or_mlflow():
    # Make kedro and mlflow unimportable, then import every core module.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('kedro', 'kedro_datasets', 'kedro_mlflow', 'kedro_viz', 'mlflow'):\n"
        "            raise ImportError('core must not import ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import importlib\nfor m in {CORE_MODULES!r}:\n    importlib.import_module(m)\n"
        "from uad.methods.registry import build_method, available_methods\n"
        "print('ok', available_methods())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout


def test_telemetry_is_off_for_the_project(project_root: Path):
    from kedro_telemetry.plugin import _check_for_telemetry_consent

    assert (project_root / ".telemetry").read_text().strip() == "consent: false"
    assert _check_for_telemetry_consent(project_root) is False
    from uad import settings

    assert "kedro-telemetry" in settings.DISABLE_HOOKS_FOR_PLUGINS


def test_no_registry_host_or_lock_file_committed(project_root: Path):
    out = subprocess.run(["git", "ls-files"], cwd=project_root, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (e.g. an sdist): nothing to check
        return
    files = out.stdout.split()
    assert not [f for f in files if f.endswith((".lock", "package-lock.json"))]
    for f in files:
        p = project_root / f
        if p.suffix in {".toml", ".txt", ".cfg", ".yml", ".yaml", ".ini", ".py", ".md"} and p.is_file():
            text = p.read_text(errors="ignore")
            # the option names are assembled so this test file does not match its own check
            for option in ("index" + "-url", "find" + "-links"):
                assert option not in text, f"{f} sets {option}"
