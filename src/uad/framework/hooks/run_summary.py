"""The run summary (Kedro layer): the last lines of every run say what it measured and where its
results went (metrics per class, version folders, the MLflow run and how to open it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from uad.framework.kedro_internals import catalog_dataset, saved_path

from .common import mlflow_run_line

log = logging.getLogger(__name__)


#: the outputs a person looks for after a run, in the order the summary names them
_SUMMARY_OUTPUTS = ("synthesis_spec", "synthesis_preview", "checkpoint", "predictions", "metrics_table", "thresholds", "report_html", "overlays", "curves",
                    "per_class_chart", "infer_results", "infer_maps", "infer_overlays", "onnx_model", "export_spec",
                    "benchmark_table", "benchmark_per_class", "benchmark_heatmap")


class RunSummaryHook:
    """The last lines of every ``kedro run``: per method namespace, the mean metrics and the
    per-class table, the files the run wrote (the version folders themselves), and the MLflow run
    with the command that opens it. A run that ends is a run that says where its results went."""

    def __init__(self) -> None:
        self._catalog = None
        self._saved: list[str] = []
        self._tables: dict[str, Any] = {}
        self._project_path: Path | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project_path = Path(context.project_path)

    @hook_impl
    def after_catalog_created(self, catalog) -> None:
        self._catalog = catalog

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        self._saved, self._tables = [], {}

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        self._saved.append(dataset_name)
        if dataset_name.endswith(".metrics_table"):
            self._tables[dataset_name.rsplit(".", 1)[0]] = data

    def _path(self, name: str) -> str | None:
        try:
            ds = catalog_dataset(self._catalog, name)
        except Exception:  # noqa: BLE001
            return None
        path = saved_path(ds) if ds is not None else None
        if path and self._project_path is not None:
            try:
                rel = str(Path(path).resolve().relative_to(self._project_path.resolve()))
                return rel + ("/" if path.endswith("/") else "")
            except ValueError:
                return path
        return path

    def lines(self) -> list[str]:
        groups: dict[str, list[tuple[str, str]]] = {}
        for name in self._saved:
            ns, _, short = name.rpartition(".")
            key = "checkpoint" if short.startswith("checkpoint_") else short
            if key not in _SUMMARY_OUTPUTS:
                continue
            path = self._path(name)
            if path:
                groups.setdefault(ns or "(project)", []).append((key, path))
        out: list[str] = []
        for ns in sorted(set(groups) | set(self._tables)):
            out.append(f"{ns}:")
            table = self._tables.get(ns)
            if table is not None and len(table):
                out.extend("  " + row for row in _metrics_rows(table))
            for key, path in sorted(groups.get(ns, []), key=lambda kv: _SUMMARY_OUTPUTS.index(kv[0])):
                out.append(f"  {key:<19} {path}")
        run = mlflow_run_line()
        if run:
            out.append(run)
        return out

    @hook_impl(tryfirst=True)  # while kedro-mlflow's run is still open
    def after_pipeline_run(self, run_params: dict[str, Any]) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        try:
            lines = self.lines()
        except Exception as exc:  # noqa: BLE001 - the summary must never fail a finished run
            log.debug("no run summary: %s", exc)
            return
        if lines:
            log.info("results of this run:\n%s", "\n".join(lines))


def _metrics_rows(table: Any) -> list[str]:
    """The per-class metrics table as aligned text rows (3 decimals; NaN as -)."""
    import math

    cols = [c for c in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
            if c in table.columns]
    names = [str(v) for v in table["class_name"]] if "class_name" in table.columns else [str(i) for i in table.index]
    width = max([len("class")] + [len(n) for n in names])
    rows = [f"{'class':<{width}}  " + "  ".join(f"{c:>11}" for c in cols)]
    for name, (_, r) in zip(names, table.iterrows()):
        vals = []
        for c in cols:
            v = r[c]
            vals.append(f"{float(v):11.3f}" if v is not None and not (isinstance(v, float) and math.isnan(v)) else f"{'-':>11}")
        rows.append(f"{name:<{width}}  " + "  ".join(vals))
    return rows
