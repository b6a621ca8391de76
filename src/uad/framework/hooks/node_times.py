"""Node times (Kedro layer): every node's wall time, logged, tabled and written to node_times.json."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from .common import log_metric, pipeline_names

log = logging.getLogger(__name__)


class NodeTimesHook:
    """The wall time of every node: logged when the node ends, as a table (slowest first) when the
    run ends, as MLflow metrics ``node_seconds/<node>`` and ``node_seconds/total`` of the active
    run, and written to ``data/08_reporting/node_times.json`` (atomically). What a user reads to
    see where a run's minutes went."""

    def __init__(self) -> None:
        self._start: dict[str, float] = {}
        self._times: dict[str, float] = {}
        self._run_start = 0.0
        self._project_path: Path | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project_path = Path(context.project_path)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        self._start, self._times = {}, {}
        self._run_start = time.perf_counter()

    @hook_impl
    def before_node_run(self, node) -> None:
        self._start[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node) -> None:
        t0 = self._start.pop(node.name, None)
        if t0 is None:
            return
        seconds = time.perf_counter() - t0
        self._times[node.name] = seconds
        log.info("node %s took %.1f s", node.name, seconds)
        log_metric(f"node_seconds/{node.name}", seconds)

    @hook_impl(tryfirst=True)  # before kedro-mlflow ends the MLflow run
    def after_pipeline_run(self, run_params: dict[str, Any]) -> None:
        if not self._times:
            return
        total = time.perf_counter() - self._run_start
        log_metric("node_seconds/total", total)
        width = max(len(n) for n in self._times)
        lines = [f"{n:<{width}}  {s:8.1f} s" for n, s in sorted(self._times.items(), key=lambda kv: -kv[1])]
        log.info("wall time per node (slowest first), %.1f s in all:\n%s", total, "\n".join(lines))
        if int(os.environ.get("RANK", "0")) != 0:
            return
        out = (self._project_path or Path.cwd()) / "data" / "08_reporting" / "node_times.json"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"pipeline": ",".join(pipeline_names(run_params)),
                                       "env": run_params.get("env"), "total_seconds": round(total, 3),
                                       "nodes": {n: round(s, 3) for n, s in self._times.items()}}, indent=1))
            tmp.replace(out)
        except OSError as exc:  # reporting must never fail a finished run
            log.warning("could not write %s: %s", out, exc)
