"""One task per pipeline step. Each runs a command (see :mod:`tasks.commands`), logs its output, publishes the
stage's metrics as artefacts and returns small JSON values (paths, names, metrics), never tensors.

Retries: training and synthesis stages resume from their checkpoints / finished shards, so a retry after a
pre-emption or an out-of-memory kill continues the work; an invalid-parameters exit (2) is deterministic and is not
retried. The gate is never retried (a failing gate is a verdict, not an error), and promotion retries only on
errors that are not a refused gate (exit 3), e.g. a lakeFS endpoint that was briefly unreachable.

Stages of a second DVC pipeline are addressed as DVC does, ``<dvc.yaml path>:<stage>`` (e.g.
``continued/dvc.yaml:domain``): the command templates pass that through to ``dvc repro --single-item``, and the
artefacts are published under the bare stage name (its metrics file is ``metrics/<stage>.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import commands
from tasks.artifacts import publish_stage_artifacts
from tasks.commands import Commands, StageFailed

EXIT_INVALID_PARAMS = 2
EXIT_GATE_REFUSED = 3  # anyflow.stages.promote.EXIT_GATE_FAILED (not imported: tasks stay light)


def _retry_unless(*codes: int):
    """Retry condition: retry a :class:`StageFailed` unless its exit code is one of ``codes``."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except StageFailed as err:
            return err.returncode not in codes
        except Exception:
            return True
        return False

    return condition


def stage_name(stage: str) -> str:
    """``continued/dvc.yaml:domain`` → ``domain``; a root stage's name unchanged."""
    return stage.rsplit(":", 1)[-1]


def _run(argv: list[str], repo: str, what: str) -> commands.CommandResult:
    logger = get_run_logger()
    logger.info("$ %s", " ".join(argv))
    result = commands.run_command(argv, cwd=repo)  # looked up at call time: tests may replace it
    if result.output:
        logger.info("%s output (tail):\n%s", what, result.tail(60))
    return result


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_unless(EXIT_INVALID_PARAMS),
      cache_policy=NO_CACHE, task_run_name="stage-{stage}")
def run_stage(stage: str, repo: str, cmds: Commands) -> dict:
    """Run one DVC stage (``dvc repro --single-item <stage>``) and publish its metrics. Returns the metrics."""
    result = _run(cmds.render(cmds.stage, stage=stage), repo, stage)
    if result.returncode != 0:
        raise StageFailed(f"stage {stage}", result)
    return publish_stage_artifacts(Path(repo), stage_name(stage))


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_unless(EXIT_INVALID_PARAMS),
      cache_policy=NO_CACHE, task_run_name="synthesize-shard-{index}-of-{count}")
def run_shard(index: int, count: int, repo: str, cmds: Commands) -> str:
    """``anyflow synthesize --shard i/n``: one independent slice of the teacher samples. Returns ``i/n``."""
    shard = f"{index}/{count}"
    result = _run(cmds.render(cmds.shard, shard=shard), repo, f"shard {shard}")
    if result.returncode != 0:
        raise StageFailed(f"synthesize shard {shard}", result)
    return shard


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless(EXIT_INVALID_PARAMS),
      cache_policy=NO_CACHE, task_run_name="finalise-{stage}")
def finalise_sharded_stage(stage: str, shards: list[str], repo: str, cmds: Commands) -> dict:
    """After the mapped shards: ``anyflow <stage>`` (finds every shard done, writes the manifest and metrics),
    then record the outputs in ``dvc.lock`` (``dvc commit``) so the next ``dvc repro`` sees the stage up to date."""
    for argv, what in ((cmds.render(cmds.finalise, stage=stage), stage),
                       (cmds.render(cmds.record, stage=stage), f"record {stage}")):
        result = _run(argv, repo, what)
        if result.returncode != 0:
            raise StageFailed(what, result)
    return publish_stage_artifacts(Path(repo), stage)


def gate_passed(metrics: dict) -> bool | None:
    """The verdict in ``metrics/gate.json``: a top-level ``passed``, or one nested a level down."""
    if isinstance(metrics.get("passed"), bool):
        return metrics["passed"]
    for value in metrics.values():
        if isinstance(value, dict) and isinstance(value.get("passed"), bool):
            return value["passed"]
    return None


@task(retries=0, cache_policy=NO_CACHE, task_run_name="gate-{stage}")
def run_gate(repo: str, cmds: Commands, metrics_file: str = "metrics/gate.json", stage: str = "gate") -> dict:
    """Run a gating stage: the release gate, or any stage that exits non-zero with ``passed: false`` in
    ``metrics_file`` when its verdict fails (``stage="continued/dvc.yaml:domain"``,
    ``metrics_file="metrics/domain.json"``). A failing gate (non-zero exit *and* a fresh ``metrics_file`` with
    passed=false) returns ``{"passed": False, ...}``; a gate that crashed without a fresh verdict raises."""
    started = time.time()
    result = _run(cmds.render(cmds.stage, stage=stage), repo, stage)
    verdict_path = Path(repo) / metrics_file
    metrics = json.loads(verdict_path.read_text()) if verdict_path.exists() else {}
    fresh = verdict_path.exists() and verdict_path.stat().st_mtime >= started - 1
    verdict = gate_passed(metrics)
    if metrics:
        publish_stage_artifacts(Path(repo), stage_name(stage))
    # exit 0: the gate passed now, or DVC skipped it because an identical run passed before (only successful
    # runs enter dvc.lock); a verdict of passed=false still wins. Non-zero: a verdict only if freshly written.
    if verdict is False and (result.returncode == 0 or fresh):
        get_run_logger().warning("%s failed: the candidate will not be promoted\n%s", stage, result.tail(20))
        return {"passed": False, "metrics": metrics, "reason": result.tail(20)}
    if result.returncode == 0:
        return {"passed": True, "metrics": metrics}
    raise StageFailed(f"{stage} (exit {result.returncode} without a fresh verdict in {metrics_file})", result)


@task(retries=2, retry_delay_seconds=15, retry_condition_fn=_retry_unless(EXIT_GATE_REFUSED, EXIT_INVALID_PARAMS),
      cache_policy=NO_CACHE, task_run_name="promote")
def promote_release(repo: str, cmds: Commands, name: str | None = None, flow_run: str | None = None,
                    release: str | None = None) -> dict:
    """``anyflow promote``: candidate → release only if its gate passed. ``release``: the release directory
    (default: ``anyflow promote``'s, ``artifacts/release``). Returns the promotion record."""
    argv = [*cmds.anyflow, "promote", "--json"]
    argv += ["--release", release] if release else []
    argv += ["--name", name] if name else []
    argv += ["--meta", f"prefect_flow_run={flow_run}"] if flow_run else []
    result = _run(argv, repo, "promote")
    record = _last_json(result.output)
    if result.returncode == EXIT_GATE_REFUSED:
        get_run_logger().warning("promotion refused: %s", record.get("reason"))
        return {"promoted": None, **record}
    if result.returncode != 0:
        raise StageFailed("promote", result)
    return {"promoted": record.get("release"), **record}


@task(retries=2, retry_delay_seconds=15, retry_condition_fn=_retry_unless(EXIT_INVALID_PARAMS),
      cache_policy=NO_CACHE, task_run_name="rollback-{to_release}")
def rollback_release(repo: str, cmds: Commands, to_release: str) -> dict:
    """``anyflow promote --rollback NAME``: make an earlier release current again."""
    result = _run([*cmds.anyflow, "promote", "--json", "--rollback", to_release], repo, "rollback")
    if result.returncode != 0:
        raise StageFailed(f"rollback to {to_release}", result)
    return _last_json(result.output)


def _last_json(output: str) -> dict:
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}
