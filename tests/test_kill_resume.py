"""SIGKILL mid-run, then re-run: synthesis, stage 2, the gate, export, promote, encode-clips and domain end with
outputs equal to an uninterrupted run (tensors bit-identical, reports equal apart from timings), a stage with a
resume path resumes, and what a killed run leaves behind is never accepted as a finished artefact.

Each stage runs as ``anyflow --params params.yaml <stage>`` in a process of its own (tests/kill_child.py: forked from
a forkserver that imported torch/diffusers once) inside a temporary workspace (relative ``artifacts/``,
``metrics/``, ``plots/``, ``checkpoints/``, ``registry/``). The reference workspace runs the stages uninterrupted
(module-scoped, each stage once); every test copies the stage's inputs from it into a fresh workspace, kills the
stage at a deterministic point (the child blocks at a hooked call and writes a marker; the test then SIGKILLs it),
checks what is on disk, re-runs the stage to completion and compares with the reference.

Forked children share the forkserver's str-hash seed, so a set-order difference between two fresh interpreters
would not show here (reports are written with sorted keys). Geometry: the random tiny teacher of tests/export_fixtures.py (latents 8×5×8×8), a random rank-4 stage-1 adapter.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # ~30 s of shared setup (tiny teacher, forkserver imports), then 1-20 s a stage

TESTS = Path(__file__).parent
TIMING = ("stored_at", "at", "rss_growth_two_extra_copies_bytes")  # + every key naming seconds
OVERRIDES = {
    "video": {"num_frames": 9, "height": 32, "width": 32},
    "model": {"max_text_len": 16},
    "student": {"lora_rank": 4, "lora_alpha": 4.0},
    "synthesize": {"num_samples": 4, "samples_per_shard": 1, "batch_size": 1, "steps": 2, "threads": 1},
    "stage2": {"max_steps": 4, "ckpt_every": 2, "batch_size": 1, "log_every": 1, "num_steps_choices": [1, 2],
               "threads": 1},  # 1: pytest-xdist runs 2 workers on 2 cores
    "gate": {"nfes": [1, 4], "teacher_steps": 2, "num_prompts": 1, "seeds_per_prompt": 2, "num_previews": 1,
             "policy": {"total_tolerance": 1.0, "monotone_tolerance": 1.0,
                        "semantic_floors": {"color": 0.0, "shape": 0.0, "direction": 0.0}}},
    "export": {"components": []},  # merge + pipeline/ + manifest; an ONNX export costs ~25 s a run here
    "domain": {"num_samples": 2, "max_steps": 4, "ckpt_every": 2, "batch_size": 2, "log_every": 1,
               "forgetting_tolerance": 1.0},
    "store": {"local_root": "registry"},
}
# (argv after `anyflow --params params.yaml`, inputs copied from the reference, outputs compared)
STAGES = {
    "synthesize": (["synthesize"], ["artifacts/teacher"], ["artifacts/data", "metrics/synthesize.json"]),
    "stage2": (["stage2", "--eval-samples", "2", "--no-progress"], ["artifacts/teacher", "artifacts/stage1",
                                                                     "artifacts/data"],
               ["artifacts/stage2", "metrics/stage2.json", "plots/stage2_loss.csv"]),
    "gate": (["gate", "--no-progress"], ["artifacts/teacher", "artifacts/stage1", "artifacts/stage2"],
             ["artifacts/gate", "metrics/gate.json", "plots/gate_steps.csv"]),
    "export": (["export"], ["artifacts/teacher", "artifacts/stage1", "artifacts/stage2", "artifacts/gate",
                            "metrics/gate.json"], ["artifacts/release", "metrics/export.json"]),
    "promote": (["promote", "--name", "r1"], ["artifacts/release", "metrics/gate.json"], ["registry"]),
    "encode-clips": (["encode-clips"], ["artifacts/teacher"], ["artifacts/domain_data"]),
    "domain": (["domain", "--no-progress"], ["artifacts/teacher", "artifacts/stage1", "artifacts/stage2",
                                             "artifacts/data", "artifacts/domain_data"],
               ["artifacts/domain", "metrics/domain.json", "plots/domain_loss.csv"]),
}
ORDER = ["synthesize", "stage2", "gate", "export", "promote", "encode-clips", "domain"]


# ------------------------------------------------------------------------------------------------ processes
def start_forkserver():
    """A forkserver that imported tests/kill_child.py (torch, diffusers, every stage) with one-thread settings."""
    import multiprocessing.forkserver as fs

    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # Python 3.11's forkserver does not apply the parent's sys.path before its preload: find kill_child.py
           "PYTHONPATH": os.pathsep.join([str(TESTS)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["kill_child"])
        fs.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


@pytest.fixture(scope="module")
def forkserver():
    import multiprocessing.forkserver as fs

    yield start_forkserver()
    fs._forkserver._stop()  # frees its memory (torch + diffusers imported) for the rest of the session


def anyflow(ctx, ws: Path, stage: str, kill=None, timeout: float = 300):
    """Run ``anyflow <stage>`` in ``ws``; with ``kill`` = hooks, SIGKILL it at the hooked point. (rc, log text)."""
    import kill_child

    argv = ["--params", "params.yaml", *STAGES[stage][0]]
    log = ws / f"{stage}.{'killed' if kill else 'run'}.log"
    marker = ws / ".killpoint"
    marker.unlink(missing_ok=True)
    p = ctx.Process(target=kill_child.run_cli, args=(str(ws), argv, str(log), list(kill or []), str(marker)))
    p.start()
    deadline = time.monotonic() + timeout
    if kill:
        while not marker.exists():
            assert p.is_alive(), f"{stage} ended (rc {p.exitcode}) before its kill point:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{stage}: kill point not reached in {timeout} s"
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
        marker.unlink()
        assert p.exitcode == -signal.SIGKILL, p.exitcode
        return p.exitcode, log.read_text()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        pytest.fail(f"{stage}: still running after {timeout} s")
    return p.exitcode, log.read_text()


# ------------------------------------------------------------------------------------------------ workspaces
@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    return make_seed(tmp_path_factory.mktemp("kill_seed"))


def make_seed(root: Path) -> Path:
    """The tiny teacher WanPipeline + a random stage-1 adapter + params.yaml, built once (in this process)."""
    from export_fixtures import write_tiny_artifacts

    from anyflow.config import build, dump_yaml

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_tiny_artifacts(root)
    finally:
        torch.set_num_threads(threads)
    (root / "params.yaml").write_text(dump_yaml(build(OVERRIDES)))
    return root


def new_workspace(seed: Path, path: Path, copy_from: Path | None, inputs) -> Path:
    path.mkdir(parents=True)
    shutil.copy2(seed / "params.yaml", path / "params.yaml")
    for rel in inputs:
        src = (copy_from or seed) / rel
        if not src.exists():
            src = seed / rel
        dst = path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return path


class Reference:
    """One workspace running the stages uninterrupted, each once, in pipeline order, on first use."""

    def __init__(self, ctx, seed: Path, root: Path):
        self.ctx, self.ws, self.done = ctx, new_workspace(seed, root, None, ["artifacts/teacher",
                                                                           "artifacts/stage1"]), {}

    def run(self, stage: str) -> tuple[int, str]:
        needs = {"stage2": ["synthesize"], "gate": ["stage2"], "export": ["gate"], "promote": ["export"],
                 "encode-clips": [], "domain": ["stage2", "encode-clips"], "synthesize": []}
        for dep in needs[stage]:
            self.run(dep)
        if stage not in self.done:
            self.done[stage] = anyflow(self.ctx, self.ws, stage)
        return self.done[stage]


@pytest.fixture(scope="module")
def reference(forkserver, seed_dir, tmp_path_factory):
    return Reference(forkserver, seed_dir, tmp_path_factory.mktemp("kill_ref") / "ws")


def killed_workspace(reference: Reference, seed: Path, tmp_path: Path, stage: str) -> Path:
    reference.run(stage)
    return new_workspace(seed, tmp_path / "ws", reference.ws, STAGES[stage][1])


# ------------------------------------------------------------------------------------------------ comparisons
def drop_timings(x):
    if isinstance(x, dict):
        return {k: drop_timings(v) for k, v in x.items()
                if k not in TIMING and "seconds" not in k and k != "resumed"}
    if isinstance(x, list):
        return [drop_timings(v) for v in x]
    return x


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def assert_tensors_equal(a: Path, b: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys()), a
        assert fa.metadata() == fb.metadata(), a
        for k in fa.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), f"{a}: tensor {k} differs"


def assert_same_outputs(ref: Path, got: Path, rels) -> None:
    """Every output file of ``ref`` is in ``got`` (and no other visible file): tensors bit-identical, JSON equal
    apart from timings, CSVs equal apart from the seconds column, anything else byte-identical."""
    for rel in rels:
        a, b = ref / rel, got / rel
        assert b.exists(), f"{rel}: missing after the re-run"
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()) if a.is_dir() else [Path()]
        if a.is_dir():
            got_files = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
            assert got_files == files, f"{rel}: files differ: {set(got_files) ^ set(files)}"
        for f in files:
            fa, fb = a / f, b / f
            if fa.suffix == ".safetensors":
                assert_tensors_equal(fa, fb)
            elif fa.suffix == ".json":
                ja, jb = json.loads(fa.read_text()), json.loads(fb.read_text())
                if fa.name == "manifest.json" and "files" in ja:  # sha256 of safetensors files: bytes, not tensors
                    for j in (ja, jb):
                        j["files"] = [{k: v for k, v in e.items() if not (e["path"].endswith(".safetensors")
                                                                          and k in ("sha256", "size"))}
                                      for e in j["files"]]
                assert drop_timings(ja) == drop_timings(jb), f"{rel}/{f}"
            elif fa.suffix == ".csv":
                assert read_csv(fa) == read_csv(fb), f"{rel}/{f}"
            elif fa.suffix == ".md":
                pass  # summary tables carry the timings; the numbers come from report.json, compared above
            else:
                assert fa.read_bytes() == fb.read_bytes(), f"{rel}/{f}"


def leftovers(ws: Path) -> list[str]:
    """Temporary files/dirs an atomic write leaves when killed (hidden ``.name.*`` beside the target)."""
    return sorted(str(p.relative_to(ws)) for p in ws.rglob(".*") if p.name != ".killpoint")


def cfg_of(ws: Path):
    from anyflow.config import load

    return load(ws / "params.yaml", overrides={"paths.root": str(ws / "artifacts"),
                                                "paths.metrics": str(ws / "metrics"),
                                                "paths.plots": str(ws / "plots"),
                                                "paths.checkpoints": str(ws / "checkpoints")})


# ------------------------------------------------------------------------------------------------ the stages
def test_synthesize_killed_between_shard_and_sidecar_resumes(forkserver, reference, seed_dir, tmp_path):
    from anyflow.data.shards import ShardError, ShardSet
    from anyflow.stages import synthesize

    ws = killed_workspace(reference, seed_dir, tmp_path, "synthesize")
    # write_tensors: #1 the negative embedding, #2 shard 0, #3 shard 1 — killed before shard 1's sidecar
    anyflow(forkserver, ws, "synthesize", kill=[("anyflow.data.shards", "write_tensors", 3, "after")])
    data = ws / "artifacts/data"
    assert (data / "shard-00000.json").exists() and (data / "shard-00001.safetensors").exists()
    assert not (data / "shard-00001.json").exists() and not (data / "manifest.json").exists()
    assert synthesize._finished(data / "shard-00000.safetensors") is not None
    assert synthesize._finished(data / "shard-00001.safetensors") is None  # no sidecar: not finished
    with pytest.raises((ShardError, FileNotFoundError)):
        ShardSet(data).load_all()
    rc, log = anyflow(forkserver, ws, "synthesize")
    assert rc == 0, log[-3000:]
    m = json.loads((ws / "metrics/synthesize.json").read_text())
    assert (m["shards_skipped"], m["shards_written"], m["shards_total"]) == (1, 3, 4)  # resumed after shard 0
    assert_same_outputs(reference.ws, ws, STAGES["synthesize"][2][:1])
    ref_m = json.loads((reference.ws / "metrics/synthesize.json").read_text())
    assert (ref_m["shards_skipped"], ref_m["shards_written"]) == (0, 4)
    assert not leftovers(ws), leftovers(ws)


def test_stage2_killed_after_checkpoint_resumes(forkserver, reference, seed_dir, tmp_path):
    from anyflow.stages.common import StagePaths, resolve_adapter

    ws = killed_workspace(reference, seed_dir, tmp_path, "stage2")
    # checkpoint at step 2; killed inside step 3, after its generator step
    anyflow(forkserver, ws, "stage2", kill=[("anyflow.train.stage2", "Stage2Trainer.generator_step", 3, "after")])
    ckpt = torch.load(ws / "checkpoints/stage2/last.pt", weights_only=False)
    assert ckpt["step"] == 2
    assert not (ws / "artifacts/stage2").exists() and not (ws / "metrics/stage2.json").exists()
    with pytest.raises(FileNotFoundError):
        resolve_adapter(StagePaths.of(cfg_of(ws)), "stage2")
    rc, log = anyflow(forkserver, ws, "stage2")
    assert rc == 0, log[-3000:]
    assert "resumed stage 2 from checkpoints/stage2/last.pt at step 2" in log
    m = json.loads((ws / "metrics/stage2.json").read_text())
    assert m["resumed"] is True and m["steps"] == 4 and len(read_csv(ws / "plots/stage2_loss.csv")) == 4
    assert json.loads((reference.ws / "metrics/stage2.json").read_text())["resumed"] is False
    assert_same_outputs(reference.ws, ws, STAGES["stage2"][2])
    assert not (ws / "checkpoints/stage2/last.pt").exists()  # finished: no stale checkpoint
    assert not leftovers(ws), leftovers(ws)


def test_gate_killed_while_writing_its_report_dir(forkserver, reference, seed_dir, tmp_path):
    from anyflow.stages.export import gate_verdict

    ws = killed_workspace(reference, seed_dir, tmp_path, "gate")
    assert reference.run("gate")[0] == 0  # the loosened policy passes (so export/promote run their full path)
    # report.json is written inside the temporary directory; killed before the previews, i.e. before the swap
    anyflow(forkserver, ws, "gate", kill=[("anyflow.eval.report", "write_previews", 1, "before")])
    assert not (ws / "artifacts/gate").exists() and not (ws / "metrics/gate.json").exists()
    assert not (ws / "plots/gate_steps.csv").exists()
    half = [p for p in (ws / "artifacts").glob(".gate.*")]
    assert half and (half[0] / "report.json").exists()  # the half-built dir exists, but only under a temp name
    paths = cfg_of(ws).paths
    verdict = gate_verdict([Path(paths.root) / "gate/report.json", Path(paths.metrics) / "gate.json"],
                           ws / "artifacts/stage2/ema_adapter.safetensors")
    assert verdict["passed"] is False  # export finds no verdict in what the killed gate left
    rc, log = anyflow(forkserver, ws, "gate")
    assert rc == 0, log[-3000:]
    assert_same_outputs(reference.ws, ws, STAGES["gate"][2])
    assert [p for p in leftovers(ws) if not p.startswith("artifacts/.gate.")] == []


def test_export_killed_before_its_manifest(forkserver, reference, seed_dir, tmp_path):
    from anyflow.store import read_manifest

    ws = killed_workspace(reference, seed_dir, tmp_path, "export")
    # merged pipeline/ (and provisional manifest) written in the temporary directory; killed before the real manifest
    anyflow(forkserver, ws, "export", kill=[("anyflow.export.manifest", "build_manifest", 1, "before")])
    assert not (ws / "artifacts/release").exists() and not (ws / "metrics/export.json").exists()
    half = list((ws / "artifacts").glob(".release.*"))
    assert half and (half[0] / "pipeline").is_dir()
    with pytest.raises(FileNotFoundError, match="release manifest not found"):
        read_manifest(ws / "artifacts/release")  # promote/pull have nothing to take
    # the temp dir's provisional manifest (written for the runtime's shape check) carries no passing verdict
    assert json.loads((half[0] / "manifest.json").read_text())["gate"]["passed"] is False
    rc, log = anyflow(forkserver, ws, "export")
    assert rc == 0, log[-3000:]
    assert json.loads((ws / "artifacts/release/manifest.json").read_text())["gate"]["passed"] is True
    assert_same_outputs(reference.ws, ws, STAGES["export"][2])
    assert [p for p in leftovers(ws) if not p.startswith("artifacts/.release.")] == []


def test_promote_killed_while_storing_the_candidate(forkserver, reference, seed_dir, tmp_path):
    from anyflow.store.local import LocalStore

    ws = killed_workspace(reference, seed_dir, tmp_path, "promote")
    # put_release copies the release file by file into a temporary candidate dir; killed after the 2nd file
    anyflow(forkserver, ws, "promote", kill=[("shutil", "copy2", 2, "after")])
    store = LocalStore(ws / "registry")
    assert not (ws / "registry/candidates/r1").exists() and not (ws / "registry/releases").exists()
    assert store.latest() is None and store.list() == []
    rc, log = anyflow(forkserver, ws, "promote")
    assert rc == 0, log[-3000:]
    assert store.latest() == "r1" and store.list() == ["r1"]
    assert_same_outputs(reference.ws, ws, ["registry/releases", "registry/latest", "registry/history.json"])
    assert [p for p in leftovers(ws) if not p.startswith("registry/candidates/.r1.")] == ["registry/.lock"]


def test_promote_killed_between_move_and_pointer_update(forkserver, reference, seed_dir, tmp_path):
    from anyflow.store.base import read_manifest, verify_tree
    from anyflow.store.local import LocalStore

    ws = killed_workspace(reference, seed_dir, tmp_path, "promote")
    anyflow(forkserver, ws, "promote", kill=[("anyflow.store.local", "LocalStore._set_latest", 1, "before")])
    store = LocalStore(ws / "registry")
    release = ws / "registry/releases/r1"
    verify_tree(release, read_manifest(release))  # what was moved is complete (os.replace of a finished dir) ...
    assert store.latest() is None and store.list() == []  # ... but not recorded
    rc, log = anyflow(forkserver, ws, "promote")  # the next write records it; the retry is then a no-op
    assert rc == 0, log[-3000:]
    assert store.latest() == "r1" and store.list() == ["r1"]
    assert_same_outputs(reference.ws, ws, ["registry/releases", "registry/latest", "registry/history.json"])


def test_encode_clips_killed_mid_encoding(forkserver, reference, seed_dir, tmp_path):
    from anyflow.stages.domain import domain_shards
    from anyflow.stages.common import StagePaths

    ws = killed_workspace(reference, seed_dir, tmp_path, "encode-clips")
    # shards are written into a temporary directory swapped in at the end: killed after the 1st of 2 shards
    anyflow(forkserver, ws, "encode-clips", kill=[("anyflow.data.shards", "write_shard", 1, "after")])
    assert not (ws / "artifacts/domain_data").exists()
    cfg = cfg_of(ws)
    with pytest.raises(FileNotFoundError, match="encode_clips"):
        domain_shards(cfg, StagePaths.of(cfg))  # the domain stage refuses what the killed run left
    rc, log = anyflow(forkserver, ws, "encode-clips")
    assert rc == 0, log[-3000:]
    assert_same_outputs(reference.ws, ws, STAGES["encode-clips"][2])
    assert [p for p in leftovers(ws) if not p.startswith("artifacts/.domain_data.")] == []


def test_domain_killed_after_checkpoint_resumes(forkserver, reference, seed_dir, tmp_path):
    ws = killed_workspace(reference, seed_dir, tmp_path, "domain")
    # checkpoint at step 2; killed inside step 3
    anyflow(forkserver, ws, "domain", kill=[("anyflow.train.selfdistill", "SelfDistillTrainer.step", 3, "after")])
    assert torch.load(ws / "checkpoints/domain/last.pt", weights_only=False)["step"] == 2
    assert not (ws / "artifacts/domain").exists() and not (ws / "metrics/domain.json").exists()
    rc, log = anyflow(forkserver, ws, "domain")
    assert rc == reference.run("domain")[0], log[-3000:]
    assert "resumed domain from checkpoints/domain/last.pt at step 2" in log
    m = json.loads((ws / "metrics/domain.json").read_text())
    assert m["training"]["resumed"] is True and m["training"]["steps"] == 4
    assert json.loads((reference.ws / "metrics/domain.json").read_text())["training"]["resumed"] is False
    assert_same_outputs(reference.ws, ws, STAGES["domain"][2])
    assert not (ws / "checkpoints/domain/last.pt").exists()
    assert not leftovers(ws), leftovers(ws)
