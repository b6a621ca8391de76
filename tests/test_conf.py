"""Every environment's configuration parses, and every method block is valid for its method.

Catches a misspelt parameter in conf/<env> before a long GPU run does."""

from __future__ import annotations

import pytest
from kedro.config import OmegaConfigLoader

from uad.engine import EngineConfig
from uad.methods.registry import method_class
from uad.methods.declaration import base_methods
from uad.settings import CONFIG_LOADER_ARGS

METHODS = base_methods()
ENVS = ["quick", "smoke", "mvtec", "visa", "realiad"]


def _params(project_root, env: str) -> dict:
    args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k not in ("default_run_env",)}
    loader = OmegaConfigLoader(str(project_root / "conf"), env=env, **args)
    return loader["parameters"]


@pytest.mark.parametrize("env", ENVS)
def test_environment_parameters_are_valid(project_root, env):
    params = _params(project_root, env)
    assert params["data"]["train"], "no training dataset configured"
    EngineConfig.from_params(params["engine"])
    for name in METHODS:
        block = params[name]
        method_class(name).config_class.from_params(block.get("method") or {})
        EngineConfig.from_params({**params["engine"], **(block.get("engine_override") or {})})


def test_paper_environments_change_no_method_default(project_root):
    """conf/mvtec and conf/visa run the papers' defaults (empty method blocks), whatever the quick
    profile changes; Real-IAD only adds Dinomaly's paper values for it."""
    for env in ("mvtec", "visa"):
        params = _params(project_root, env)
        for name in METHODS:
            assert not params[name]["method"], f"{env}: {name} overrides its paper defaults"
    realiad = _params(project_root, "realiad")
    assert realiad["dinomaly"]["method"] == {"bottleneck_dropout": 0.4, "iterations": 50000}
    for name in METHODS:
        if name != "dinomaly":
            assert not realiad[name]["method"], f"realiad: {name} overrides its paper defaults"


def test_default_run_env_is_the_quick_profile():
    assert CONFIG_LOADER_ARGS["default_run_env"] == "quick"


@pytest.mark.parametrize("namespace, method, engine, expected", [
    ("dinomaly", {"lr": "fast"}, {}, "dinomaly.method.lr: 'fast' is not a number"),
    ("patchcore", {"coreset_ratio": 7}, {}, "invalid patchcore parameters: coreset_ratio"),
    ("costfilter_patchcore", {"templates": 0}, {}, "costfilter: templates must be >= 1"),
    ("rlr", {"no_such_setting": 1}, {}, "unknown rlr parameter(s) ['no_such_setting']"),
    ("agpnet", {}, {"batch_size": "abc"}, "engine.batch_size: 'abc' is not an integer"),
])
def test_a_runs_settings_are_checked_as_its_nodes_check_them(namespace, method, engine, expected):
    """What the pre-run check (ParamsCheckHook) raises for a bad engine or method value is the node's
    own one-line error; every environment's own settings, plug-ins included, pass it."""
    from uad.engine.orchestration import check_method_params
    from uad.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        check_method_params(namespace, method, engine, {})
    assert str(err.value).startswith(expected), str(err.value)


@pytest.mark.parametrize("env", ENVS)
def test_every_environment_passes_the_pre_run_check(project_root, env):
    from uad.engine.orchestration import check_method_params

    params = _params(project_root, env)
    namespaces = [k for k, v in params.items() if isinstance(v, dict) and ("method" in v or "engine_override" in v)]
    assert set(METHODS) <= set(namespaces) and any(ns.startswith("costfilter_") for ns in namespaces), namespaces
    for ns in namespaces:
        check_method_params(ns, params[ns].get("method") or {}, params["engine"], params[ns].get("engine_override"))
