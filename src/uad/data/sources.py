"""Where a run's data comes from, read from its ``data`` parameters alone (pure Python: nothing is
scanned, nothing heavy imported). Shared by ingestion, the training orchestration, tracking and the
benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uad.errors import DatasetRootError

__all__ = ["sources", "train_sources", "source_name", "dataset_name"]


def sources(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """``data.<key>``: one source dict or a list (super-multi-class: several datasets at once)."""
    src = data.get(key)
    if src is None:
        return []
    return [dict(s) for s in (src if isinstance(src, list) else [src])]


def train_sources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The training sources: ``data.root`` (the user's own dataset, from ``UAD_DATA_ROOT`` or
    ``--params="data.root=/path"``) when set, read with ``data.layout``; else ``data.train``."""
    root = data.get("root")
    if root:
        root = str(Path(str(root)).expanduser())
        if not Path(root).is_dir():
            raise DatasetRootError(f"data.root {root} is not a folder: set UAD_DATA_ROOT (or --params=\"data.root=...\") "
                                   "to a dataset in the MVTec layout (<root>/<class>/train/good/*.png ...)")
        return [{"name": data.get("name") or Path(root).name, "root": root, "layout": data.get("layout") or "auto"}]
    return sources(data, "train")


def source_name(source: dict[str, Any]) -> str:
    """A source's dataset name: its ``name``, else its root folder's name."""
    return str(source.get("name") or Path(str(source.get("root", ""))).name)


def dataset_name(data: dict[str, Any] | None) -> str:
    """The training data's name from the parameters alone: its sources' names joined with ``+``
    (``synthetic``, ``mvtec+visa``); ``dataset`` when none resolves."""
    try:
        names = [source_name(s) for s in train_sources(data or {})]
    except Exception:  # noqa: BLE001 - a name must never fail a run (ingest reports bad roots itself)
        names = []
    return "+".join(str(n) for n in names if n) or "dataset"
