"""Synthesis scale-out on a real engine: the sharded synthesis subflow (`flows.distill.synthesize_shards`) on
prefect-dask's `DaskTaskRunner` against a local 2-worker `distributed` cluster (loopback only). Each shard is a real
`anyflow synthesize --shard i/2` subprocess started by a Dask worker; the shards' tensors, prompts and seeds equal a
serial `anyflow synthesize` run's."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tasks/ and flows/ live at the repository root
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow

# toy geometry, random (untrained) toy teacher: 4 samples in 2 shards of 2, 2 ODE steps with CFG
PARAMS = {"profile": "toy", "synthesize": {"num_samples": 4, "samples_per_shard": 2, "batch_size": 2, "steps": 2,
                                           "guidance_scale": 3.0, "threads": 1}}  # 2 Dask workers, 2 cores


def _repo(path: Path, teacher: Path) -> Path:
    path.mkdir()
    (path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    shutil.copytree(teacher, path / "artifacts/teacher")
    return path


def _shards(data: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(data.glob("shard-*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out[f.name] = ({k: st.get_tensor(k) for k in st.keys()}, st.metadata())
    return out


@pytest.fixture(scope="module")
def random_toy_teacher(tmp_path_factory):
    from anyflow.config import build
    from anyflow.models import toy_teacher

    return toy_teacher.save(toy_teacher.build(build(PARAMS), seed=0), tmp_path_factory.mktemp("teacher") / "teacher")


def test_dask_runner_selection(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.runners import dask_task_runner, shard_task_runner

    for var in ("ANYFLOW_TASK_RUNNER", "ANYFLOW_DASK_ADDRESS", "ANYFLOW_DASK_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(shard_task_runner(4), ThreadPoolTaskRunner)  # auto, no cluster named: subprocesses on threads
    monkeypatch.setenv("ANYFLOW_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    runner = shard_task_runner(4)
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://127.0.0.1:8786"
    monkeypatch.delenv("ANYFLOW_DASK_ADDRESS")
    monkeypatch.setenv("ANYFLOW_TASK_RUNNER", "dask")
    runner = shard_task_runner(16)
    assert runner.address is None and runner.cluster_class == "distributed.LocalCluster"
    assert runner.cluster_kwargs == {"n_workers": min(16, os.cpu_count()), "processes": True, "threads_per_worker": 1,
                                     "host": "127.0.0.1", "dashboard_address": None}
    monkeypatch.setenv("ANYFLOW_DASK_WORKERS", "3")
    assert shard_task_runner(16).cluster_kwargs["n_workers"] == 3
    with pytest.raises(ValueError, match="cluster settings"):
        dask_task_runner(address="tcp://x:1", n_workers=None, processes=False)
    monkeypatch.setenv("ANYFLOW_TASK_RUNNER", "spark")
    with pytest.raises(ValueError, match="ANYFLOW_TASK_RUNNER=spark"):
        shard_task_runner(2)


def test_sharded_synthesis_on_a_local_dask_cluster_equals_the_serial_run(random_toy_teacher, tmp_path, monkeypatch,
                                                                        prefect_harness, one_thread):
    from distributed import Client, LocalCluster, get_task_stream
    from prefect_dask import DaskTaskRunner

    from anyflow.cli import main as anyflow
    from flows.distill import synthesize_shards
    from flows.runners import shard_task_runner
    from tasks.commands import Commands

    # serial reference: `anyflow synthesize` (one process, every shard)
    serial = _repo(tmp_path / "serial", random_toy_teacher)
    monkeypatch.chdir(serial)
    assert anyflow(["synthesize"]) == 0
    monkeypatch.chdir(tmp_path)

    # the workers' shard subprocesses: one thread each (as the serial run above), tasks/ importable in the workers
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("ANYFLOW_TASK_RUNNER", raising=False)
    repo = _repo(tmp_path / "dask", random_toy_teacher)
    cmds = Commands(record=[sys.executable, "-c", "pass"])  # no DVC project here: recording is a no-op
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        monkeypatch.setenv("ANYFLOW_DASK_ADDRESS", cluster.scheduler_address)
        runner = shard_task_runner(2)
        assert isinstance(runner, DaskTaskRunner) and runner.address == cluster.scheduler_address
        with get_task_stream(client) as stream:
            synthesize_shards.with_options(task_runner=runner)(str(repo), 2, cmds)
        workers = set(cluster.scheduler_info["workers"])
        ran_on = [t["worker"] for t in stream.data if "run_shard" in str(t["key"]) or "shard" in str(t["key"])]
    assert len(ran_on) == 2 and set(ran_on) <= workers, stream.data  # both shards ran as Dask tasks

    got, want = _shards(repo / "artifacts/data"), _shards(serial / "artifacts/data")
    assert list(got) == list(want) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    for name in want:
        (t_got, meta_got), (t_want, meta_want) = got[name], want[name]
        assert t_got.keys() == t_want.keys() == {"latents", "noise", "prompt_embeds"}
        assert all(torch.equal(t_got[k], t_want[k]) for k in t_want), name
        assert meta_got == meta_want  # prompts and seeds
    assert (repo / "artifacts/data/manifest.json").is_file()
