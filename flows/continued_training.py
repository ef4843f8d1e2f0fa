"""Continued training on a new domain: domain (its own gate) → export_domain → promote (only on a passing gate).

The stages live in the second DVC pipeline ``continued/dvc.yaml`` (addressed ``continued/dvc.yaml:<stage>``), so the
root ``dvc repro`` never runs them. ``domain`` (issue [G], ``anyflow domain``) adapts the distilled student to
``domain.domain`` and applies the domain gate (semantic gain on the new domain, no forgetting on the base domain,
monotone in NFE); it exits 1 with ``passed: false`` in ``metrics/domain.json`` when that fails, which the flow
handles exactly like the release gate: nothing is exported or promoted. ``export_domain`` writes
``artifacts/release_domain`` with the domain gate's verdict in its manifest, and that directory is promoted.
``encode_clips=True`` (the default) first runs ``continued/dvc.yaml:encode_clips`` (``anyflow encode-clips`` from
params: the rendered toy domain for ``domain.source: synthetic``, ``domain.clips_dir`` for ``clips``) into
``artifacts/domain_data``, which ``domain`` depends on. Stages run ``dvc repro --single-item``, so ``domain`` alone
never re-encodes stale shards: skip it (``encode_clips=False``) only when the shards are known to be current — DVC
skips the stage when nothing changed anyway. DVC does not see clips edited in place inside ``domain.clips_dir``
(the folder is not a dep, only its path in params; see ``continued/dvc.yaml``).
"""

from __future__ import annotations

from prefect import flow, runtime

from tasks.commands import Commands
from tasks.stages import promote_release, run_gate, run_stage

PIPELINE = "continued/dvc.yaml"
ENCODE_STAGE = f"{PIPELINE}:encode_clips"
DOMAIN_STAGE = f"{PIPELINE}:domain"
EXPORT_STAGE = f"{PIPELINE}:export_domain"
DOMAIN_METRICS = "metrics/domain.json"
RELEASE_DIR = "artifacts/release_domain"


@flow(name="anyflow-continued-training")
def continued_training(repo: str = ".", encode_clips: bool = True, release_name: str | None = None,
                       cmds: Commands = Commands()) -> dict:
    """Returns {"promoted": name or None, "gate": the domain gate's verdict}."""
    if encode_clips:
        run_stage(ENCODE_STAGE, repo, cmds)
    gate = run_gate(repo, cmds, metrics_file=DOMAIN_METRICS, stage=DOMAIN_STAGE)
    if not gate["passed"]:
        return {"promoted": None, "gate": gate}
    run_stage(EXPORT_STAGE, repo, cmds)
    return {**promote_release(repo, cmds, release_name, flow_run=runtime.flow_run.id, release=RELEASE_DIR),
            "gate": gate}


if __name__ == "__main__":
    print(continued_training())
