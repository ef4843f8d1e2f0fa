"""The Prefect flows under ``prefect_test_harness`` with fake stage commands.

The ML stages are replaced by a small script (same command-line contract: ``<stage>`` writes ``metrics/<stage>.json``,
the gate exits 1 with ``passed: false`` when its policy fails, export writes ``artifacts/release`` with a manifest);
promotion runs the real ``anyflow promote`` against the local store. What is asserted: a passing gate promotes
exactly one release; a failing gate (forced by a stricter policy) promotes nothing and does not even export;
the release flow refuses a stale candidate and rolls back; shards are mapped as separate task runs; metrics and the
step-scaling plot are published as artefacts. Continued training: the domain stage is its own gate (a stricter
forgetting tolerance fails it → nothing exported or promoted), its stages are addressed in the second pipeline
``continued/dvc.yaml`` and the domain release (``artifacts/release_domain``) is what gets promoted.
"""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tasks/ and flows/ live at the repository root
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow

FAKE_STAGE = textwrap.dedent('''
    """Stands in for `anyflow <stage>` / `dvc repro -s <stage>` in flow tests."""
    import hashlib, json, sys, pathlib, yaml
    args = sys.argv[1:]
    root = pathlib.Path(".")
    (root / "metrics").mkdir(exist_ok=True)
    log = root / "calls.log"
    with open(log, "a") as f:  # O_APPEND: the shard tasks run side by side (a read-then-write lost one's line)
        f.write(" ".join(args) + "\\n")
    stage = args[0].rsplit(":", 1)[-1]  # `continued/dvc.yaml:domain` when the fake stands in for `dvc repro`
    if stage == "record":
        sys.exit(0)
    if stage == "synthesize" and "--shard" in args:
        i, n = args[args.index("--shard") + 1].split("/")
        (root / "artifacts/data").mkdir(parents=True, exist_ok=True)
        (root / f"artifacts/data/shard-{i}.txt").write_text(f"{i}/{n}")
        sys.exit(0)
    if stage == "gate":
        tol = yaml.safe_load((root / "params.yaml").read_text())["gate"]["policy"]["total_tolerance"]
        teacher, total4 = 0.80, 0.79
        passed = total4 >= teacher - tol
        (root / "metrics/gate.json").write_text(json.dumps(
            {"passed": passed, "total": {"nfe_1": 0.7, "nfe_4": total4}, "teacher_total": teacher}))
        (root / "artifacts/gate").mkdir(parents=True, exist_ok=True)
        (root / "artifacts/gate/step_scaling.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + b"0" * 64)
        if not passed:
            print("gate FAILED: total@4 below teacher - tolerance", file=sys.stderr)
        sys.exit(0 if passed else 1)
    if stage == "domain":
        tol = yaml.safe_load((root / "params.yaml").read_text())["domain"]["forgetting_tolerance"]
        drop = 0.03  # base-domain Total lost by the adaptation
        passed = drop <= tol
        (root / "metrics/domain.json").write_text(json.dumps(
            {"passed": passed, "failed": [] if passed else ["forgetting@4"], "forgetting": {"4": drop}}))
        if not passed:
            print("domain gate FAILED: forgetting@4", file=sys.stderr)
        sys.exit(0 if passed else 1)
    if stage in ("export", "export_domain"):
        rel = root / ("artifacts/release" if stage == "export" else "artifacts/release_domain")
        rel.mkdir(parents=True, exist_ok=True)
        runs = len(log.read_text().splitlines())
        data = f"onnx-weights-{runs}".encode() * 100
        (rel / "transformer.onnx").write_bytes(data)
        gate = json.loads((root / ("metrics/gate.json" if stage == "export" else "metrics/domain.json")).read_text())
        manifest = {"files": [{"path": "transformer.onnx", "sha256": hashlib.sha256(data).hexdigest(),
                               "size": len(data)}], "git_sha": "feedbeef%04d" % runs,
                    "dvc_lock_digest": "0" * 64, "gate": {"passed": gate["passed"]}}
        (rel / "manifest.json").write_text(json.dumps(manifest))
        (root / f"metrics/{stage}.json").write_text(json.dumps({"gate_passed": gate["passed"]}))  # export_domain.json
        sys.exit(0)
    (root / f"metrics/{stage}.json").write_text(json.dumps({"loss": 0.1, "steps": 3}))
''')

DVC_YAML = {"stages": {
    "stage1": {"cmd": "anyflow stage1", "metrics": [{"metrics/stage1.json": {"cache": False}}]},
    "gate": {"cmd": "anyflow gate", "metrics": [{"metrics/gate.json": {"cache": False}}],
             "plots": ["artifacts/gate/step_scaling.png"]},
}}


def _repo(tmp_path: Path, tolerance: float) -> Path:
    (tmp_path / "fake_stage.py").write_text(FAKE_STAGE)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    _params(tmp_path, tolerance)
    return tmp_path


def _params(repo: Path, tolerance: float, forgetting_tolerance: float = 0.05) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(
        {"profile": "toy", "store": {"backend": "local", "local_root": "registry"},
         "gate": {"policy": {"total_tolerance": tolerance}},
         "domain": {"forgetting_tolerance": forgetting_tolerance}}))


def _fake_commands(repo: Path):
    from tasks.commands import Commands

    fake = [sys.executable, str(repo / "fake_stage.py")]
    return Commands(stage=[*fake, "{stage}"], shard=[*fake, "synthesize", "--shard", "{shard}"],
                    finalise=[*fake, "{stage}"], record=[*fake, "record", "{stage}"])


def _latest(repo: Path):
    p = repo / "registry/latest"
    return p.read_text().strip() if p.exists() else None


def test_distill_promotes_exactly_when_the_gate_passes(tmp_path, prefect_harness):
    from flows.distill import distill

    repo = _repo(tmp_path, tolerance=0.02)
    cmds = _fake_commands(repo)

    first = distill(repo=str(repo), num_shards=2, release_name="good1", cmds=cmds)
    assert first["gate"]["passed"] is True and first["promoted"] == "good1"
    assert _latest(repo) == "good1" and (repo / "registry/releases/good1/transformer.onnx").exists()
    calls = (repo / "calls.log").read_text().splitlines()
    assert sorted(c for c in calls if "--shard" in c) == ["synthesize --shard 0/2", "synthesize --shard 1/2"]
    assert calls[2:] == ["synthesize", "record synthesize", "stage1", "stage1_consistency", "stage2", "fvd_net",
                         "gate_reference", "gate_baseline", "gate_sanity", "gate", "export"]

    # second run: a stricter policy makes the gate fail -> not a crash, nothing exported, nothing promoted
    _params(repo, tolerance=-1.0)
    release_before = (repo / "artifacts/release/manifest.json").read_text()
    second = distill(repo=str(repo), release_name="bad1", cmds=cmds)
    assert second["promoted"] is None and second["gate"]["passed"] is False
    assert (repo / "calls.log").read_text().splitlines()[-1] == "gate"  # export never ran
    assert (repo / "artifacts/release/manifest.json").read_text() == release_before
    assert _latest(repo) == "good1"
    assert sorted(p.name for p in (repo / "registry/releases").iterdir()) == ["good1"]
    assert not (repo / "registry/candidates/bad1").exists()

    # artefacts: metrics table + markdown for the stages, the step-scaling plot for the gate
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(limit=200)}
    assert {"stage1-metrics", "stage1-summary", "gate-metrics", "gate-summary", "gate-step-scaling"} <= keys


def test_release_flow_refuses_stale_candidate_and_rolls_back(tmp_path, prefect_harness):
    from flows.release import release

    repo = _repo(tmp_path, tolerance=0.02)
    cmds = _fake_commands(repo)
    for name in ("r1", "r2"):
        for stage in ("gate", "export"):
            assert __import__("subprocess").run([*cmds.stage[:-1], stage], cwd=repo).returncode == 0
        assert release(repo=str(repo), action="promote", name=name, cmds=cmds)["promoted"] == name
    assert _latest(repo) == "r2"
    out = release(repo=str(repo), action="rollback", name="r1", cmds=cmds)
    assert out["latest"] == "r1" and _latest(repo) == "r1"

    # a later gate run failed: artifacts/release is stale (its manifest still says passed) -> refused
    (repo / "metrics/gate.json").write_text(json.dumps({"passed": False}))
    refused = release(repo=str(repo), action="promote", name="r3", cmds=cmds)
    assert refused["promoted"] is None and "stale" in refused["reason"]
    assert _latest(repo) == "r1" and not (repo / "registry/releases/r3").exists()


def test_gate_crash_fails_the_flow_instead_of_reading_as_not_promoted(tmp_path, prefect_harness):
    from prefect import flow

    from tasks.commands import Commands
    from tasks.stages import run_gate

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/gate.json").write_text(json.dumps({"passed": True}))  # stale verdict of an older run
    crash = Commands(stage=[sys.executable, "-c", "import sys; print('Traceback: boom'); sys.exit(1)"])

    @flow
    def only_gate():
        return run_gate(str(tmp_path), crash)

    state = only_gate(return_state=True)
    assert state.is_failed()
    assert "without a fresh verdict" in str(state.result(raise_on_failure=False))


def test_continued_training_promotes_the_domain_release_only_when_the_domain_gate_passes(tmp_path, prefect_harness):
    from flows.continued_training import continued_training

    repo = _repo(tmp_path, tolerance=0.02)
    cmds = _fake_commands(repo)

    first = continued_training(repo=str(repo), release_name="dom1", cmds=cmds)
    assert first["gate"]["passed"] is True and first["promoted"] == "dom1"
    # the stages are addressed in the second pipeline; the distillation release is never touched
    assert (repo / "calls.log").read_text().splitlines() == ["continued/dvc.yaml:encode_clips",
                                                             "continued/dvc.yaml:domain",
                                                             "continued/dvc.yaml:export_domain"]
    assert not (repo / "artifacts/release").exists()
    promoted = repo / "registry/releases/dom1/transformer.onnx"
    assert promoted.read_bytes() == (repo / "artifacts/release_domain/transformer.onnx").read_bytes()
    assert _latest(repo) == "dom1"

    # a stricter forgetting tolerance fails the domain gate: a verdict, not a crash; no export, no promotion
    _params(repo, tolerance=0.02, forgetting_tolerance=0.01)
    release_before = (repo / "artifacts/release_domain/manifest.json").read_text()
    second = continued_training(repo=str(repo), release_name="dom2", cmds=cmds)
    assert second["promoted"] is None and second["gate"]["passed"] is False
    assert second["gate"]["metrics"]["failed"] == ["forgetting@4"]
    assert (repo / "calls.log").read_text().splitlines()[-1] == "continued/dvc.yaml:domain"  # export never ran
    assert (repo / "artifacts/release_domain/manifest.json").read_text() == release_before
    assert _latest(repo) == "dom1" and sorted(p.name for p in (repo / "registry/releases").iterdir()) == ["dom1"]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(limit=200)}
    assert {"domain-metrics", "export-domain-metrics"} <= keys


def test_continued_training_runs_the_encode_clips_stage_before_domain(tmp_path, prefect_harness):
    """encode_clips=True (default) runs continued/dvc.yaml:encode_clips (a stage of the repository's pipeline, the
    one domain depends on) before domain; encode_clips=False goes straight to domain."""
    from flows.continued_training import ENCODE_STAGE, PIPELINE, continued_training

    stages = yaml.safe_load((ROOT / PIPELINE).read_text())["stages"]
    assert list(stages)[:2] == ["encode_clips", "domain"] and ENCODE_STAGE == f"{PIPELINE}:encode_clips"
    assert stages["encode_clips"]["outs"] == ["artifacts/domain_data"]
    assert "artifacts/domain_data" in stages["domain"]["deps"]

    repo = _repo(tmp_path, tolerance=0.02)
    continued_training(repo=str(repo), release_name="e1", cmds=_fake_commands(repo))
    assert (repo / "calls.log").read_text().splitlines()[:2] == [ENCODE_STAGE, f"{PIPELINE}:domain"]
    (repo / "calls.log").write_text("")
    continued_training(repo=str(repo), encode_clips=False, release_name="e2", cmds=_fake_commands(repo))
    assert (repo / "calls.log").read_text().splitlines() == [f"{PIPELINE}:domain", f"{PIPELINE}:export_domain"]


def test_continued_training_through_real_dvc_repro_of_the_second_pipeline(tmp_path, prefect_harness):
    """Default command path: `dvc repro --single-item continued/dvc.yaml:<stage>` on a second pipeline whose stages
    run from the repository root (wdir ..). Only continued/dvc.lock is written (the root pipeline never runs); a
    failing domain gate exits non-zero through DVC and promotes nothing."""
    import subprocess

    from flows.continued_training import continued_training
    from tasks.commands import Commands

    repo = _repo(tmp_path, tolerance=0.02)
    fake = f"{sys.executable} fake_stage.py"
    stages = {"encode_clips": {"wdir": "..", "cmd": f"{fake} encode_clips", "deps": ["fake_stage.py"],
                               "params": ["profile"], "outs": ["metrics/encode_clips.json"]},
              "domain": {"wdir": "..", "cmd": f"{fake} domain",
                         "deps": ["fake_stage.py", "metrics/encode_clips.json"],
                         "params": ["domain.forgetting_tolerance"],
                         "metrics": [{"metrics/domain.json": {"cache": False}}]},
              "export_domain": {"wdir": "..", "cmd": f"{fake} export_domain", "deps": ["metrics/domain.json"],
                                "outs": ["artifacts/release_domain"]}}
    (repo / "continued").mkdir()
    (repo / "continued/dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)

    cmds = Commands(anyflow=[sys.executable, "-m", "anyflow.cli"])  # default dvc templates
    first = continued_training(repo=str(repo), release_name="dvcdom1", cmds=cmds)
    assert first["promoted"] == "dvcdom1" and _latest(repo) == "dvcdom1"
    assert set(yaml.safe_load((repo / "continued/dvc.lock").read_text())["stages"]) == {"encode_clips", "domain",
                                                                                        "export_domain"}
    assert not (repo / "dvc.lock").exists() and not (repo / "metrics/stage1.json").exists()
    assert (repo / "artifacts/release_domain/manifest.json").exists()  # paths resolved from the root (wdir ..)

    _params(repo, tolerance=0.02, forgetting_tolerance=0.01)
    (repo / "calls.log").write_text("")
    second = continued_training(repo=str(repo), release_name="dvcdom2", cmds=cmds)
    assert second["promoted"] is None and second["gate"]["passed"] is False
    assert (repo / "calls.log").read_text().split() == ["domain"]  # encode_clips unchanged: DVC skipped it
    assert _latest(repo) == "dvcdom1" and not (repo / "registry/releases/dvcdom2").exists()
