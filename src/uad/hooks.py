"""Project hooks (Kedro layer): run-level MLflow tags that no node knows on its own."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from uad.kedro_plugins import _norm
from uad.osutil import pid_alive

#: the environment ``kedro run`` uses without ``--env`` (settings.py reads it from here, so the
#: hooks never import the settings back)
DEFAULT_RUN_ENV = "quick"

log = logging.getLogger(__name__)

_RUN_ENV: str | None = None


def pipeline_names(run_params: dict[str, Any]) -> list[str]:
    """The pipelines a run ran (``--pipeline`` / ``--pipelines``; ``__default__`` when none)."""
    names = run_params.get("pipeline_names") or run_params.get("pipeline_name") or ["__default__"]
    return [names] if isinstance(names, str) else list(names)


def block_disabled_plugin_hooks() -> None:
    """Make ``DISABLE_HOOKS_FOR_PLUGINS`` block a plug-in's hook entry points instead of importing
    them and unregistering them afterwards, as Kedro does: kedro-mlflow's hook module imports
    mlflow (about a second here) in every session, tracked or not. Same result (the plug-ins'
    hooks are not registered), without the import. Idempotent; wraps the function in each Kedro
    module that imported it by name."""
    import importlib
    import importlib.metadata

    def blocking(original):
        if getattr(original, "_uad_blocking", False):
            return original

        def register(hook_manager, disabled_plugins):
            disabled = {_norm(n) for n in disabled_plugins}
            for dist in importlib.metadata.distributions():
                if _norm(str(dist.metadata["Name"] or "")) in disabled:
                    for ep in dist.entry_points:
                        if ep.group == "kedro.hooks":
                            hook_manager.set_blocked(ep.name)
            return original(hook_manager, disabled_plugins)

        register._uad_blocking = True  # type: ignore[attr-defined]
        return register

    for module in ("kedro.framework.hooks.manager", "kedro.framework.session.session",
                   "kedro.framework.session.service_session", "kedro.runner.task"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, "_register_hooks_entry_points"):
            mod._register_hooks_entry_points = blocking(mod._register_hooks_entry_points)


def current_run_env() -> str:
    """The Kedro environment of the session running now (the default run env when none was given)."""
    return _RUN_ENV or DEFAULT_RUN_ENV


def git_commit(path: Path) -> str:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def close_dead_runs(client, experiment_id: str, current_run_id: str | None = None) -> list[str]:
    """Runs of ``experiment_id`` still RUNNING whose process (tags ``uad.host`` / ``uad.pid``) no
    longer exists on this host were killed (``kill -9``, power loss): end them as KILLED. A run that
    failed with an exception is ended as FAILED by kedro-mlflow already. Returns the ids closed."""
    closed = []
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200)
    for run in runs:
        tags = run.data.tags
        if run.info.run_id == current_run_id or tags.get("uad.host") != host:
            continue
        try:
            pid = int(tags.get("uad.pid", ""))
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


class RunTagsHook:
    """Tags every MLflow run with the git commit, the Kedro env (the default run env when none was
    given), the pipeline name, and the host and process id that ran it; on the way, runs left
    RUNNING by a killed process on this host are ended as KILLED."""

    def __init__(self) -> None:
        self._project_path: Path | None = None
        self._env: str | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        global _RUN_ENV
        self._project_path = Path(context.project_path)
        self._env = context.env
        _RUN_ENV = context.env or DEFAULT_RUN_ENV

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        mlflow = _mlflow_if_imported()
        if mlflow is None:
            return
        active = mlflow.active_run()
        if active is None:
            return
        env = run_params.get("env") or self._env or DEFAULT_RUN_ENV
        mlflow.set_tags({
            "git_commit": git_commit(self._project_path or Path.cwd()),
            "kedro_env": str(env),
            "pipeline": ",".join(pipeline_names(run_params)),
            "uad.host": socket.gethostname(),
            "uad.pid": str(os.getpid()),
        })
        try:
            closed = close_dead_runs(mlflow.tracking.MlflowClient(), active.info.experiment_id, active.info.run_id)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop a run
            log.warning("could not check for killed MLflow runs: %s", exc)
            return
        if closed:
            log.info("MLflow: %d run(s) left RUNNING by a killed process ended as KILLED: %s", len(closed), closed)


#: the project lock: one ``kedro run`` at a time per project folder (see ProjectLockHook)
LOCK_FILE = ".uad-run.lock"
#: a process started by the holder of the lock (a benchmark's child runs) does not wait for it
LOCK_OWNER_ENV = "UAD_LOCK_OWNER"


class ProjectLockHook:
    """One run at a time in a project folder. Two runs in one project would overwrite each other's
    unversioned files (the ingest tables a later node reads back), interleave versions and race on
    creating ``mlflow.db``; so a second ``kedro run`` waits for the first, saying which run holds
    the project, and starts when it ends. The lock is an OS record lock on ``.uad-run.lock``: it
    dies with its process (no stale lock after a kill), ranks > 0 of ``torchrun`` do not take it
    (rank 0 does), and processes started by the holder (a benchmark's children) share it. A run in
    another project folder never waits."""

    def __init__(self) -> None:
        self._fh = None
        self._project: Path | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project = Path(context.project_path)

    @hook_impl(tryfirst=True)  # before the MLflow store is opened (uad.tracking) and any node runs
    def before_pipeline_run(self) -> None:
        self._release()  # a session of this process that ended early left it (runs here are sequential)
        if int(os.environ.get("RANK", "0")) != 0 or self._project is None:
            return
        fh = open(self._project / LOCK_FILE, "a+")
        holder = _try_lock(fh)
        if holder is not None:
            owner = os.environ.get(LOCK_OWNER_ENV)
            if owner and owner == str(holder.get("pid")):
                fh.close()  # started by the run that holds the project: share its lock
                return
            waited, last = 0.0, -1.0
            while holder is not None:
                if waited - last >= 60 or last < 0:
                    log.warning("waiting for the run that holds this project to finish (pid %s: %s, since %s); two "
                                "runs in one folder would overwrite each other's files. Ctrl-C to stop; a run in "
                                "another project folder does not wait", holder.get("pid", "?"),
                                holder.get("command", "kedro run"), holder.get("since", "?"))
                    last = waited
                time.sleep(1.0)
                waited += 1.0
                holder = _try_lock(fh)
            log.info("the project is free after %.0f s of waiting", waited)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(_argv()),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        fh.flush()
        self._fh = fh
        os.environ[LOCK_OWNER_ENV] = str(os.getpid())

    def _release(self) -> None:
        if self._fh is None:
            return
        import fcntl

        try:
            fcntl.lockf(self._fh, fcntl.LOCK_UN)
        finally:
            self._fh.close()
            self._fh = None
            if os.environ.get(LOCK_OWNER_ENV) == str(os.getpid()):
                os.environ.pop(LOCK_OWNER_ENV, None)

    @hook_impl(trylast=True)  # after the other hooks closed the run
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl(trylast=True)
    def on_pipeline_error(self) -> None:
        self._release()


def _argv() -> list[str]:
    import sys

    args = list(sys.argv)
    if args and args[0].endswith(("kedro", "__main__.py")):
        args[0] = "kedro"
    return args[:8]


def _try_lock(fh) -> dict | None:
    """Take the lock without waiting: None when taken, else what the holder wrote."""
    import fcntl

    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError:
        fh.seek(0)
        try:
            return json.loads(fh.read() or "{}")
        except ValueError:
            return {}


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
        _log_metric(f"node_seconds/{node.name}", seconds)

    @hook_impl(tryfirst=True)  # before kedro-mlflow ends the MLflow run
    def after_pipeline_run(self, run_params: dict[str, Any]) -> None:
        if not self._times:
            return
        total = time.perf_counter() - self._run_start
        _log_metric("node_seconds/total", total)
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


#: the outputs a person looks for after a run, in the order the summary names them
_SUMMARY_OUTPUTS = ("synthesis_spec", "synthesis_preview", "checkpoint", "predictions", "metrics_table", "thresholds", "report_html", "overlays", "curves",
                    "per_class_chart", "infer_results", "infer_maps", "infer_overlays", "onnx_model", "export_spec",
                    "benchmark_table", "benchmark_per_class", "benchmark_heatmap")


def _saved_path(dataset: Any) -> str | None:
    """Where a catalog dataset wrote its last save: the version folder of a versioned dataset
    (``<file>/<version>/``), the file otherwise (None when it has no file: MLflow tags, metrics)."""
    version = getattr(dataset, "_saved_version", None)
    path = getattr(dataset, "_filepath", None)
    if version and path:
        return f"{path}/{version}/"
    inner = getattr(dataset, "_dataset", None) or getattr(dataset, "dataset", None)
    for obj in (dataset, inner):
        path = getattr(obj, "_filepath", None)
        if path:
            return str(path)
    return None


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
            ds = self._catalog.get(name) if hasattr(self._catalog, "get") else self._catalog._get_dataset(name)
        except Exception:  # noqa: BLE001
            return None
        path = _saved_path(ds) if ds is not None else None
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
        run = _mlflow_run_line()
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


def _mlflow_if_imported():
    """mlflow when something imported it (the tracking hook does, for a tracked run), else None:
    never imported, it can have no active run, and these hooks must not pay its import."""
    return sys.modules.get("mlflow")


def _mlflow_run_line() -> str | None:
    mlflow = _mlflow_if_imported()
    if mlflow is None:
        return None
    run = mlflow.active_run()
    if run is None:
        return None
    uri = mlflow.get_tracking_uri()
    exp, rid = run.info.experiment_id, run.info.run_id
    if uri.startswith(("http://", "https://")):
        return f"MLflow run {rid}: {uri.rstrip('/')}/#/experiments/{exp}/runs/{rid}"
    return (f"MLflow run {rid} (experiment {exp}, store {uri}): open it with  mlflow ui --backend-store-uri {uri}  "
            f"then http://127.0.0.1:5000/#/experiments/{exp}/runs/{rid}")


def _log_metric(key: str, value: float) -> None:
    try:
        mlflow = _mlflow_if_imported()
        if mlflow is not None and mlflow.active_run() is not None:
            mlflow.log_metric(key, float(value))
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop a run
        log.debug("could not log %s to MLflow: %s", key, exc)
