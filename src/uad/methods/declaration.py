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
from types import MappingProxyType
from typing import Mapping

from uad.errors import ConfigError

__all__ = ["MethodDeclaration", "declarations", "declaration", "base_methods", "plugins", "plugin_namespace",
           "split_namespace", "refresh", "ENTRY_POINT_GROUP", "BASE_KINDS"]

#: entry-point group through which an installed package declares more methods
ENTRY_POINT_GROUP = "uad.methods"
#: how a plug-in reads a base: from its reconstruction (a template per image) or from its embedding
#: of clean normal images (nearest normal images as templates, a features stage first)
BASE_KINDS = ("reconstruction", "embedding")


_FIELDS = ("name", "module", "stages", "paper", "synthesis", "features_stage", "base_kind", "plugin",
           "plugin_base_kinds", "plugin_features_over", "default_base")


class MethodDeclaration:
    """What the project needs to know of a method without importing it (immutable).

    ``name``: registry name == pipeline name == parameters key == namespace. ``module``: the module
    whose import registers the :class:`AnomalyMethod` subclass. ``stages``: one ``train_<stage>``
    node each, in order. ``paper``: one line. ``synthesis``: stage -> pseudo-anomaly recipe
    (``uad.synthesis.RECIPES``) of the stages that learn from synthetic anomalies (the pipeline
    gets a ``synthesis`` node first). ``features_stage``: frozen-encoder features of clean normals
    cached by a ``features`` node first. ``base_kind``: how a plug-in reads this method as its base
    (None: it cannot be one). ``plugin``: a plug-in over a trained base (``<name>_<base>``
    pipelines), not a method of its own; ``plugin_base_kinds``: the kinds of base it reads;
    ``plugin_features_over``: the base kinds over which it has a features stage (its reference
    pool); ``default_base``: its base when run as ``--pipeline=<name>``.

    A plain class rather than a dataclass: the pipelines are laid out from these at every start
    of ``kedro``, and a dataclass compiles its methods when the class is made."""

    __slots__ = _FIELDS

    def __init__(self, *, name: str, module: str, stages: tuple[str, ...], paper: str = "",
                 synthesis: Mapping[str, str] | None = None, features_stage: bool = False,
                 base_kind: str | None = None, plugin: bool = False, plugin_base_kinds: tuple[str, ...] = (),
                 plugin_features_over: tuple[str, ...] = (), default_base: str | None = None):
        values = (str(name), str(module), tuple(stages), str(paper), dict(synthesis or {}), bool(features_stage),
                  base_kind, bool(plugin), tuple(plugin_base_kinds), tuple(plugin_features_over), default_base)
        for key, value in zip(_FIELDS, values):
            object.__setattr__(self, key, value)
        self._validate()

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"a MethodDeclaration is immutable ({key})")

    def _values(self) -> tuple:
        return tuple(getattr(self, k) if k != "synthesis" else tuple(sorted(self.synthesis.items())) for k in _FIELDS)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodDeclaration) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "MethodDeclaration(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in _FIELDS) + ")"

    def _validate(self) -> None:
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
        """What a class registered without a declaration counts as: its stages, nothing optional."""
        return cls(name=name, module=module, stages=stages)

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
    import os

    import uad.methods as pkg

    found = []
    for root in pkg.__path__:
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            # a method folder has a declaration.py; a shared package (common) has none and is not imported
            if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "declaration.py")):
                name = f"{pkg.__name__}.{entry.name}.declaration"
                mod = _import_declaration(name, os.path.join(entry.path, "declaration.py"))
                found.append(_checked(getattr(mod, "DECLARATION", None), mod.__name__))
    return found


def _entry_point_values() -> list[tuple[str, str]]:
    """``(name, "module:attr")`` of every ``uad.methods`` entry point of the installed packages.

    Read straight from each ``*.dist-info/entry_points.txt`` on ``sys.path`` (only files that name
    the group are parsed): ``importlib.metadata.entry_points`` builds every distribution's entry
    points to answer, which costs ``kedro registry list`` a tenth of a second here."""
    import configparser
    import os
    import sys

    found: dict[str, str] = {}
    for folder in sys.path:
        try:
            entries = sorted(os.scandir(folder or "."), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if not entry.name.endswith((".dist-info", ".egg-info")):
                continue
            path = os.path.join(entry.path, "entry_points.txt")
            try:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError:
                continue
            if f"[{ENTRY_POINT_GROUP}]" not in text:
                continue
            parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
            parser.optionxform = str  # type: ignore[assignment]  (names keep their case)
            parser.read_string(text)
            for name, value in parser.items(ENTRY_POINT_GROUP):
                found.setdefault(name.strip(), value.strip())  # the first on sys.path wins, as importlib's
    return sorted(found.items())


def _from_entry_points() -> list[MethodDeclaration]:
    found = []
    for name, value in _entry_point_values():
        module, _, attr = value.partition(":")
        obj = _import_declaration(module.strip(), f"entry point {name} = {value} (group {ENTRY_POINT_GROUP})")
        for part in attr.strip().split(".") if attr.strip() else ():
            obj = getattr(obj, part)
        found.append(_checked(obj, f"entry point {name} = {value}"))
    return found


def _import_declaration(module: str, where: str):
    """The module of a declaration; a declaration that is wrong is one error naming it."""
    try:
        return importlib.import_module(module)
    except (ValueError, TypeError) as e:  # MethodDeclaration's own checks, or a wrong argument
        raise ConfigError(f"{where}: {e}; fix the method's declaration") from None
    except ImportError as e:
        raise ConfigError(f"{where}: cannot be imported ({e}); fix or uninstall the package that declares it") from None


def _checked(decl: object, where: str) -> MethodDeclaration:
    if not isinstance(decl, MethodDeclaration):
        raise ConfigError(f"{where}: DECLARATION is {type(decl).__name__}, not a uad.methods.declaration.MethodDeclaration")
    return decl


def refresh() -> None:
    """Forget what was found (a test that installs a method at run time)."""
    global _CACHE
    _CACHE = None


def declarations() -> Mapping[str, MethodDeclaration]:
    """Every declared method, by name (the package's own first, by name, then installed ones)."""
    global _CACHE
    if _CACHE is None:
        out: dict[str, MethodDeclaration] = {}
        for decl in _from_package() + _from_entry_points():
            if decl.name in out and out[decl.name] != decl:
                raise ConfigError(f"method {decl.name!r} is declared twice ({out[decl.name].module} and {decl.module})")
            out[decl.name] = decl
        _CACHE = out
    return MappingProxyType(_CACHE)


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
