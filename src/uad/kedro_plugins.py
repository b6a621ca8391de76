"""Kedro CLI start-up (Kedro layer): a plug-in's commands imported when one is called.

Kedro imports every installed plug-in's command group for every command run inside a project.
kedro-mlflow's CLI module imports mlflow at its top (about a second on a small machine), so
``kedro registry list`` or ``kedro run --pipeline=ingest`` would pay for it without any MLflow
command. :func:`init` is this package's ``kedro.init`` entry point (Kedro calls it before it
builds its CLI): the command groups of the plug-ins in :data:`LAZY_COMMANDS` become
:class:`LazyPluginCommands`, which name their commands without importing the plug-in and import
it when one of them is looked up (to run it, or to print ``kedro --help``). Every other plug-in
loads as Kedro loads it.
"""

from __future__ import annotations

from typing import Any

import click

#: distribution (normalised) -> the top-level commands its ``kedro.project_commands`` group adds
LAZY_COMMANDS = {"kedro_mlflow": ("mlflow",)}


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


class LazyPluginCommands(click.Group):
    """A plug-in's command group, standing in for it until one of its commands is looked up."""

    def __init__(self, entry_point: Any, commands: tuple[str, ...]):
        super().__init__(name=entry_point.name)
        self._entry_point = entry_point
        self._names = tuple(commands)
        self._group: click.Group | None = None
        self._loaded = False

    def _load(self) -> click.Group | None:
        if not self._loaded:
            from kedro.framework.cli.utils import _safe_load_entry_point

            self._group = _safe_load_entry_point(self._entry_point)  # logs and skips a broken plug-in, as Kedro does
            self._loaded = True
        return self._group

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self._names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._names:
            return None
        group = self._load()
        return None if group is None else group.get_command(ctx, cmd_name)


def init() -> None:
    """``kedro.init`` entry point: wrap Kedro's loader of project commands (idempotent)."""
    from kedro.framework.cli import cli as kedro_cli
    from kedro.framework.cli import utils

    original = kedro_cli.load_entry_points
    if getattr(original, "_uad_lazy", False):
        return

    def load_entry_points(name: str):
        if name != "project":
            return original(name)
        groups = []
        for ep in utils._get_entry_points(name):
            dist = _norm(ep.dist.name) if getattr(ep, "dist", None) is not None else ""
            if dist in LAZY_COMMANDS:
                groups.append(LazyPluginCommands(ep, LAZY_COMMANDS[dist]))
                continue
            loaded = utils._safe_load_entry_point(ep)
            if loaded:
                groups.append(loaded)
        return groups

    load_entry_points._uad_lazy = True  # type: ignore[attr-defined]
    kedro_cli.load_entry_points = load_entry_points
