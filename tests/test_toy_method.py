"""A method is described once: a toy method in a temporary package, declared through the
``uad.methods`` entry-point group, appears in the method registry, the Kedro pipelines (with its
plug-in pairing and its features stage there), the benchmark and CostFilter-AD's bases, with no
file of the project edited."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DECLARATION = '''
from uad.methods.declaration import MethodDeclaration

DECLARATION = MethodDeclaration(
    name="toy",
    module="toyuad.method",
    stages=("fit",),
    paper="a toy for the tests",
    base_kind="embedding",
)
'''

METHOD = '''
import torch

from uad.methods.base import AnomalyMethod, Prediction
from uad.methods.registry import register


@register("toy")
class Toy(AnomalyMethod):
    stages = ("fit",)

    def modules(self):
        return {}

    def predict(self, images):
        maps = images.mean(1)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)
'''


def _forget_toy() -> None:
    from uad.methods import registry

    for name in [m for m in sys.modules if m == "toyuad" or m.startswith("toyuad.")]:
        del sys.modules[name]
    registry._REGISTRY.pop("toy", None)  # the class registered by the toy's method module


def _install_toy(root: Path) -> None:
    _forget_toy()
    pkg = root / "toyuad"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "declaration.py").write_text(textwrap.dedent(DECLARATION))
    (pkg / "method.py").write_text(textwrap.dedent(METHOD))
    dist = root / "toyuad-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyuad\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[uad.methods]\ntoy = toyuad.declaration:DECLARATION\n")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    from uad.methods import declaration

    _install_toy(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    declaration.refresh()
    yield tmp_path / "site"
    declaration.refresh()
    _forget_toy()


def test_a_declared_method_appears_everywhere_with_no_file_edited(toy):
    from uad.framework.pipelines.benchmark.nodes import known_methods, plan_children
    from uad.methods.costfilter.config import CostFilterConfig, bases
    from uad.methods.declaration import declarations, plugins
    from uad.methods.registry import available_methods, build_method, pipeline_shape
    from uad.pipeline_registry import register_pipelines

    assert declarations()["toy"].module == "toyuad.method"
    # the fast entry-point scan reads what importlib.metadata reads
    import importlib.metadata

    from uad.methods.declaration import ENTRY_POINT_GROUP, _entry_point_values

    assert dict(_entry_point_values()) == {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert dict(_entry_point_values()) == {"toy": "toyuad.declaration:DECLARATION"}
    assert "toy" in available_methods() and build_method("toy").name == "toy"
    assert pipeline_shape("toy").stages == ("fit",)
    # the plug-in pairing: CostFilter-AD reads it as an embedding base, with its features stage
    assert "toy" in plugins()["costfilter"] and "toy" in bases()
    assert CostFilterConfig.from_params({"base": "toy"}).base == "toy"
    pipes = register_pipelines()
    assert {"toy", "infer_toy", "export_toy", "costfilter_toy", "infer_costfilter_toy"} <= set(pipes)
    names = {n.name for n in pipes["toy"].nodes}
    assert {"toy.train_fit", "toy.predict", "toy.evaluate", "toy.report"} <= names, sorted(names)
    assert "costfilter_toy.extract_features" in {n.name for n in pipes["costfilter_toy"].nodes}
    # the benchmark knows it, and its plug-in pairing
    assert {"toy", "costfilter_toy"} <= set(known_methods())
    children = plan_children({"methods": ["toy", "costfilter_toy"]}, {"engine": {"seed": 1}}, "smoke", "abc")
    assert [c["method"] for c in children] == ["toy", "costfilter_toy"]


def test_without_the_declaration_it_is_nowhere(tmp_path):
    from uad.framework.pipelines.benchmark.nodes import known_methods
    from uad.methods.costfilter.config import bases
    from uad.methods.declaration import refresh

    refresh()
    assert "toy" not in known_methods() and "toy" not in bases()


def test_kedro_lists_the_toy_pipelines(toy):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(toy), os.environ.get("PYTHONPATH", "")]),
           "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    kedro = Path(sys.executable).with_name("kedro")
    out = subprocess.run([str(kedro), "registry", "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = {line.strip().lstrip("- ").strip() for line in out.stdout.splitlines()}
    assert {"toy", "costfilter_toy", "infer_toy"} <= listed, out.stdout[-2000:]


def test_a_wrong_declaration_is_one_error_naming_it(tmp_path, monkeypatch):
    from uad.errors import ConfigError
    from uad.methods import declaration

    _install_toy(tmp_path / "site")
    decl = tmp_path / "site" / "toyuad" / "declaration.py"
    decl.write_text(decl.read_text().replace('stages=("fit",)', 'stages=("fit",), synthesis={"train": "draem"}'))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    declaration.refresh()
    try:
        with pytest.raises(ConfigError, match=r"entry point toy = toyuad.declaration:DECLARATION .*synthesis recipes "
                                              r"for stages it does not have: \['train'\]; fix the method's declaration"):
            declaration.declarations()
    finally:
        declaration.refresh()
        _forget_toy()
