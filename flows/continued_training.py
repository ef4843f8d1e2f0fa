"""Continued training on a new domain: domain → gate → export → promote (only on a passing gate).

``domain`` is the DVC stage of issue [G] (``anyflow domain``: adapt the distilled student to ``domain.domain`` /
``domain.clips_dir``, with a forgetting check). The flow only needs it to be a DVC stage that writes
``metrics/domain.json``; the gate then judges the adapted student exactly as it judges a fresh distillation.
Optionally encodes a clips folder first (``anyflow encode-clips``, stage ``encode_clips``) when the domain comes
from real videos.
"""

from __future__ import annotations

from prefect import flow, runtime

from tasks.commands import Commands
from tasks.stages import promote_release, run_gate, run_stage


@flow(name="anyflow-continued-training")
def continued_training(repo: str = ".", encode_clips: bool = False, release_name: str | None = None,
                       cmds: Commands = Commands()) -> dict:
    if encode_clips:
        run_stage("encode_clips", repo, cmds)
    run_stage("domain", repo, cmds)
    gate = run_gate(repo, cmds)
    if not gate["passed"]:
        return {"promoted": None, "gate": gate}
    run_stage("export", repo, cmds)
    return {**promote_release(repo, cmds, release_name, flow_run=runtime.flow_run.id), "gate": gate}


if __name__ == "__main__":
    print(continued_training())
