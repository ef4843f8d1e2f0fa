"""``anyflow repro --jobs 2`` on a small real DVC project: independent stages overlap in time, a stage starts only
after the stages it depends on ended, a failure skips exactly its downstream stages, and dvc.lock ends up as
``dvc repro`` leaves it (every successful stage up to date; a second run changes nothing)."""

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


def sh(args, cwd, check=True):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=check)


@pytest.fixture
def project(tmp_path):
    sh(["git", "init", "-q"], tmp_path)
    sh([str(BIN / "dvc"), "init", "-q"], tmp_path)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    return tmp_path


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


def test_exclusive_stages_run_alone(project):
    """A benchmark (``meta: {exclusive: true}``) neither starts beside another stage nor lets one start beside it,
    even with a free job and ready work on both sides."""
    (project / "dvc.yaml").write_text(DVC_YAML.split("  bad:")[0] + """\
  bench:
    cmd: date +%s.%N > bench.start && sleep 2 && date +%s.%N > bench.txt
    outs: [bench.txt]
    meta: {exclusive: true}
""")
    sh([str(BIN / "anyflow"), "repro", "--jobs", "2"], project)
    for other in ("a", "b", "c"):  # every other stage ran entirely before the benchmark or after it
        start, end = t(project, f"{other}.start"), t(project, f"{other}.txt")
        assert end <= t(project, "bench.start") or start >= t(project, "bench.txt"), other


def test_one_job_runs_stages_one_at_a_time(project):
    (project / "dvc.yaml").write_text(DVC_YAML.split("  bad:")[0])
    out = sh([str(BIN / "anyflow"), "repro", "--jobs", "1"], project)
    first, second = sorted(["a", "b"], key=lambda s: t(project, f"{s}.start"))
    assert t(project, f"{second}.start") >= t(project, f"{first}.txt"), out.stdout


def test_dry_run_lists_what_each_stage_waits_for(project):
    out = sh([str(BIN / "anyflow"), "repro", "--dry"], project)
    assert "c: after a, b" in out.stdout and "a: after nothing" in out.stdout
    assert not (project / "a.txt").exists()
