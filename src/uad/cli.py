"""Kedro's entry point to the project's commands (Kedro loads ``<package>.cli:cli``); they live in
:mod:`uad.framework.cli`."""

from uad.framework.cli import cli, run

__all__ = ["cli", "run"]
