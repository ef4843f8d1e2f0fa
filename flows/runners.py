"""Task runner for mapped work (synthesis shards): Dask, Ray or Prefect's thread pool.

Chosen when a flow runs, not at import, so importing a flow never probes the environment. Configured through the
environment, so a work pool's ``job_variables.env`` selects it per deployment (``deploy/prefect.yaml``):

- ``ANYFLOW_TASK_RUNNER=auto|thread|dask|ray`` (default ``auto``);
- ``ANYFLOW_DASK_ADDRESS``: a running Dask scheduler (``tcp://host:8786``) to map the shards over;
- ``ANYFLOW_DASK_WORKERS``: worker processes of the local cluster started when no address is given
  (default: ``min(number of shards, CPU count)``).
"""

from __future__ import annotations

import importlib.util
import os


def dask_task_runner(n_workers: int | None = None, address: str | None = None, **cluster_kwargs):
    """``prefect_dask.DaskTaskRunner`` on the scheduler at ``address`` (default ``$ANYFLOW_DASK_ADDRESS``), else on a
    ``distributed.LocalCluster`` that lives for the flow run: ``n_workers`` worker *processes* with one thread each
    (a shard is a subprocess with its own threads), bound to 127.0.0.1, no dashboard. ``cluster_kwargs`` override
    those LocalCluster settings."""
    from prefect_dask import DaskTaskRunner

    address = address or os.environ.get("ANYFLOW_DASK_ADDRESS") or None
    if address:
        if cluster_kwargs:
            raise ValueError(f"dask_task_runner: cluster settings {sorted(cluster_kwargs)} given with address "
                             f"{address!r} (an existing cluster is used as it is)")
        return DaskTaskRunner(address=address)
    n = n_workers or int(os.environ.get("ANYFLOW_DASK_WORKERS") or 0) or os.cpu_count() or 1
    kwargs = {"n_workers": n, "processes": True, "threads_per_worker": 1, "host": "127.0.0.1",
              "dashboard_address": None, **cluster_kwargs}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def shard_task_runner(max_workers: int | None = None):
    """The runner for ``max_workers`` (= number of shards) mapped subprocess tasks.

    ``auto``: Dask when ``$ANYFLOW_DASK_ADDRESS`` names a cluster (and ``prefect-dask`` is installed), else
    ``prefect_ray.RayTaskRunner`` when installed, else ``ThreadPoolTaskRunner``. Shards run as subprocesses, so on
    one host threads already run them in parallel; a local Dask cluster would only add worker processes, so
    ``auto`` does not start one (``ANYFLOW_TASK_RUNNER=dask`` does: :func:`dask_task_runner`).
    """
    want = os.environ.get("ANYFLOW_TASK_RUNNER", "auto")
    if want not in ("auto", "thread", "dask", "ray"):
        raise ValueError(f"ANYFLOW_TASK_RUNNER={want}: expected auto, thread, dask or ray")
    has_dask = importlib.util.find_spec("prefect_dask") is not None
    if want == "dask" or (want == "auto" and has_dask and os.environ.get("ANYFLOW_DASK_ADDRESS")):
        if not has_dask:
            raise RuntimeError("ANYFLOW_TASK_RUNNER=dask: prefect-dask is not installed "
                               "(pip install 'anyflow-pipeline[orchestration]')")
        cpus = os.cpu_count() or 1
        return dask_task_runner(n_workers=None if os.environ.get("ANYFLOW_DASK_WORKERS")
                                else min(max_workers or cpus, cpus))
    if want in ("auto", "ray") and importlib.util.find_spec("prefect_ray"):
        from prefect_ray import RayTaskRunner

        return RayTaskRunner()
    if want == "ray":
        raise RuntimeError("ANYFLOW_TASK_RUNNER=ray: prefect-ray is not installed")
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max_workers or os.cpu_count() or 1)
