"""Each method described once: a declaration that imports no torch, read by every part of the project.

A method's folder holds ``declaration.py`` with ``DECLARATION = MethodDeclaration(...)``: its name,
the module that defines its :class:`~uad.methods.base.AnomalyMethod`, its training stages, which of
them learn from pseudo anomalies (and with which recipe), whether it has a features stage, whether
a plug-in can read it as a base (and how: ``base_kind``), and, for a plug-in, over which bases.
The method registry, the Kedro pipeline registry, the benchmark and CostFilter-AD's list of bases
all read :func:`declarations`; none keeps a list of its own.

Methods are found without importing them:

- every sub-package of :mod:`uad.methods` that has a ``declaration`` module;
- every entry point of the group ``uad.methods`` (``name = "package.declaration:DECLARATION"``),
  so a method in another installed package joins the project with no file of this one edited.

Pure Python: no torch, no kedro, no mlflow (``kedro registry list`` builds every pipeline from it).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from uad.errors import ConfigError

__all__ = ["MethodDeclaration", "declarations", "declaration", "base_methods", "plugins", "plugin_namespace",
           "split_namespace", "refresh", "ENTRY_POINT_GROUP", "BASE_KINDS"]

#: entry-point group through which an installed package declares more methods
ENTRY_POINT_GROUP = "uad.methods"
#: how a plug-in reads a base: from its reconstruction (a template per image) or from its embedding
#: of clean normal images (nearest normal images as templates, a features stage first)
BASE_KINDS = ("reconstruction", "embedding")


@dataclass(frozen=True)
class MethodDeclaration:
    """What the project needs to know of a method without importing it."""

    name: str  #: registry name == pipeline name == parameters key == namespace
    module: str  #: the module whose import registers the :class:`AnomalyMethod` subclass
    stages: tuple[str, ...]  #: ``AnomalyMethod.stages``: one ``train_<stage>`` node each, in order
    paper: str = ""  #: the paper, one line
    #: stage -> pseudo-anomaly recipe (``uad.synthesis.RECIPES``) of the stages that learn from
    #: synthetic anomalies: the pipeline gets a ``synthesis`` node first
    synthesis: Mapping[str, str] = field(default_factory=dict)
    features_stage: bool = False  #: frozen-encoder features of clean normals cached by a ``features`` node first
    #: how a plug-in reads this method as its base (None: it cannot be one)
    base_kind: str | None = None
    plugin: bool = False  #: a plug-in over a trained base (``<name>_<base>`` pipelines), not a method of its own
    #: a plug-in's bases by kind: those of these kinds get a ``<name>_<base>`` pipeline
    plugin_base_kinds: tuple[str, ...] = ()
    #: a plug-in's base kinds over which it has a features stage (its reference pool)
    plugin_features_over: tuple[str, ...] = ()
    #: a plug-in's base when run as ``--pipeline=<name>`` (the released code's)
    default_base: str | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or "_" in self.name:
            raise ValueError(f"method name {self.name!r}: a lower-case identifier without '_' (plug-in namespaces "
                             "are <plugin>_<base>)")
        if not self.stages:
            raise ValueError(f"method {self.name!r} declares no stage")
        unknown = set(self.synthesis) - set(self.stages)
        if unknown:
            raise ValueError(f"method {self.name!r}: synthesis recipes for stages it does not have: {sorted(unknown)}")
        for kind in (self.base_kind, *self.plugin_base_kinds, *self.plugin_features_over):
            if kind is not None and kind not in BASE_KINDS:
                raise ValueError(f"method {self.name!r}: base kind {kind!r} is not one of {BASE_KINDS}")
        if self.plugin and (self.base_kind is not None or not self.plugin_base_kinds):
            raise ValueError(f"plug-in {self.name!r}: declares the base kinds it reads and is no base itself")

    @classmethod
    def undeclared(cls, name: str, module: str, stages: tuple[str, ...]) -> "MethodDeclaration":
        """What a class registered without a declaration counts as (no checks of its name)."""
        decl = object.__new__(cls)
        for key, value in (("name", name), ("module", module), ("stages", stages), ("paper", ""), ("synthesis", {}),
                           ("features_stage", False), ("base_kind", None), ("plugin", False),
                           ("plugin_base_kinds", ()), ("plugin_features_over", ()), ("default_base", None)):
            object.__setattr__(decl, key, value)
        return decl

    def synthesis_stages(self) -> dict[str, str]:
        return dict(self.synthesis)

    def reads_base(self, base: MethodDeclaration) -> bool:
        """A plug-in over ``base``: whether the pairing exists."""
        return self.plugin and base.base_kind in self.plugin_base_kinds

    def features_over(self, base: MethodDeclaration) -> bool:
        """A plug-in over ``base``: whether its pipeline has a features stage (the reference pool)."""
        return self.reads_base(base) and base.base_kind in self.plugin_features_over


_CACHE: dict[str, MethodDeclaration] | None = None


def _from_package() -> list[MethodDeclaration]:
    import uad.methods as pkg

    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        # listed without importing the package: a shared one (common) imports torch and declares nothing
        folder = Path(getattr(info.module_finder, "path", "")) / info.name
        if not any(m.name == "declaration" for m in pkgutil.iter_modules([str(folder)])):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}.declaration")
        found.append(_checked(getattr(mod, "DECLARATION", None), mod.__name__))
    return found


def _from_entry_points() -> list[MethodDeclaration]:
    found = []
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        found.append(_checked(ep.load(), f"entry point {ep.name} = {ep.value}"))
    return found


def _checked(decl: object, where: str) -> MethodDeclaration:
    if not isinstance(decl, MethodDeclaration):
        raise ConfigError(f"{where}: DECLARATION is {type(decl).__name__}, not a uad.methods.declaration.MethodDeclaration")
    return decl


def refresh() -> None:
    """Forget what was found (a test that installs a method at run time)."""
    global _CACHE
    _CACHE = None


def declarations() -> dict[str, MethodDeclaration]:
    """Every declared method, by name (the package's own first, by name, then installed ones)."""
    global _CACHE
    if _CACHE is None:
        out: dict[str, MethodDeclaration] = {}
        for decl in _from_package() + _from_entry_points():
            if decl.name in out and out[decl.name] != decl:
                raise ConfigError(f"method {decl.name!r} is declared twice ({out[decl.name].module} and {decl.module})")
            out[decl.name] = decl
        _CACHE = out
    return dict(_CACHE)


def declaration(name: str) -> MethodDeclaration:
    decls = declarations()
    if name not in decls:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(decls))}")
    return decls[name]


def base_methods() -> list[str]:
    """The methods that train on their own (each has a pipeline, a benchmark entry, can be a base)."""
    return [n for n, d in declarations().items() if not d.plugin]


def plugins() -> dict[str, list[str]]:
    """plug-in -> the bases it pairs with (each pairing is a ``<plugin>_<base>`` pipeline)."""
    decls = declarations()
    return {n: [b for b, bd in decls.items() if d.reads_base(bd)] for n, d in decls.items() if d.plugin}


def plugin_namespace(plugin: str, base: str) -> str:
    return f"{plugin}_{base}"


def split_namespace(namespace: str) -> tuple[str, str | None]:
    """``costfilter_patchcore`` -> ``("costfilter", "patchcore")``; ``dinomaly`` -> ``("dinomaly", None)``.
    Unknown names are returned as they are (the caller reports them)."""
    if "_" in namespace:
        plugin, base = namespace.split("_", 1)
        return plugin, base
    return namespace, None
