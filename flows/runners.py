"""Task runner for mapped work (synthesis shards): Dask or Ray when installed, else Prefect's thread pool.

Chosen when a flow runs, not at import, so importing a flow never probes the environment.
"""

from __future__ import annotations

import importlib.util
import os


def shard_task_runner(max_workers: int | None = None):
    """``prefect_dask.DaskTaskRunner`` > ``prefect_ray.RayTaskRunner`` > ``ThreadPoolTaskRunner``.

    Shards run as subprocesses, so threads already give process-level parallelism on one machine; Dask/Ray
    spread them over a cluster. ``ANYFLOW_TASK_RUNNER=thread|dask|ray`` forces a choice.
    """
    want = os.environ.get("ANYFLOW_TASK_RUNNER", "auto")
    if want in ("auto", "dask") and importlib.util.find_spec("prefect_dask"):
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner()
    if want in ("auto", "ray") and importlib.util.find_spec("prefect_ray"):
        from prefect_ray import RayTaskRunner

        return RayTaskRunner()
    if want in ("dask", "ray"):
        raise RuntimeError(f"ANYFLOW_TASK_RUNNER={want}: prefect-{want} is not installed")
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max_workers or os.cpu_count() or 1)
