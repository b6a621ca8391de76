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
