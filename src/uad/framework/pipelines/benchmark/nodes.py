"""The papers' main table in one command: ``kedro run --pipeline=benchmark``.

Every (method, setting, seed) of ``params:benchmark`` is trained and evaluated by its own
``kedro run --pipeline=<method>`` in a child process, as a child MLflow run of this run (tag
``mlflow.parentRunId``, same experiment, same store). A child that finished before with the same
key (method, setting, seed, environment, the parameters it runs with, the code's commit) is not
run again: its MLflow run is read back, so an interrupted benchmark resumes where it stopped.
A child runs with this run's parameters (its ``--params`` included: e.g.
``--params=dinomaly.method.iterations=8`` reaches the Dinomaly child), handed over as a Kedro run
config file (``--config``) beside the child's log.
The comparison (mean and per-class metrics side by side, training time and scoring rate) is
written as two CSV tables and a heat map of classes x methods, logged to this run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from uad.errors import ConfigError, UadError
from uad.osutil import atomic_write_bytes
from uad.params import cli_list
from uad.data.sources import dataset_name
from uad.methods.declaration import base_methods, plugin_namespace, plugins, split_namespace

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
           # beside them (uad.metrics.mvtec_ad2): SegF1 at the validation threshold, AU-PRO to 0.05, AUPIMO
           "pixel_segf1", "pixel_aupro_005", "pixel_aupimo")


def known_methods() -> list[str]:
    """What a benchmark can run: every declared method and every plug-in pairing (``costfilter_<base>``)."""
    return base_methods() + [plugin_namespace(p, b) for p, bases in plugins().items() for b in bases]

#: a child run is found again by this tag
KEY_TAG = "uad.benchmark_key"


def plan_children(benchmark: dict[str, Any], parameters: dict[str, Any], env: str, commit: str) -> list[dict[str, Any]]:
    """The children of a benchmark: one per method x setting x seed, each with its key."""
    methods = (cli_list(benchmark.get("methods")) or [])
    if not methods:
        raise ConfigError(f"benchmark.methods: {benchmark.get('methods')!r} names no method; "
                          f"e.g. --params=\"benchmark.methods=patchcore+dinomaly\" (known: {', '.join(known_methods())})")
    for m in methods:
        if m not in known_methods():
            raise ConfigError(f"benchmark.methods: {m!r} is not a method; use one of {', '.join(known_methods())}")
    settings = cli_list(benchmark.get("settings")) or ["multi_class"]
    seeds = cli_list(benchmark.get("seeds")) or [int((parameters.get("engine") or {}).get("seed", 1))]
    children = []
    for method in methods:
        for setting in settings:
            overrides = {"setting": setting} if isinstance(setting, str) else dict(setting)
            if "setting" not in overrides:
                raise ConfigError(f"benchmark.settings: {setting!r} names no setting; write multi_class or "
                                  "{setting: few_shot, shots: 4}")
            for seed in seeds:
                try:
                    seed = int(seed)
                except (TypeError, ValueError):
                    raise ConfigError(f"benchmark.seeds: {seed!r} is not an integer; e.g. [1, 2, 3]") from None
                children.append(_child(method, overrides, seed, parameters, env, commit))
    return children


def _child(method: str, overrides: dict[str, Any], seed: int, parameters: dict[str, Any], env: str,
           commit: str) -> dict[str, Any]:
    # what the child runs with, and what its key says: the parent's merged blocks (its own --params
    # included; a plug-in's base block too), the setting's data overrides and the seed, handed over
    # as a run config file
    _, base = split_namespace(method)
    forwarded: dict[str, Any] = {method: parameters.get(method) or {}}
    if base is not None:
        forwarded[base] = parameters.get(base) or {}
    forwarded.update({"data": {**(parameters.get("data") or {}), **overrides},
                      "engine": {**(parameters.get("engine") or {}), "seed": seed}})
    if parameters.get("synthesis") is not None:
        forwarded["synthesis"] = parameters["synthesis"]
    fingerprint = {"method": method, "overrides": overrides, "seed": seed, "env": env, "commit": commit,
                   "params": forwarded}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    label = f"{method} {overrides['setting']}" + "".join(f" {k}={v}" for k, v in overrides.items() if k != "setting") \
        + f" seed {seed}"
    cli = [f"data.{k}={v}" for k, v in overrides.items()] + [f"engine.seed={seed}"]
    return {"method": method, "setting": overrides["setting"], "overrides": overrides, "seed": seed, "key": key,
            "label": label, "params": ",".join(cli), "forwarded": forwarded}


def _kedro() -> list[str]:
    exe = Path(sys.executable).parent / "kedro"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kedro"]


def _finished(client, experiment_ids: list[str], key: str):
    runs = client.search_runs(experiment_ids, filter_string=f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _run_child(child: dict[str, Any], env: str, project: Path, parent_id: str | None, experiment: str | None,
               log_dir: Path) -> tuple[int, Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    config = log_dir / f"{child['method']}-{child['key']}.run.yml"
    atomic_write_bytes(config, yaml.safe_dump({"run": {"params": child["forwarded"]}}, sort_keys=True).encode())
    cmd = [*_kedro(), "run", f"--pipeline={child['method']}", f"--env={env}", f"--config={config}"]
    child_env = {**os.environ, "UAD_BENCHMARK_KEY": child["key"]}
    if parent_id:
        import mlflow

        child_env.update({"UAD_PARENT_RUN_ID": parent_id, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()})
        if experiment:
            child_env["MLFLOW_EXPERIMENT_NAME"] = experiment
    out = log_dir / f"{child['method']}-{child['key']}.log"
    with open(out, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, cwd=project, env=child_env, stdout=fh, stderr=subprocess.STDOUT).returncode
    return code, out


def _rows(child: dict[str, Any], run, reused: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    m = run.data.metrics
    ns = child["method"]
    train_s = sum(v for k, v in m.items() if k.startswith(f"node_seconds/{ns}.train") or k == f"node_seconds/{ns}.extract_features")
    long = []
    for key, value in m.items():
        cls, _, metric = key.rpartition("/")
        if metric in METRICS and (cls == "" or "/" not in cls) and cls not in ("base", "gain", "full_frame"):
            long.append({"method": ns, "setting": child["setting"], "seed": child["seed"], "class_name": cls or "mean",
                         "metric": metric, "value": float(value)})
    summary = {"method": ns, "setting": child["setting"], "seed": child["seed"],
               **{k: m.get(k, np.nan) for k in METRICS},
               "train_seconds": round(train_s, 2), "scoring_img_per_s": m.get("scoring_img_per_s", np.nan),
               "run_id": run.info.run_id, "reused": reused}
    return long, summary


def run_benchmark(benchmark: dict[str, Any], parameters: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, bytes, dict]:
    """Train and evaluate every child (or reuse its finished run); returns the per-class long
    table, the summary (one row per child), the heat map PNG and the parent's tags."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from uad.framework.hooks.common import current_run_env, git_commit

    env = str(benchmark.get("env") or current_run_env())
    project = Path.cwd()
    children = plan_children(benchmark, parameters, env, git_commit(project))
    parent = mlflow.active_run()
    client = MlflowClient() if parent is not None else None
    experiment = client.get_experiment(parent.info.experiment_id).name if parent is not None else None
    log_dir = project / "data" / "08_reporting" / "benchmark" / "logs"
    long_rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    failed: list[str] = []
    errors: list[str] = []  # each failed child's own Error line
    t_all = time.perf_counter()
    for i, child in enumerate(children, 1):
        head = f"benchmark {i}/{len(children)}: {child['label']}"
        run = _finished(client, [parent.info.experiment_id], child["key"]) if client is not None else None
        if run is not None:
            log.info("%s: finished before (MLflow run %s), not run again", head, run.info.run_id)
            reused = True
        else:
            log.info("%s: kedro run --pipeline=%s --env=%s --config=%s (%s and this run's parameters; its log: %s)",
                     head, child["method"], env, log_dir / f"{child['method']}-{child['key']}.run.yml", child["params"],
                     log_dir / f"{child['method']}-{child['key']}.log")
            t0 = time.perf_counter()
            code, out = _run_child(child, env, project, parent.info.run_id if parent else None, experiment, log_dir)
            if code != 0:
                lines = out.read_text(errors="replace").strip().splitlines()
                log.error("%s failed (exit %d) after %.0f s; its log: %s\n  %s", head, code, time.perf_counter() - t0, out,
                          "\n  ".join(lines[-3:]))
                failed.append(child["label"])
                errors.append(next((ln.strip() for ln in reversed(lines) if ln.strip().startswith("Error: ")), ""))
                continue
            run = _finished(client, [parent.info.experiment_id], child["key"]) if client is not None else None
            log.info("%s: done in %.0f s", head, time.perf_counter() - t0)
            reused = False
        if run is None:  # tracking is off: the child ran, but there is no run to read its figures from
            failed.append(child["label"] + " (no MLflow run to read)")
            continue
        rows, summary = _rows(child, run, reused)
        long_rows += rows
        summaries.append(summary)
    long = pd.DataFrame(long_rows, columns=["method", "setting", "seed", "class_name", "metric", "value"])
    table = pd.DataFrame(summaries)
    if table.empty:  # the project's own error (one line): the first child's own Error line, and where the logs are
        first = next((e[len("Error: "):] for e in errors if e), "")
        raise UadError(f"benchmark: no child finished ({failed[0] if failed else 'none ran'}: "
                       f"{first or 'see its log'}); the logs are under {log_dir}")
    _log_parent_dataset(client, table, long)
    png = _heatmap_png(long, f"{dataset_name(parameters.get('data'))} · {env} · per class and mean")
    _log_parent_metrics(table)
    log.info("benchmark: %d child run(s) (%d reused) in %.0f s%s\n%s", len(table), int(table["reused"].sum()),
             time.perf_counter() - t_all, f"; FAILED: {', '.join(failed)}" if failed else "",
             table.drop(columns=["run_id"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    tags = {"benchmark_children": str(len(children)), "benchmark_failed": str(len(failed)),
            "benchmark_methods": ",".join(dict.fromkeys(c["method"] for c in children)),
            "benchmark_data": dataset_name(parameters.get("data"))}
    if failed:
        log.warning("benchmark: %d child run(s) failed; rerun the same command to retry only those", len(failed))
    return long, table, png, tags


def _log_parent_dataset(client, table: pd.DataFrame, long: pd.DataFrame) -> None:
    """The children's training data as the parent's dataset input too (the runs table's Dataset
    column shows it on the collapsed parent row)."""
    import mlflow

    if client is None or mlflow.active_run() is None:
        return
    try:
        inputs = client.get_run(str(table["run_id"].iloc[0])).inputs.dataset_inputs
        if not inputs:
            return
        ds = inputs[0].dataset
        source = json.loads(ds.source).get("uri") if ds.source_type == "local" else None
        with warnings.catch_warnings():  # MLflow's schema hint about integer columns: not a model schema here
            warnings.simplefilter("ignore", UserWarning)
            data = mlflow.data.from_pandas(long, source=source, name=ds.name, digest=ds.digest)
        mlflow.log_input(data, context="benchmark")
    except Exception as exc:  # noqa: BLE001 - presentation only
        log.debug("no dataset input on the benchmark run: %s", exc)


def _heatmap_png(long: pd.DataFrame, title: str) -> bytes:
    from uad.metrics.plots import benchmark_heatmap, figure_to_png_bytes

    return figure_to_png_bytes(benchmark_heatmap(long, title=title), dpi=110)


def _log_parent_metrics(table: pd.DataFrame) -> None:
    """Each child's mean metrics on the parent as ``<method>/<metric>`` (mean over seeds)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    out = {}
    for (method, setting), rows in table.groupby(["method", "setting"]):
        prefix = method if setting == "multi_class" else f"{method}/{setting}"
        for metric in (*METRICS, "train_seconds", "scoring_img_per_s"):
            vals = pd.to_numeric(rows[metric], errors="coerce").dropna()
            if len(vals):
                out[f"{prefix}/{metric}"] = float(vals.mean())
    if out:
        mlflow.log_metrics(out)
