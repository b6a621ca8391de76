"""Method registry: build any method from a name and a parameter dict (timm's factory idea).

Methods register themselves with :func:`register`; :func:`build_method` imports the method's
module lazily, so importing the registry stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

if TYPE_CHECKING:  # the registry itself stays torch-free: pipelines are built from PIPELINE_SHAPES
    from .base import AnomalyMethod

_REGISTRY: dict[str, type[AnomalyMethod]] = {}

# name -> module that registers it on import
_KNOWN = {
    "patchcore": "uad.methods.patchcore.method",
    "dinomaly": "uad.methods.dinomaly.method",
    "inpformer": "uad.methods.inpformer.method",
    "rlr": "uad.methods.rlr.method",
    "agpnet": "uad.methods.agpnet.method",
    "costfilter": "uad.methods.costfilter.method",
}


class PipelineShape(NamedTuple):
    """What the Kedro template needs to lay out a method's nodes, known without importing it."""

    stages: tuple[str, ...]  #: ``AnomalyMethod.stages``: one ``train_<stage>`` node each
    feature_cache: bool  #: ``AnomalyMethod.uses_feature_cache()``: a ``features`` node first
    synthesis: bool = False  #: a stage learns from pseudo anomalies (``wants_synthesis``): a ``synthesis`` node first


#: name -> shape; tests/test_pipelines.py checks each entry against the imported class
PIPELINE_SHAPES = {
    "patchcore": PipelineShape(("fit",), True),
    "dinomaly": PipelineShape(("train",), False),
    "inpformer": PipelineShape(("reconstruction", "residual"), False, True),
    "rlr": PipelineShape(("train",), False),
    "agpnet": PipelineShape(("train",), False),
    "costfilter": PipelineShape(("filter",), False, True),
}


#: plug-in -> bases it reads frozen features of without perturbation (a features stage in its DAG);
#: tests/test_startup.py checks it against ``caches_features_over`` of the class
PLUGIN_FEATURE_BASES = {"costfilter": ("patchcore",)}


def plugin_feature_cache(name: str, base: str) -> bool:
    """True when plug-in ``name`` over ``base`` has a features stage (no import of either)."""
    if name in PLUGIN_FEATURE_BASES:
        return base in PLUGIN_FEATURE_BASES[name]
    cls = method_class(name)
    return bool(getattr(cls, "caches_features_over", lambda b: False)(base))


def pipeline_shape(name: str) -> PipelineShape:
    """The stages and feature caching of method ``name`` (no import of the method, nor of torch)."""
    if name in PIPELINE_SHAPES:
        return PIPELINE_SHAPES[name]
    cls = method_class(name)  # a method registered at run time: ask the class
    return PipelineShape(tuple(cls.stages), cls.uses_feature_cache(), bool(cls.synthesis_stages()))


def register(name: str) -> Callable[[type[AnomalyMethod]], type[AnomalyMethod]]:
    def deco(cls: type[AnomalyMethod]) -> type[AnomalyMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    return sorted(set(_KNOWN) | set(_REGISTRY))


def method_class(name: str) -> type[AnomalyMethod]:
    if name not in _REGISTRY:
        if name not in _KNOWN:
            raise KeyError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
        importlib.import_module(_KNOWN[name])
    return _REGISTRY[name]


def build_method(name: str, params: Mapping[str, Any] | None = None) -> AnomalyMethod:
    """Instantiate method ``name``; ``params`` override the paper defaults of its config."""
    return method_class(name)(params or {})
