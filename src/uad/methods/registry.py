"""Method registry: build any method from a name and a parameter dict (timm's factory idea).

What methods exist is read from their declarations (:mod:`uad.methods.declaration`: one
``declaration.py`` per method folder, or an installed package's ``uad.methods`` entry point);
:func:`method_class` imports the module a declaration names, whose class registers itself with
:func:`register`, which checks it against its declaration. Importing the registry imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

from .declaration import declaration, declarations

if TYPE_CHECKING:  # the registry itself stays torch-free: pipelines are built from the declarations
    from .base import AnomalyMethod

_REGISTRY: dict[str, type[AnomalyMethod]] = {}


class PipelineShape(NamedTuple):
    """What the Kedro template needs to lay out a method's nodes, known without importing it."""

    stages: tuple[str, ...]  #: one ``train_<stage>`` node each
    feature_cache: bool  #: a ``features`` node first
    synthesis: bool = False  #: a stage learns from pseudo anomalies: a ``synthesis`` node first


def pipeline_shape(name: str) -> PipelineShape:
    """The stages, features and synthesis stages of method ``name`` (from its declaration)."""
    d = declaration(name)
    return PipelineShape(tuple(d.stages), bool(d.features_stage), bool(d.synthesis))


def plugin_feature_cache(name: str, base: str) -> bool:
    """True when plug-in ``name`` over ``base`` has a features stage (no import of either)."""
    return declaration(name).features_over(declaration(base))


def _check_against_declaration(name: str, cls: type) -> None:
    from .capabilities import FeatureFitting, ReferencePool

    d = declarations().get(name)
    if d is None:
        return  # registered at run time without a declaration (a test's throw-away class)
    problems = []
    if tuple(cls.stages) != tuple(d.stages):
        problems.append(f"stages {tuple(cls.stages)} != declared {tuple(d.stages)}")
    if d.features_stage and not issubclass(cls, FeatureFitting):
        problems.append("declares a features stage but is not a FeatureFitting")
    if d.plugin_features_over and not issubclass(cls, ReferencePool):
        problems.append("declares a features stage over bases but is not a ReferencePool")
    if problems:
        raise TypeError(f"method {name!r} ({cls.__module__}.{cls.__qualname__}) disagrees with its declaration "
                        f"({d.module.rsplit('.', 1)[0]}.declaration): " + "; ".join(problems))


def register(name: str) -> Callable[[type[AnomalyMethod]], type[AnomalyMethod]]:
    def deco(cls: type[AnomalyMethod]) -> type[AnomalyMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        _check_against_declaration(name, cls)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    return sorted(set(declarations()) | set(_REGISTRY))


def method_class(name: str) -> type[AnomalyMethod]:
    if name not in _REGISTRY:
        decls = declarations()
        if name not in decls:
            raise KeyError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
        importlib.import_module(decls[name].module)
        if name not in _REGISTRY:
            raise KeyError(f"method {name!r}: importing {decls[name].module} registered no class "
                           f"(decorate it with @register({name!r}))")
    return _REGISTRY[name]


def build_method(name: str, params: Mapping[str, Any] | None = None) -> AnomalyMethod:
    """Instantiate method ``name``; ``params`` override the paper defaults of its config."""
    return method_class(name)(params or {})
