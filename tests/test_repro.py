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


def _overlap(root: Path, x: str, y: str) -> bool:
    return t(root, f"{x}.start") < t(root, f"{y}.txt") and t(root, f"{y}.start") < t(root, f"{x}.txt")


def test_a_stage_takes_as_many_slots_as_its_threads(project):
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
    out = sh([str(BIN / "anyflow"), "repro", "--jobs", "2"], project)
    for one in ("a", "b"):
        assert not _overlap(project, "wide", one), out.stdout
    assert not _overlap(project, "w", "a") and not _overlap(project, "w", "b"), out.stdout
    assert t(project, "wide.start") < t(project, "b.start")  # the longer chain first, b after it
    bad = project / "dvc.yaml"
    bad.write_text(bad.read_text().replace("meta: {threads: 2}", "meta: {threads: 0}", 1))
    out = sh([str(BIN / "anyflow"), "repro", "--dry"], project, check=False)
    assert out.returncode != 0 and "stage 'wide': meta.threads must be an integer >= 1" in out.stdout + out.stderr


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


def test_on_a_tie_the_wider_stage_starts_first(project):
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
    out = sh([str(BIN / "anyflow"), "repro", "--jobs", "2"], project)
    assert t(project, "b_wide.txt") <= t(project, "a_narrow.start"), out.stdout
