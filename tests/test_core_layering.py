"""The core library imports no kedro or mlflow, its layers point one way (the data layer never
imports the engine) with no import cycle anywhere in ``src/uad``, and the project keeps Kedro
telemetry off."""

from __future__ import annotations

import ast
import shutil
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


def import_graph(src: Path) -> dict[str, set[str]]:
    """Every module of the ``uad`` package under ``src`` -> the ``uad`` modules it imports, at
    module level or inside functions (a lazy import is still a dependency). ``from pkg import
    sub`` counts as an import of the submodule ``pkg.sub`` when it is one, else of ``pkg``."""
    mods: dict[str, Path] = {}
    for p in (src / "uad").rglob("*.py"):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        deps.add(f"{base}.{a.name}")
                    elif base in mods:
                        deps.add(base)
        graph[name] = deps - {name}
    return graph


def layering_problems(src: Path) -> list[str]:
    """Imports from the data layer into the engine, and import cycles (each named once)."""
    graph = import_graph(src)
    problems = [f"{m} imports {d}: the data layer must not import the engine (move the shared piece into uad.data)"
                for m, deps in sorted(graph.items()) if m.startswith("uad.data")
                for d in sorted(deps) if d == "uad.engine" or d.startswith("uad.engine.")]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                problems.append("import cycle: " + " <-> ".join(sorted(comp)))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return problems


def test_layers_point_one_way_with_no_import_cycle(project_root: Path):
    assert layering_problems(project_root / "src") == []


def test_layering_check_catches_a_data_to_engine_import(project_root: Path, tmp_path: Path):
    """The check above is not vacuous: one deliberate ``from uad.engine import ...`` in the data
    layer (which also closes a cycle, the engine importing the data layer) fails it."""
    shutil.copytree(project_root / "src" / "uad", tmp_path / "uad")
    target = tmp_path / "uad" / "data" / "torch_data.py"
    target.write_text(target.read_text() + "\n\ndef _late():\n    from uad.engine import Trainer  # noqa: F401\n")
    problems = layering_problems(tmp_path)
    assert any("uad.data.torch_data imports uad.engine" in p for p in problems), problems
    assert any(p.startswith("import cycle:") and "uad.data.torch_data" in p for p in problems), problems
