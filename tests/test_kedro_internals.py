"""The fence around Kedro's and kedro-mlflow's private names: every one the project touches is
listed in ``uad.framework.kedro_internals`` and still exists upstream; no other module touches one."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
from pathlib import Path

import pytest

from uad.framework import kedro_internals as fence

SRC = Path(__file__).resolve().parents[1] / "src" / "uad"


def _resolve(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        if part.endswith("()"):
            obj = getattr(obj, part[:-2])()
        else:
            obj = getattr(obj, part)
    return obj


def _versions() -> str:
    return ", ".join(f"{d} {importlib.metadata.version(d)}" for d in ("kedro", "kedro-mlflow"))


def _upstream_change(module: str, path: str, use: str) -> str | None:
    try:
        _resolve(module, path)
    except (ImportError, AttributeError) as e:
        return (f"upstream change: {module}.{path} is gone ({type(e).__name__}: {e}) in {_versions()}; "
                f"uad.framework.kedro_internals uses it for {use}: adapt that module, or bound the version in "
                "pyproject.toml below this one")
    return None


@pytest.mark.parametrize("module,path,use", fence.PRIVATE_NAMES, ids=[f"{m}:{p}" for m, p, _ in fence.PRIVATE_NAMES])
def test_every_private_name_the_fence_touches_still_exists(module, path, use):
    problem = _upstream_change(module, path, use)
    assert problem is None, problem


def test_a_vanished_name_is_reported_as_the_upstream_change(monkeypatch):
    import kedro.framework.cli.utils as utils

    monkeypatch.delattr(utils, "_get_entry_points")
    problem = _upstream_change("kedro.framework.cli.utils", "_get_entry_points", "init")
    assert problem and problem.startswith("upstream change: kedro.framework.cli.utils._get_entry_points is gone")
    assert "kedro 1." in problem


def test_the_hook_registry_is_wrapped_where_kedro_defines_it():
    present = []
    for module in fence.HOOK_REGISTRY_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, "_register_hooks_entry_points"):
            present.append(module)
    assert present, (f"upstream change: no Kedro module defines _register_hooks_entry_points any more ({_versions()}); "
                     "block_disabled_plugin_hooks in uad.framework.kedro_internals blocks nothing: adapt it")
    fence.block_disabled_plugin_hooks()
    for module in present:
        assert getattr(importlib.import_module(module)._register_hooks_entry_points, "_uad_blocking", False), module


def test_the_dataset_contract_the_project_subclasses_exists():
    from kedro.io.core import AbstractVersionedDataset

    missing = [n for n in fence.DATASET_CONTRACT if not hasattr(AbstractVersionedDataset, n)]
    assert not missing, (f"upstream change: AbstractVersionedDataset lost {missing} ({_versions()}); the datasets of "
                         "uad.framework.io subclass them")


def test_no_other_module_uses_a_private_kedro_or_kedro_mlflow_name():
    """Every ``from kedro... import _x`` and every attribute ``._x`` of a kedro / kedro-mlflow object
    outside the fence: the names listed in the fence may appear nowhere else in src/uad."""
    fenced = {p.split(".")[-1].replace("()", "") for _, p, _ in fence.PRIVATE_NAMES} | {"_register_hooks_entry_points"}
    fenced = {n for n in fenced if n.startswith("_")} - set(fence.DATASET_CONTRACT)  # the contract is for subclasses
    offenders = []
    for f in sorted(SRC.rglob("*.py")):
        if f.name == "kedro_internals.py":
            continue
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("kedro", "kedro_mlflow"):
                offenders += [f"{f.relative_to(SRC)}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr in fenced:
                offenders.append(f"{f.relative_to(SRC)}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in fenced:
                offenders.append(f"{f.relative_to(SRC)}:{node.lineno}: '{node.value}'")
    assert not offenders, offenders


def test_the_versions_written_for_are_bounded():
    text = (SRC.parents[1] / "pyproject.toml").read_text()
    for dist in ("kedro", "kedro-mlflow"):
        line = next(line for line in text.splitlines() if line.strip().startswith(f'"{dist}>='))
        assert "<" in line, f"{dist} has no upper bound in pyproject.toml: {line.strip()}"
