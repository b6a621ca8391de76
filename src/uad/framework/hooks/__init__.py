"""The project's Kedro hooks, one module each (Kedro layer); ``settings.HOOKS`` registers them.

| module | hook | what it does |
| --- | --- | --- |
| ``lazy_tracking`` | ``LazyTrackingHook`` | imports ``tracking.TrackingHook`` (kedro-mlflow's hook) for tracked runs only |
| ``tracking`` | ``TrackingHook`` | readable run names, one experiment per dataset, aligned parameters |
| ``params_check`` | ``ParamsCheckHook`` | engine and method settings checked before the first node runs |
| ``project_lock`` | ``ProjectLockHook`` | one ``kedro run`` at a time per project folder |
| ``run_tags`` | ``RunTagsHook`` | git commit, env, pipeline, host, pid; killed runs ended as KILLED |
| ``rank_zero_writes`` | ``RankZeroWritesHook`` | under ``torchrun`` only rank 0 writes the catalog |
| ``run_summary`` | ``RunSummaryHook`` | the run's last lines: metrics, files written, the MLflow run |
| ``node_times`` | ``NodeTimesHook`` | every node's wall time |
"""

from .common import DEFAULT_RUN_ENV, current_run_env, git_commit, pipeline_names
from .lazy_tracking import LazyTrackingHook
from .node_times import NodeTimesHook
from .params_check import ParamsCheckHook
from .project_lock import LOCK_FILE, LOCK_OWNER_ENV, ProjectLockHook
from .rank_zero_writes import RankZeroWritesHook
from .run_summary import RunSummaryHook
from .run_tags import RunTagsHook, close_dead_runs

__all__ = ["DEFAULT_RUN_ENV", "LOCK_FILE", "LOCK_OWNER_ENV", "LazyTrackingHook", "NodeTimesHook", "ParamsCheckHook", "ProjectLockHook",
           "RankZeroWritesHook", "RunSummaryHook", "RunTagsHook", "close_dead_runs", "current_run_env", "git_commit",
           "pipeline_names"]
