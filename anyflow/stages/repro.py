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

Order: among the stages whose dependencies are done, the one with the longest chain after it starts first, a
chain's length being the sum of its stages' ``meta: {minutes: m}`` (a rough duration on the CI machine; 1 where not
given, so without hints the longest chain of stages): stage 1 and the consistency baseline before fvd_net, though
fvd_net has more stages after it. On a tie the wider one
(a 2-thread stage can only start on two free slots: a 1-thread stage started first would make it wait). A stage with
``meta: {threads: n}`` in dvc.yaml (its ``threads`` param: the torch intra-op threads it runs on) takes n of the
``--jobs`` slots, so a 2-thread stage runs alone on 2 cores (side by side with another busy process it ran up to 5x
slower); a stage that needs more slots than are free waits, and a lower-priority one that fits starts meanwhile.
Each stage is pinned to CPUs of its own (Linux ``sched_setaffinity``; the runner's CPUs split evenly over the
``--jobs`` slots, one core per slot on the 2-core CI machine; ``--no-pin`` turns it off, and so does a machine
with fewer CPUs than slots). A stage whose ``meta: {exclusive: true}`` is set in dvc.yaml (the benchmarks: their
timings are the measurement) starts only after every other ready stage, on a slot nobody else's threads can reach;
beside it run only other benchmarks and stages marked ``meta: {quiet: true}`` (export: single-threaded ONNX
tracing), each on its own cores. Measured on the CI machine (README "Measured on the toy profile"): the simulation
benchmark's timings beside another benchmark or the export on the other core stayed within their run-to-run spread
alone; beside stage-1 training its consistency rollout ran 10-15 % slower, so training never runs beside a benchmark.
Unpinned, an exclusive stage runs alone: only when nothing else runs and no other stage can start, and nothing
starts beside it. A failing stage skips
every stage downstream of it and lets the others finish (``dvc repro --keep-going``); the exit status is 1 then.
One runner per workspace: DVC's per-file locks make a second runner's (or a plain ``dvc repro``'s) stage fail with
"... is busy"; give every target to one call. Each stage's output goes to ``<logs>/<stage>.log`` (default
``.dvc/tmp/repro``); the console shows one line per
start and end, the last lines of a failing stage's log, and a table of stage times (also ``<logs>/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
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
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin stages to CPUs of their own (benchmarks then run alone)")


@dataclass
class Plan:
    """Stages (DVC addressing, e.g. ``gate`` or ``far/dvc.yaml:far_gate``) and the stages each one depends on."""

    deps: dict[str, set[str]]
    exclusive: set[str] = field(default_factory=set)
    priority: dict[str, float] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)  # slots a stage takes (dvc.yaml meta.threads; default 1)
    quiet: set[str] = field(default_factory=set)  # may run beside a benchmark when pinned (dvc.yaml meta.quiet)
    minutes: dict[str, float] = field(default_factory=dict)  # rough durations (dvc.yaml meta.minutes; default 1)

    def __post_init__(self):
        after: dict[str, set[str]] = {s: set() for s in self.deps}
        for s, ds in self.deps.items():
            for d in ds:
                after[d].add(s)
        memo: dict[str, float] = {}

        def depth(s: str) -> float:  # the longest chain (in minutes) from s through the stages that wait on it
            if s not in memo:
                memo[s] = self.minutes.get(s, 1) + max((depth(a) for a in after[s]), default=0)
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
        threads, minutes = {}, {}
        for s, m in meta.items():
            n = m.get("threads", 1)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"dvc.yaml: stage {s!r}: meta.threads must be an integer >= 1, got {n!r}")
            threads[s] = n
            t = m.get("minutes", 1)
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
                raise ValueError(f"dvc.yaml: stage {s!r}: meta.minutes must be a number > 0, got {t!r}")
            minutes[s] = float(t)
        return Plan({s.addressing: {d.addressing for d in graph.successors(s) if d in stages} for s in stages},
                    {s for s, m in meta.items() if m.get("exclusive")}, threads=threads,
                    quiet={s for s, m in meta.items() if m.get("quiet")}, minutes=minutes)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _log_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stage) + ".log"


def cpu_slots(jobs: int) -> Optional[list[tuple[int, ...]]]:
    """The CPUs each of ``jobs`` slots owns: the runner's CPUs (``os.sched_getaffinity``) split evenly, in order,
    ``len(cpus) // jobs`` each; None where stages cannot be pinned (no ``sched_setaffinity``: not Linux) or there
    are fewer CPUs than slots."""
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    k = len(cpus) // jobs
    if k < 1:
        return None
    return [tuple(cpus[i * k:(i + 1) * k]) for i in range(jobs)]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a stage's whole process group — dvc and the command it runs (terminating dvc alone left the stage's
    command running, holding its core) — or the process alone where there are no groups."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _pin(cpus: tuple[int, ...]):
    return lambda: os.sched_setaffinity(0, cpus)  # in the child, before exec: dvc and the stage inherit it


def _may_join(p: Plan, stage: str, running) -> bool:
    """Pinned: a benchmark starts only beside benchmarks and quiet stages; beside a running benchmark only those."""
    mild = lambda s: s in p.exclusive or s in p.quiet  # noqa: E731
    if stage in p.exclusive:
        return all(mild(r) for r in running)
    return mild(stage) or not any(r in p.exclusive for r in running)


def run(root: Path, p: Plan, jobs: int, logs: Path, dvc: Optional[str] = None, echo=print,
        pin: bool = True) -> dict:
    """Run the plan; returns ``{stage: {"status": ok|unchanged|failed|skipped, "seconds", "exit", "cpus"}}``."""
    dvc = dvc or shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, result = set(p.deps), {}, {}
    slots = cpu_slots(jobs) if pin else None
    free = list(range(jobs))  # slot indices not taken by a running stage
    t_start = time.perf_counter()
    restore = _terminate_as_interrupt()
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
            if slots is not None:  # pinned: benchmarks after every other ready stage (and see _may_join)
                ready.sort(key=lambda s: s in p.exclusive)
            elif any(r in p.exclusive for r in running):
                ready = []  # unpinned, an exclusive stage runs alone
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
                if slots is not None and not _may_join(p, s, running):
                    continue
                used += need
                pending.discard(s)
                taken, free = free[:need], free[need:]  # a stage wider than --jobs (started alone) takes them all
                cpus = tuple(c for i in taken for c in slots[i]) if slots is not None else None
                log = logs / _log_name(s)
                fh = open(log, "w")
                proc = subprocess.Popen([dvc, "--wait-for-lock", "repro", "--single-item", s], cwd=root,
                                        stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=_pin(cpus) if cpus else None,
                                        start_new_session=hasattr(os, "killpg"))  # its own group: see _signal_group
                running[s] = (proc, time.perf_counter(), fh, log, taken, cpus)
                where = f"cpu {','.join(map(str, cpus))}; " if cpus else ""
                echo(f"[{_fmt(time.perf_counter() - t_start):>7}] ▶ {s}  ({where}log: {log})")
            finished = [s for s, (proc, *_rest) in running.items() if proc.poll() is not None]
            if not finished:
                time.sleep(0.2)
                continue
            for s in finished:
                proc, t0, fh, log, taken, cpus = running.pop(s)
                free = sorted(free + taken)
                fh.close()
                seconds = time.perf_counter() - t0
                text = log.read_text(errors="replace")
                if proc.returncode:
                    status = "failed"
                elif "didn't change, skipping" in text and "Running stage" not in text:
                    status = "unchanged"
                else:
                    status = "ok"
                result[s] = {"status": status, "seconds": seconds, "exit": proc.returncode,
                             "cpus": list(cpus) if cpus else None}
                mark = {"ok": "✓", "unchanged": "=", "failed": "✗"}[status]
                echo(f"[{_fmt(time.perf_counter() - t_start):>7}] {mark} {s} {status} in {_fmt(seconds)}")
                if status == "failed":
                    tail = [ln for ln in re.split(r"[\r\n]", text) if ln.strip()][-15:]
                    echo("\n".join(f"      | {ln}" for ln in tail))
    except KeyboardInterrupt:  # stop every running stage, command included (dvc does not pass SIGTERM on to it)
        for s, (proc, *_rest) in running.items():
            _signal_group(proc, signal.SIGTERM)
        for s, (proc, _, fh, *_rest) in running.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            fh.close()
        raise
    finally:
        restore()
    result["_wall_seconds"] = time.perf_counter() - t_start
    return result


def _terminate_as_interrupt():
    """SIGTERM (``kill``, a Prefect cancellation, a CI timeout) stops the stages as Ctrl-C does; returns the undo.
    Only the main thread may set handlers: elsewhere nothing changes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, before)


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
    result = run(root, p, args.jobs, logs, pin=not args.no_pin)
    text = summary(result, args.jobs)
    print(text)
    (logs / "summary.json").write_text(json.dumps({"jobs": args.jobs, "stages": result}, indent=2, sort_keys=True))
    failed = [s for s, r in result.items() if not s.startswith("_") and r["status"] in ("failed", "skipped")]
    if failed:
        print("repro FAILED: " + ", ".join(sorted(failed)))
        return 1
    return 0
