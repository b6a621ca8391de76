"""Parameter values checked against the dataclass that reads them (core: no Kedro, no MLflow).

Every config the project builds from parameters (the engine's, each method's) names its fields
with type hints; :func:`check_types` compares each given value with its field's hint and raises one
:class:`~uad.errors.ConfigError` ``<key>: <value> is not <expected>; <fix>`` for the first value of
the wrong kind, so ``--params="engine.batch_size=abc"`` fails before anything runs, in one line.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from uad.errors import ConfigError

#: a run-tags entry ``"param:<key>"`` is a parameter of the run (the Kedro layer logs it to MLflow as ``<key>``)
PARAM_PREFIX = "param:"

_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a text value"}


def _accepts(hint: Any, value: Any) -> tuple[bool, str]:
    """Whether ``value`` fits ``hint`` and how the expected kind reads; unknown hints accept all."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is None or isinstance(hint, typing.TypeVar):
        return True, ""
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        ok_words = [_accepts(a, value) for a in args if a is not type(None)]
        if value is None and type(None) in args:
            return True, ""
        words = " or ".join(w for _, w in ok_words if w) + (" (or null)" if type(None) in args else "")
        return any(ok for ok, _ in ok_words), words
    if origin in (list, tuple) or hint in (list, tuple) or origin is typing.Sequence:
        return isinstance(value, (list, tuple, str)), "a list"  # a string is the command line's a+b form
    if origin is typing.Literal:
        return value in args, "one of " + ", ".join(repr(a) for a in args)
    if hint is bool:
        return isinstance(value, bool), _WORDS[bool]
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), _WORDS[int]
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), _WORDS[float]
    if hint is str:
        return isinstance(value, str), _WORDS[str]
    return True, ""


def cli_list(value: Any) -> list | None:
    """A list parameter as a list. On the command line Kedro splits ``--params`` on commas, so a
    list is written with ``+`` (``data.classes=fabric+pcb``, ``layers=2+3``); a single value
    becomes a one-element list; None stays None."""
    import re

    if value is None:
        return None
    if isinstance(value, str):
        return [v for v in re.split(r"[+\s;]+", value.strip()) if v]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def check_types(config_class: type, params: Mapping[str, Any], prefix: str) -> None:
    """Raise ``ConfigError("<prefix>.<key>: <value> is not <kind>; ...")`` for the first given value
    whose kind does not fit its dataclass field's type hint."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # noqa: BLE001 - a hint we cannot resolve is not the user's problem
        return
    names = {f.name for f in dataclasses.fields(config_class)}
    for key, value in params.items():
        if key not in names or key not in hints:
            continue
        ok, words = _accepts(hints[key], value)
        if not ok:
            raise ConfigError(f"{prefix}.{key}: {value!r} is not {words}; set it in conf/<env>/parameters*.yml "
                              f"or with --params=\"{prefix}.{key}=<value>\"")


def check_range(prefix: str, key: str, value: Any, low: float | None = None, allow_none: bool = False) -> None:
    """``<prefix>.<key>: <value> is not >= <low>`` as one ConfigError (None allowed when asked)."""
    if value is None and allow_none:
        return
    if value is None or (low is not None and value < low):
        raise ConfigError(f"{prefix}.{key}: {value!r} is not {'>= ' + str(low) if low is not None else 'set'}"
                          f"{' (or null)' if allow_none else ''}; set it in conf/<env>/parameters*.yml or with "
                          f"--params=\"{prefix}.{key}=<value>\"")
