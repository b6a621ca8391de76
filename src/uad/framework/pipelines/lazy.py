"""Node functions resolved when a node runs, not when its pipeline is built.

Registering the project's pipelines must not import torch, timm or any method: ``kedro registry
list``, ``--help`` and the ingest pipeline would otherwise pay for them before their first line.
``named("uad.framework.pipelines.method.nodes:train_stage", "train", method_name="rlr")`` is a node function
that imports ``train_stage`` on its first call and passes the bound keyword arguments through.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable


@functools.lru_cache(maxsize=None)
def resolve(target: str) -> Callable:
    """``"package.module:function"`` -> the function (imported once)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def named(target: str | Callable, name: str, **bound: Any) -> Callable:
    """A node function called ``name`` running ``target`` (a function or its ``"module:attr"``
    path, imported on first call) with ``bound`` keyword arguments added. Kedro calls node
    functions with keyword arguments (every node here takes a dict of inputs)."""

    def wrapper(**kwargs):
        fn = resolve(target) if isinstance(target, str) else target
        return fn(**bound, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = f"Runs {target if isinstance(target, str) else target.__qualname__} (bound: {bound or 'none'})."
    return wrapper
