"""How a flow runs a stage: command templates (a JSON-serialisable flow parameter) and the subprocess runner.

Defaults: DVC runs each stage (``dvc repro --single-item <stage>``, so DVC records params, deps and outputs and skips
an unchanged stage), synthesis shards run as ``anyflow synthesize --shard i/n``, and outputs produced outside
``dvc repro`` (the mapped shards) are recorded with ``dvc commit``. Tests and ad-hoc runs swap the templates
(e.g. ``stage=["anyflow", "{stage}"]`` to run without DVC); :func:`run_command` is the one place a process starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel


class Commands(BaseModel):
    """Command templates; ``{stage}``, ``{shard}`` (``i/n``) and ``{anyflow}`` are substituted per call.

    DVC and anyflow run through this interpreter (``python -m``) so a worker needs no PATH set-up beyond its venv.
    """

    stage: list[str] = [sys.executable, "-m", "dvc", "repro", "--single-item", "{stage}"]
    shard: list[str] = ["{anyflow}", "synthesize", "--shard", "{shard}"]
    finalise: list[str] = ["{anyflow}", "{stage}"]
    record: list[str] = [sys.executable, "-m", "dvc", "commit", "--force", "{stage}"]
    anyflow: list[str] = [sys.executable, "-m", "anyflow.cli"]

    def render(self, template: list[str], **values: str) -> list[str]:
        out: list[str] = []
        for part in template:
            if part == "{anyflow}":
                out.extend(self.anyflow)
            else:
                out.append(part.format(**values))
        return out


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr interleaved (tail kept for messages)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-n:])


class StageFailed(RuntimeError):
    """A stage command exited non-zero; ``returncode`` lets retry policies tell transient from deterministic."""

    def __init__(self, what: str, result: CommandResult):
        super().__init__(f"{what} failed with exit code {result.returncode}: {' '.join(result.argv)}\n"
                         f"{result.tail()}")
        self.returncode = result.returncode


def run_command(argv: list[str], cwd: str | Path) -> CommandResult:
    """Run ``argv`` in ``cwd`` and return its exit code and combined output (the calling task logs it).

    This interpreter's ``bin`` directory goes first on PATH so the ``anyflow`` commands in ``dvc.yaml`` resolve to
    the same environment even when the worker's venv is not activated.
    """
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return CommandResult(list(argv), proc.returncode, proc.stdout)
