"""Rank-zero writes (Kedro layer): under ``torchrun`` only rank 0 writes the catalog's datasets."""

from __future__ import annotations

import logging
import os
from typing import Any

from kedro.framework.hooks import hook_impl

log = logging.getLogger(__name__)


class RankZeroWritesHook:
    """In a data-parallel run started by ``torchrun`` every rank runs the pipeline; only rank 0
    writes. On the other ranks the catalog keeps what nodes save in memory (later nodes of the
    same rank load it from there) and never writes a dataset; their MLflow tracking goes to a
    private temporary store (set by :mod:`uad.cli` before the session starts)."""

    @hook_impl
    def after_catalog_created(self, catalog) -> None:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        kept: dict[str, Any] = {}
        load = catalog.load

        def save(name: str, data: Any, *args: Any, **kwargs: Any) -> None:
            kept[name] = data

        def load_kept(name: str, *args: Any, **kwargs: Any) -> Any:
            return kept[name] if name in kept else load(name, *args, **kwargs)

        catalog.save = save
        catalog.load = load_kept
        log.info("rank %d: catalog writes stay in memory (rank 0 writes)", rank)
