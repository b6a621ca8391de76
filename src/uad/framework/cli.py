"""Project command line (Kedro layer): Kedro's own ``kedro run``, with two differences.

* ``--pipeline=<name>`` is accepted without Kedro's deprecation warning (it is this project's
  documented spelling; it means exactly ``--pipelines=<name>``).
* An error raised by the project's own checks (:class:`uad.errors.UadError`: bad data, settings,
  weights, checkpoints) is printed as ``Error: <what, where, what to do>`` (one line, or the list
  of problems / fixes the message holds), with exit status 1 and no traceback; anything else (a
  bug) keeps Kedro's full traceback.

Kedro loads ``<package>.cli:cli`` and lets its commands override the built-in ones.
"""

from __future__ import annotations

import logging
import warnings

import click
from kedro import KedroDeprecationWarning
from kedro.framework.cli.project import run as _kedro_run

from uad.errors import UadError


@click.group(name="uad")
def cli() -> None:
    """Commands of the uad project."""


def _missing_version(exc: BaseException) -> UadError | None:
    """Kedro's "Did not find any versions for ..." (a pipeline that reads what no run wrote yet:
    ``infer`` or ``export`` before training) as one line saying which run to do first."""
    import re

    text = str(exc)
    if "Did not find any versions for" not in text:
        return None
    found = re.search(r"filepath=([^,)]+)", text)
    path = found.group(1).strip().strip("'\"") if found else "the catalog"
    parts = path.replace("\\", "/").split("/")
    ns = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p in ("06_models", "07_model_output", "08_reporting")), None)
    spec = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "05_model_input"), None)
    if spec is not None and parts[-1] == "synthesis_spec.json":
        return UadError(f"no synthesis spec for {spec} yet ({path}): run the whole pipeline once "
                        f"(kedro run --pipeline={spec}, with the same --env), then this command again")
    if ns is None:
        return UadError(f"nothing saved yet at {path}: run the pipeline that writes it first")
    return UadError(f"no trained {ns} model in {'/'.join(parts[:-1])}: run kedro run --pipeline={ns} first "
                    f"(with the same --env), then this command again")


#: the catalog's tables ingest writes (``data/02_intermediate``), read by pipelines that do not run it
INGEST_OUTPUTS = ("train_index", "validation_index", "test_index", "unlabelled_index", "dataset_report")


def _missing_file(exc: BaseException) -> UadError | None:
    """Kedro's "<dataset>: Failed while loading data from dataset ..." over a missing file (a
    pipeline that reads what no run wrote yet: ``submission`` before ingest, the method's run or
    the data) as one line naming the file and the run that writes it."""
    import re

    text = str(exc)
    if "Failed while loading data from dataset" not in text or "No such file or directory" not in text:
        return None
    name = re.match(r"\s*([\w.]+): Failed while loading", text)
    ds = name.group(1) if name else "an input"
    found = re.search(r"filepath=['\"]?([^,)'\"]+)", text)
    path = found.group(1) if found else "its file"
    if ds.split(".")[-1] in INGEST_OUTPUTS:
        return UadError(f"{ds}: {path} does not exist yet: run kedro run --pipeline=ingest (or the method's whole "
                        f"pipeline, which starts with it) with the same --env and UAD_DATA_ROOT, then this command again")
    return UadError(f"{ds}: {path} does not exist yet: run the pipeline that writes it first (with the same --env)")


def _memory_input_missing(exc: BaseException) -> UadError | None:
    """Kedro's "Pipeline input(s) {...} not found" for a ``--from-nodes`` / ``--to-outputs`` run that
    starts after a node whose output is never saved (a plug-in's composed parameters) as one line."""
    import re

    found = re.search(r"Pipeline input\(s\) \{(.+?)\} not found", str(exc))
    if found is None:
        return None
    names = [n.strip().strip("'\"") for n in found.group(1).split(",")]
    ns = names[0].split(".")[0] if "." in names[0] else None
    first = f"--from-nodes={ns}.compose_params" if ns and any(n.endswith(".method_params") for n in names) else None
    return UadError(f"this run starts after the node that makes {', '.join(names)}, which is kept in memory, not "
                    f"saved: start from that node ({first or 'an earlier --from-nodes'}) or run the whole pipeline")


def _user_error(exc: BaseException) -> UadError | None:
    """The project's own error behind ``exc`` (possibly wrapped by Kedro or a library), if any;
    a known library failure (a dataset with no saved version) becomes one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UadError):
            return exc
        known = _missing_version(exc) or _memory_input_missing(exc) or _missing_file(exc)
        if known is not None:
            return known
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class _NoTraceback(logging.Filter):
    """Drops the traceback Kedro's runner logs for a project error (the message stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _user_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def _join_torchrun() -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group before the session starts,
    and send the MLflow tracking of ranks other than 0 to a private temporary store (rank 0's run
    is the run; the others only train and score their shards)."""
    import os
    import tempfile

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from uad.engine import distributed

    distributed.init_from_env()
    if int(os.environ.get("RANK", "0")) > 0:
        store = tempfile.mkdtemp(prefix=f"uad-rank{os.environ['RANK']}-mlflow-")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"


@cli.command(name="run", params=list(_kedro_run.params), help=_kedro_run.help,
             context_settings=_kedro_run.context_settings)
def run(**kwargs):
    _join_torchrun()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Option '--pipeline' is deprecated", category=KedroDeprecationWarning)
        flt = _NoTraceback()
        loggers = [logging.getLogger(n) for n in ("kedro", "kedro.runner", "kedro.framework.session")]
        for lg in loggers:
            lg.addFilter(flt)
        try:
            return _kedro_run.callback(**kwargs)
        except Exception as exc:  # noqa: BLE001 - only the project's own errors are shortened
            err = _user_error(exc)
            if err is None:
                raise
            # the whole message: a list of problems, or the ways to fix missing weights, stays intact
            click.secho(f"Error: {err}", fg="red", err=True)
            raise SystemExit(1) from None
        finally:
            for lg in loggers:
                lg.removeFilter(flt)


# kedro review: the review station (its module imports nothing heavy until the command runs)
from uad.framework.review.command import review  # noqa: E402

cli.add_command(review)
