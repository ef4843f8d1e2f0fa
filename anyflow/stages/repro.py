"""``anyflow repro``: ``dvc repro`` with independent stages side by side (``--jobs``, default 2).

``dvc repro`` runs one stage at a time. The toy pipeline's stages run on one intra-op thread each (the model is too
small for threads to pay), so on the 2-core CI machine half the CPU sat idle while stage 1 and the consistency
baseline, the gate's teacher rows and stage 2, the benchmarks and the teacher could have shared it. This runner reads
the stage graph from DVC (``Repo.index.graph``: the same stages and edges ``dvc repro`` uses) and runs each stage as
``dvc --wait-for-lock repro --single-item <stage>``, at most ``--jobs`` at a time, a stage only once every stage it
depends on has finished. DVC itself decides whether a stage changed (an unchanged one is skipped in a second), holds
its repository lock while it reads and writes ``dvc.lock`` and releases it while the stage's command runs
(``dvc.stage.run.unlocked_repo``), so concurrent single-stage runs are the concurrency DVC supports; ``dvc.lock``
ends exactly as after ``dvc repro`` (tests/test_repro.py).

Order: among the stages whose dependencies are done, the one with the longest chain of stages after it starts
first (stage 1 before the consistency baseline: stage 2, the gate and export wait on it), on a tie the wider one
(a 2-thread stage can only start on two free slots: a 1-thread stage started first would make it wait). A stage with
``meta: {threads: n}`` in dvc.yaml (its ``threads`` param: the torch intra-op threads it runs on) takes n of the
``--jobs`` slots, so a 2-thread stage runs alone on 2 cores (side by side with another busy process it ran up to 5x
slower); a stage that needs more slots than are free waits, and a lower-priority one that fits starts meanwhile.
A stage whose ``meta: {exclusive: true}`` is set in dvc.yaml (the benchmarks: their timings are the measurement)
runs alone: only when nothing else runs and no other stage can start, and nothing starts beside it. A failing stage skips
every stage downstream of it and lets the others finish (``dvc repro --keep-going``); the exit status is 1 then.
One runner per workspace: DVC's per-file locks make a second runner's (or a plain ``dvc repro``'s) stage fail with
"... is busy"; give every target to one call. Each stage's output goes to ``<logs>/<stage>.log`` (default
``.dvc/tmp/repro``); the console shows one line per
start and end, the last lines of a failing stage's log, and a table of stage times (also ``<logs>/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

USES_PARAMS = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="*", default=["dvc.yaml"],
                   help="dvc.yaml files or stages, with everything upstream of them (default: dvc.yaml)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="stages at a time (default 2: the CI machine's cores)")
    p.add_argument("--logs", default=".dvc/tmp/repro", help="directory of the per-stage logs")
    p.add_argument("--dry", action="store_true", help="print the stages and what each waits for; run nothing")


@dataclass
class Plan:
    """Stages (DVC addressing, e.g. ``gate`` or ``far/dvc.yaml:far_gate``) and the stages each one depends on."""

    deps: dict[str, set[str]]
    exclusive: set[str] = field(default_factory=set)
    priority: dict[str, int] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)  # slots a stage takes (dvc.yaml meta.threads; default 1)

    def __post_init__(self):
        after: dict[str, set[str]] = {s: set() for s in self.deps}
        for s, ds in self.deps.items():
            for d in ds:
                after[d].add(s)
        memo: dict[str, int] = {}

        def depth(s: str) -> int:  # the longest chain of stages that wait on s
            if s not in memo:
                memo[s] = 1 + max((depth(a) for a in after[s]), default=0)
            return memo[s]

        self.priority = {s: depth(s) for s in self.deps}
        self.after = after

    def downstream(self, stage: str) -> set[str]:
        out, todo = set(), [stage]
        while todo:
            for a in self.after[todo.pop()]:
                if a not in out:
                    out.add(a)
                    todo.append(a)
        return out


def plan(root: Path, targets: list[str]) -> Plan:
    """The stages of ``targets`` and everything upstream, with their dependency edges, from DVC's own graph."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = set()
        for t in targets:
            stages.update(repo.stage.collect(t, with_deps=True))
        graph = repo.index.graph  # edges: stage → a stage whose outputs it depends on
        meta = {s.addressing: getattr(s, "meta", None) or {} for s in stages}
        threads = {}
        for s, m in meta.items():
            n = m.get("threads", 1)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"dvc.yaml: stage {s!r}: meta.threads must be an integer >= 1, got {n!r}")
            threads[s] = n
        return Plan({s.addressing: {d.addressing for d in graph.successors(s) if d in stages} for s in stages},
                    {s for s, m in meta.items() if m.get("exclusive")}, threads=threads)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _log_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stage) + ".log"


def run(root: Path, p: Plan, jobs: int, logs: Path, dvc: Optional[str] = None, echo=print) -> dict:
    """Run the plan; returns ``{stage: {"status": ok|unchanged|failed|skipped, "seconds", "exit"}}``."""
    dvc = dvc or shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, result = set(p.deps), {}, {}
    t_start = time.perf_counter()
    try:
        while pending or running:
            changed = True
            while changed:  # downstream of a failure, however deep: never started
                changed = False
                for s in sorted(pending):
                    bad = [d for d in p.deps[s] if result.get(d, {}).get("status") in ("failed", "skipped")]
                    if bad:
                        pending.discard(s)
                        result[s] = {"status": "skipped", "seconds": 0.0, "after": bad}
                        echo(f"  - {s}: skipped ({', '.join(bad)} did not succeed)")
                        changed = True
            ready = sorted((s for s in pending if all(result.get(d, {}).get("status") in ("ok", "unchanged")
                                                      for d in p.deps[s])),
                           key=lambda s: (-p.priority[s], -p.threads.get(s, 1), s))
            if any(r in p.exclusive for r in running):
                ready = []  # an exclusive stage runs alone
            elif [s for s in ready if s not in p.exclusive]:
                ready = [s for s in ready if s not in p.exclusive]
            elif running:
                ready = []  # only exclusive stages are ready: wait until the others ended
            else:
                ready = ready[:1]
            used = sum(p.threads.get(r, 1) for r in running)
            for s in list(ready):
                need = p.threads.get(s, 1)
                if running and used + need > jobs:  # no room: a stage wider than --jobs starts only alone
                    continue
                used += need
                pending.discard(s)
                log = logs / _log_name(s)
                fh = open(log, "w")
                proc = subprocess.Popen([dvc, "--wait-for-lock", "repro", "--single-item", s], cwd=root,
                                        stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                running[s] = (proc, time.perf_counter(), fh, log)
                echo(f"[{_fmt(time.perf_counter() - t_start):>7}] ▶ {s}  (log: {log})")
            finished = [s for s, (proc, *_rest) in running.items() if proc.poll() is not None]
            if not finished:
                time.sleep(0.2)
                continue
            for s in finished:
                proc, t0, fh, log = running.pop(s)
                fh.close()
                seconds = time.perf_counter() - t0
                text = log.read_text(errors="replace")
                if proc.returncode:
                    status = "failed"
                elif "didn't change, skipping" in text and "Running stage" not in text:
                    status = "unchanged"
                else:
                    status = "ok"
                result[s] = {"status": status, "seconds": seconds, "exit": proc.returncode}
                mark = {"ok": "✓", "unchanged": "=", "failed": "✗"}[status]
                echo(f"[{_fmt(time.perf_counter() - t_start):>7}] {mark} {s} {status} in {_fmt(seconds)}")
                if status == "failed":
                    tail = [ln for ln in re.split(r"[\r\n]", text) if ln.strip()][-15:]
                    echo("\n".join(f"      | {ln}" for ln in tail))
    except KeyboardInterrupt:
        for s, (proc, _, fh, _) in running.items():
            proc.terminate()
        for s, (proc, _, fh, _) in running.items():
            proc.wait()
            fh.close()
        raise
    result["_wall_seconds"] = time.perf_counter() - t_start
    return result


def summary(result: dict, jobs: int) -> str:
    rows = [(s, r) for s, r in result.items() if not s.startswith("_")]
    busy = sum(r["seconds"] for _, r in rows)
    lines = [f"{'stage':<36} {'status':<10} {'time':>8}"]
    lines += [f"{s:<36} {r['status']:<10} {_fmt(r['seconds']):>8}" for s, r in sorted(rows, key=lambda x: x[0])]
    lines.append(f"wall {_fmt(result['_wall_seconds'])} with --jobs {jobs}; the stages' own times add up to "
                 f"{_fmt(busy)}")
    return "\n".join(lines)


def main(cfg, args) -> int:
    root = Path.cwd()
    if args.jobs < 1:
        raise ValueError(f"--jobs: must be at least 1, got {args.jobs}")
    p = plan(root, list(args.targets))
    if args.dry:
        for s in sorted(p.deps, key=lambda s: (-p.priority[s], s)):
            print(f"{s}: after {', '.join(sorted(p.deps[s])) or 'nothing'}")
        return 0
    logs = Path(args.logs)
    result = run(root, p, args.jobs, logs)
    text = summary(result, args.jobs)
    print(text)
    (logs / "summary.json").write_text(json.dumps({"jobs": args.jobs, "stages": result}, indent=2, sort_keys=True))
    failed = [s for s, r in result.items() if not s.startswith("_") and r["status"] in ("failed", "skipped")]
    if failed:
        print("repro FAILED: " + ", ".join(sorted(failed)))
        return 1
    return 0
