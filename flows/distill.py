"""Distillation: synthesize → stage1 (+ consistency baseline) → stage2 → fvd_net, gate_reference, gate_baseline,
gate_sanity → gate → export → promote (only on a passing gate).

Every step is a DVC stage run by a thin task (``tasks/stages.py``); this file is only the order. Run locally::

    python -m flows.distill                       # or: prefect deployment run anyflow-distill/nightly-refresh
"""

from __future__ import annotations

from prefect import flow, runtime, unmapped

from flows.runners import shard_task_runner
from tasks.commands import Commands
from tasks.stages import finalise_sharded_stage, promote_release, run_gate, run_shard, run_stage


@flow(name="anyflow-synthesize-shards")
def synthesize_shards(repo: str, num_shards: int, cmds: Commands) -> dict:
    """``anyflow synthesize --shard i/n`` for every i, mapped over the task runner, then recorded in DVC."""
    shards = run_shard.map(range(num_shards), count=num_shards, repo=repo, cmds=unmapped(cmds)).result()
    return finalise_sharded_stage("synthesize", shards, repo, cmds)


@flow(name="anyflow-distill")
def distill(repo: str = ".", num_shards: int = 1, train_teacher: bool = False, release_name: str | None = None,
            cmds: Commands = Commands()) -> dict:
    """The whole distillation pipeline; returns {"promoted": name or None, "gate": verdict}."""
    if train_teacher:
        run_stage("teacher", repo, cmds)
    if num_shards > 1:
        synthesize_shards.with_options(task_runner=shard_task_runner(num_shards))(repo, num_shards, cmds)
    else:
        run_stage("synthesize", repo, cmds)
    run_stage("stage1", repo, cmds)
    run_stage("stage1_consistency", repo, cmds)  # the baseline the gate reports beside the candidate
    run_stage("stage2", repo, cmds)
    run_stage("fvd_net", repo, cmds)  # the toy FVD / realism network the gate scores with
    run_stage("gate_reference", repo, cmds)  # the gate's teacher rows (teacher 50×CFG and N×CFG), once
    run_stage("gate_baseline", repo, cmds)  # the gate's baseline rows (the consistency student), once
    run_stage("gate_sanity", repo, cmds)  # report-only: its verdict is in metrics/gate_sanity.json
    gate = run_gate(repo, cmds)
    if not gate["passed"]:
        return {"promoted": None, "gate": gate}
    run_stage("export", repo, cmds)
    return {**promote_release(repo, cmds, release_name, flow_run=runtime.flow_run.id), "gate": gate}


if __name__ == "__main__":
    print(distill())
