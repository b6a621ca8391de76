"""The project lock (Kedro layer): one ``kedro run`` at a time per project folder."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from kedro.framework.hooks import hook_impl

log = logging.getLogger(__name__)


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

    @hook_impl(tryfirst=True)  # before the MLflow store is opened (uad.framework.hooks.tracking) and any node runs
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
