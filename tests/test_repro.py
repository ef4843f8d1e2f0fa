"""``anyflow repro --jobs 2`` on a small real DVC project: independent stages overlap in time, a stage starts only
after the stages it depends on ended, a failure skips exactly its downstream stages, and dvc.lock ends up as
``dvc repro`` leaves it (every successful stage up to date; a second run changes nothing)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DVC_YAML = """\
stages:
  a:
    cmd: date +%s.%N > a.start && sleep 3 && date +%s.%N > a.txt
    outs: [a.txt]
  b:
    cmd: date +%s.%N > b.start && sleep 3 && date +%s.%N > b.txt
    outs: [b.txt]
  c:
    cmd: date +%s.%N > c.start && cat a.txt b.txt > c.both && date +%s.%N > c.txt
    deps: [a.txt, b.txt]
    outs: [c.txt]
  bad:
    cmd: echo boom-from-bad && exit 3
    deps: [a.txt]
    outs: [bad.txt]
  after_bad:
    cmd: cat bad.txt > z.txt
    deps: [bad.txt]
    outs: [z.txt]
  aa_last:
    cmd: cat z.txt > last.txt
    deps: [z.txt]
    outs: [last.txt]
"""


# DVC_YAML's a, b and c with shorter sleeps, for the tests that run the stages through FAKE_DVC (no dvc start-up
# jitter to outlast)
FAST_YAML = DVC_YAML.split("  bad:")[0].replace("sleep 3", "sleep 1.5")


def sh(args, cwd, check=True, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=check, env=env)


FAKE_DVC = '''#!{python}
"""Stands in for ``dvc`` in the scheduling tests: ``dvc --wait-for-lock repro --single-item <stage>`` runs the
stage's cmd from dvc.yaml in a shell, as dvc would, without dvc's own start-up and bookkeeping (2-3 s a stage on the
CI machine, most of these tests' time). The plan still comes from DVC's own graph."""
import subprocess, sys, yaml
stage = sys.argv[-1]
cmd = yaml.safe_load(open("dvc.yaml"))["stages"][stage]["cmd"]
print(f"Running stage '{{stage}}':", flush=True)
sys.exit(subprocess.call(cmd, shell=True))
'''


@pytest.fixture(scope="module")
def _initialised(tmp_path_factory):
    root = tmp_path_factory.mktemp("initialised")
    sh(["git", "init", "-q"], root)
    sh([str(BIN / "dvc"), "init", "-q"], root)
    return root


@pytest.fixture
def project(tmp_path, _initialised):
    """A git + DVC repository with DVC_YAML (one ``dvc init`` per module, copied: 2 s a test on the CI machine)."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(_initialised, root, symlinks=True)
    (root / "dvc.yaml").write_text(DVC_YAML)
    return root


@pytest.fixture
def fake_dvc(tmp_path_factory):
    """The environment for ``anyflow repro`` with :data:`FAKE_DVC` first on PATH: for the tests of the runner's
    scheduling (order, slots, pinning); the real DVC runs the stages in the tests of what DVC records."""
    bindir = tmp_path_factory.mktemp("fake_dvc")
    exe = bindir / "dvc"
    exe.write_text(FAKE_DVC.format(python=sys.executable))
    exe.chmod(0o755)
    return dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def t(root: Path, name: str) -> float:
    return float((root / name).read_text().split()[0])


def test_parallel_stages_respect_the_graph_and_failures(project):
    out = sh([str(BIN / "anyflow"), "repro", "--jobs", "2"], project, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    # a and b ran side by side; c only after both ended
    assert t(project, "b.start") < t(project, "a.txt") and t(project, "a.start") < t(project, "b.txt")
    assert t(project, "c.start") >= max(t(project, "a.txt"), t(project, "b.txt"))
    # the failure is reported with its log, skips its downstream stage, and does not stop c
    assert "✗ bad failed" in out.stdout and "boom-from-bad" in out.stdout
    assert "after_bad: skipped (bad did not succeed)" in out.stdout
    # two stages downstream, listed before its failed parent (a stage once started here: make demo's bench_latency)
    assert "aa_last: skipped (after_bad did not succeed)" in out.stdout and "▶ aa_last" not in out.stdout
    assert not (project / "z.txt").exists() and (project / "c.txt").exists()
    assert "repro FAILED: aa_last, after_bad, bad" in out.stdout
    # dvc.lock as after dvc repro: the successful stages are up to date
    status = sh([str(BIN / "dvc"), "status", "a", "b", "c"], project)
    assert "up to date" in status.stdout, status.stdout
    # a second run re-runs nothing that succeeded (DVC skips it) and fails the same way
    again = sh([str(BIN / "anyflow"), "repro", "--jobs", "2", "c"], project)
    assert "= a unchanged" in again.stdout and "= c unchanged" in again.stdout, again.stdout


CPUS = "grep Cpus_allowed_list /proc/$$/status | cut -f2 > {s}.cpus"  # the CPUs the stage's shell may run on
BENCH = """\
  bench:
    cmd: date +%s.%N > bench.start && {cpus} && sleep 1 && date +%s.%N > bench.txt
    outs: [bench.txt]
    meta: {{exclusive: true}}
""".format(cpus=CPUS.format(s="bench"))


def _cpus(root: Path, name: str) -> set[int]:
    out = set()
    for part in (root / f"{name}.cpus").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def test_exclusive_stages_run_alone_unpinned(project, fake_dvc):
    """Unpinned (``--no-pin``), a benchmark (``meta: {exclusive: true}``) neither starts beside another stage nor
    lets one start beside it, even with a free job and ready work on both sides."""
    (project / "dvc.yaml").write_text(FAST_YAML + BENCH)
    sh([str(BIN / "anyflow"), "repro", "--jobs", "2", "--no-pin"], project, env=fake_dvc)
    for other in ("a", "b", "c"):  # every other stage ran entirely before the benchmark or after it
        start, end = t(project, f"{other}.start"), t(project, f"{other}.txt")
        assert end <= t(project, "bench.start") or start >= t(project, "bench.txt"), other


PINNED = """\
stages:
  a:
    cmd: date +%s.%N > a.start && {a} && sleep 1.5 && date +%s.%N > a.txt
    outs: [a.txt]
  b:
    cmd: date +%s.%N > b.start && {b} && sleep 1.5 && date +%s.%N > b.txt
    outs: [b.txt]
  c:
    cmd: date +%s.%N > c.start && {c} && sleep 0.5 && date +%s.%N > c.txt
    deps: [a.txt, b.txt]
    outs: [c.txt]
  q:
    cmd: date +%s.%N > q.start && {q} && sleep 2 && date +%s.%N > q.txt
    deps: [a.txt]
    outs: [q.txt]
    meta: {{quiet: true}}
  bench1:
    cmd: date +%s.%N > bench1.start && {bench1} && sleep 1 && date +%s.%N > bench1.txt
    outs: [bench1.txt]
    meta: {{exclusive: true}}
  bench2:
    cmd: date +%s.%N > bench2.start && {bench2} && sleep 1 && date +%s.%N > bench2.txt
    outs: [bench2.txt]
    meta: {{exclusive: true}}
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pinning needs Linux and at least 2 CPUs")
def test_stages_are_pinned_and_benchmarks_run_beside_benchmarks_and_quiet_stages_only(project, fake_dvc):
    """Pinned (the default), every stage runs on the CPUs of its slots. The benchmarks, ready from the start, start
    only after every other ready stage; never beside a stage that is neither a benchmark nor quiet (a, b, c), but
    beside the quiet one and each other, on CPUs the stage beside them cannot use."""
    names = ("a", "b", "c", "q", "bench1", "bench2")
    (project / "dvc.yaml").write_text(PINNED.format(**{s: CPUS.format(s=s) for s in names}))
    out = sh([str(BIN / "anyflow"), "repro", "--jobs", "2"], project, env=fake_dvc)
    assert _overlap(project, "a", "b") and _cpus(project, "a").isdisjoint(_cpus(project, "b")), out.stdout
    for bench in ("bench1", "bench2"):
        for loud in ("a", "b", "c"):
            assert not _overlap(project, bench, loud), (bench, loud, out.stdout)
    pairs = [(x, y) for x, y in (("bench1", "q"), ("bench2", "q"), ("bench1", "bench2")) if _overlap(project, x, y)]
    assert pairs, out.stdout  # the point of pinning: a benchmark shared the machine
    for x, y in pairs:
        assert _cpus(project, x).isdisjoint(_cpus(project, y)), (x, y, out.stdout)
    for s in names:
        assert len(_cpus(project, s)) == len(os.sched_getaffinity(0)) // 2, s


def test_cpu_slots_split_the_cpus_evenly():
    from anyflow.stages.repro import cpu_slots

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    slots = cpu_slots(1)
    if not hasattr(os, "sched_setaffinity"):
        assert slots is None
        return
    assert slots == [tuple(cpus)]
    assert cpu_slots(len(cpus) + 1) is None  # fewer CPUs than slots: not pinned
    two = cpu_slots(2) if len(cpus) >= 2 else None
    if two:
        assert set(two[0]).isdisjoint(two[1]) and len(two[0]) == len(two[1]) == len(cpus) // 2


def test_one_job_runs_stages_one_at_a_time(project, fake_dvc):
    (project / "dvc.yaml").write_text(FAST_YAML)
    out = sh([str(BIN / "anyflow"), "repro", "--jobs", "1"], project, env=fake_dvc)
    first, second = sorted(["a", "b"], key=lambda s: t(project, f"{s}.start"))
    assert t(project, f"{second}.start") >= t(project, f"{first}.txt"), out.stdout


def test_dry_run_lists_what_each_stage_waits_for(project):
    out = sh([str(BIN / "anyflow"), "repro", "--dry"], project)
    assert "c: after a, b" in out.stdout and "a: after nothing" in out.stdout
    assert not (project / "a.txt").exists()


def _overlap(root: Path, x: str, y: str) -> bool:
    return t(root, f"{x}.start") < t(root, f"{y}.txt") and t(root, f"{y}.start") < t(root, f"{x}.txt")


def test_a_stage_takes_as_many_slots_as_its_threads(project, fake_dvc, monkeypatch):
    """``meta: {threads: 2}`` (a 2-thread stage) takes both of 2 slots: nothing runs beside it, though a 1-thread
    stage is ready the whole time; two 1-thread stages still share the slots, and one that fits starts while a wider
    one waits for room (w waits on a, b runs beside a)."""
    (project / "dvc.yaml").write_text("""\
stages:
  wide:
    cmd: date +%s.%N > wide.start && sleep 1 && date +%s.%N > wide.txt
    outs: [wide.txt]
    meta: {threads: 2}
  a:
    cmd: date +%s.%N > a.start && sleep 2 && date +%s.%N > a.txt
    deps: [wide.txt]
    outs: [a.txt]
  b:
    cmd: date +%s.%N > b.start && sleep 1 && date +%s.%N > b.txt
    outs: [b.txt]
  w:
    cmd: date +%s.%N > w.start && sleep 1 && date +%s.%N > w.txt
    deps: [wide.txt]
    outs: [w.txt]
    meta: {threads: 2}
  z:
    cmd: date +%s.%N > z.start && date +%s.%N > z.txt
    deps: [a.txt, w.txt]
    outs: [z.txt]
""")
    out = sh([str(BIN / "anyflow"), "repro", "--jobs", "2"], project, env=fake_dvc)
    for one in ("a", "b"):
        assert not _overlap(project, "wide", one), out.stdout
    assert not _overlap(project, "w", "a") and not _overlap(project, "w", "b"), out.stdout
    assert t(project, "wide.start") < t(project, "b.start")  # the longer chain first, b after it
    from anyflow.stages.repro import plan

    bad = project / "dvc.yaml"
    bad.write_text(bad.read_text().replace("meta: {threads: 2}", "meta: {threads: 0}", 1))
    monkeypatch.chdir(project)
    with pytest.raises(ValueError, match="stage 'wide': meta.threads must be an integer >= 1"):
        plan(project, ["dvc.yaml"])


def test_meta_threads_match_the_stages_threads_params():
    """dvc.yaml's scheduling hint and the thread count the stage runs on (its params) are one number: a 2-thread
    stage scheduled as 1 slot would run beside another and slow both, one scheduled as 2 on 1 thread idles a core."""
    import yaml

    from anyflow.config import load

    root = Path(__file__).resolve().parents[1]
    cfg = load(root / "params.yaml")
    section = {"teacher": "teacher", "synthesize": "synthesize", "stage2": "stage2", "far_stage2": "stage2"}
    seen = set()
    for dvc_yaml in ("dvc.yaml", "far/dvc.yaml"):
        stages = yaml.safe_load((root / dvc_yaml).read_text())["stages"]
        for name, stage in stages.items():
            if name in section:
                seen.add(name)
                assert (stage.get("meta") or {}).get("threads", 1) == getattr(cfg, section[name]).threads, name
    assert seen == set(section)


def test_on_a_tie_the_wider_stage_starts_first(project, fake_dvc):
    """Equal chains after them: the 2-thread stage starts before the 1-thread one (alphabetically first), which
    would otherwise take a slot and make the wide stage wait for it (the toy's synthesize and fvd_net)."""
    (project / "dvc.yaml").write_text("""\
stages:
  a_narrow:
    cmd: date +%s.%N > a_narrow.start && sleep 1 && date +%s.%N > a_narrow.txt
    outs: [a_narrow.txt]
  b_wide:
    cmd: date +%s.%N > b_wide.start && sleep 1 && date +%s.%N > b_wide.txt
    outs: [b_wide.txt]
    meta: {threads: 2}
""")
    out = sh([str(BIN / "anyflow"), "repro", "--jobs", "2"], project, env=fake_dvc)
    assert t(project, "b_wide.txt") <= t(project, "a_narrow.start"), out.stdout


def test_the_longest_chain_in_minutes_starts_first(project, monkeypatch):
    """``meta: {minutes: m}`` weighs a stage in the order: a 5-minute stage with nothing after it before a chain of three 1-minute stages; without the
    hint the longer chain of stages first."""
    (project / "dvc.yaml").write_text("""\
stages:
  long:
    cmd: date +%s.%N > long.txt
    outs: [long.txt]
    meta: {minutes: 5}
  s1:
    cmd: date +%s.%N > s1.txt
    outs: [s1.txt]
  s2:
    cmd: cat s1.txt > s2.txt
    deps: [s1.txt]
    outs: [s2.txt]
  s3:
    cmd: cat s2.txt > s3.txt
    deps: [s2.txt]
    outs: [s3.txt]
""")
    from anyflow.stages.repro import plan

    monkeypatch.chdir(project)  # DVC resolves the targets from the working directory, as the CLI does

    def first() -> str:  # the stage that starts first when all are ready (the runner's and --dry's order)
        p = plan(project, ["dvc.yaml"])
        return min(p.deps, key=lambda s: (-p.priority[s], -p.threads.get(s, 1), s))

    assert first() == "long"
    hinted = project / "dvc.yaml"
    hinted.write_text(hinted.read_text().replace("meta: {minutes: 5}", "meta: {minutes: 1}"))
    assert first() == "s1"
    hinted.write_text(hinted.read_text().replace("meta: {minutes: 1}", "meta: {minutes: 0}"))
    with pytest.raises(ValueError, match="stage 'long': meta.minutes must be a number > 0"):
        first()


def _alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped by whoever adopted it, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupting_the_runner_stops_the_stage_commands_too(project, sig):
    """Ctrl-C (SIGINT) or SIGTERM (kill, a Prefect cancellation) on ``anyflow repro`` ends the running stages'
    commands, not only their ``dvc`` processes: a command left running would hold its core (and its outputs) after
    the runner exited."""
    import signal
    import time

    def default_sigint():  # a background job of a non-interactive shell (`make test &`) starts with SIGINT ignored,
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # and Python keeps it so: give the runner a terminal's

    (project / "dvc.yaml").write_text("""\
stages:
  slow:
    cmd: sleep 120 & echo $! > child.pid; wait
    outs: [never.txt]
""")
    runner = subprocess.Popen([str(BIN / "anyflow"), "repro", "--jobs", "1"], cwd=project, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)
    pid_file = project / "child.pid"
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    child = int(pid_file.read_text())
    os.kill(child, 0)  # running
    runner.send_signal(getattr(signal, sig))
    runner.wait(timeout=60)
    deadline = time.time() + 10
    while time.time() < deadline:
        if not _alive(child):
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"the stage's command (pid {child}) outlived the runner")
