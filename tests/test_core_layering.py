"""The core library imports no kedro or mlflow, its layers point one way (the data layer never
imports the engine) with no import cycle anywhere in ``src/uad``, and the project keeps Kedro
telemetry off."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "uad"
#: the Kedro / MLflow layer: one package, plus the entry points Kedro looks for at the package's top
KEDRO_LAYER = ("framework",)
KEDRO_ENTRY_POINTS = ("settings.py", "pipeline_registry.py", "cli.py", "__main__.py")
FRAMEWORK_IMPORTS = ("kedro", "kedro_datasets", "kedro_mlflow", "kedro_viz", "mlflow")


def _core_files() -> list[Path]:
    out = []
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC)
        if rel.parts[0] in KEDRO_LAYER or (len(rel.parts) == 1 and rel.name in KEDRO_ENTRY_POINTS):
            continue
        out.append(f)
    return out


def _module(f: Path) -> str:
    parts = ("uad",) + f.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


CORE_MODULES = [_module(f) for f in _core_files()]


def test_the_tree_shows_the_layers():
    """Every core file, found by walking src/uad (not a list kept by hand), has no import of kedro or
    mlflow, even a lazy one inside a function; the Kedro layer is the one package ``uad.framework``."""
    offenders = []
    for f in _core_files():
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            offenders += [f"{f.relative_to(SRC)}: {n}" for n in names
                          if n.split(".")[0] in FRAMEWORK_IMPORTS or n.startswith("uad.framework")]
    assert not offenders, offenders
    assert len(CORE_MODULES) > 60 and "uad.engine.orchestration" in CORE_MODULES and "uad.engine.scoring" in CORE_MODULES
    top = sorted(p.name for p in SRC.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
    framework_like = [n for n in top if n in ("hooks.py", "tracking.py", "lazy_tracking.py", "io", "pipelines", "mlflow_model.py")]
    assert not framework_like, f"Kedro-layer modules outside uad.framework: {framework_like}"


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
        "from uad.methods.registry import build_method, available_methods, method_class\n"
        "for n in available_methods():\n    method_class(n)\n"
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
