"""[L] Byte-reproducible artefacts: the same code, params and seeds write the same bytes.

What can differ between two runs of the same stage is pinned here piece by piece: safetensors headers (metadata in a
per-process hash map), timings (metrics only, never in a DVC output), provenance (recorded at promotion, not in the
release). Whole stages run twice are compared in tests/test_e2e_toy.py (a forced re-run keeps its dvc.lock hash)
and tests/test_kill_resume.py (a killed and resumed run writes what an uninterrupted one writes).
"""

import hashlib
import json
import subprocess
import sys

import pytest

WRITE = """
import sys, torch
from anyflow.utils.io import write_safetensors
meta = {f"key{i}": f"value {i} é" for i in range(12)}
write_safetensors(sys.argv[1], {"b.weight": torch.arange(6.).reshape(2, 3), "a.weight": torch.ones(4).half()}, meta)
"""


def test_safetensors_are_the_same_bytes_in_every_process(tmp_path):
    """Each process orders safetensors' metadata map differently; the canonical header removes that. With 12 keys
    the raw writer practically never gives two processes the same order, so this fails without the fix."""
    digests = set()
    for i in range(3):
        path = tmp_path / f"w{i}.safetensors"
        subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1

    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "w0.safetensors"))
    assert tensors["b.weight"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["a.weight"].dtype.itemsize == 2
    with safe_open(str(tmp_path / "w0.safetensors"), "pt") as f:
        assert f.metadata() == {f"key{i}": f"value {i} é" for i in range(12)}


def test_canonical_header_keeps_empty_and_missing_metadata(tmp_path):
    import torch
    from safetensors import safe_open

    from anyflow.utils.io import write_safetensors

    for meta in (None, {}):
        path = tmp_path / f"m{meta is None}.safetensors"
        write_safetensors(path, {"x": torch.zeros(3)}, meta)
        with safe_open(str(path), "pt") as f:
            assert not f.metadata() and f.get_tensor("x").tolist() == [0, 0, 0]
        assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data stays 8-byte aligned


def test_gate_report_carries_no_timings():
    """The gate's report.json is a DVC output: its timings go to metrics/<gate>.json only."""
    from anyflow.stages.gate import metrics_of, without_timings

    report = {"candidate": {"paradigm": "flowmap", "by_nfe": {"1": {"total": 0.7, "semantic": 0.5,
                                                                    "fidelity": {"latent_distance": 0.3},
                                                                    "sampling_seconds": 1.5}},
                            "drift": {"4": {"first": {"total": 0.8, "quality": 0.9, "semantic": 0.6},
                                            "last": {"total": 0.7, "quality": 0.8, "semantic": 0.5},
                                            "delta_total": -0.1, "seconds_per_chunk": 0.1}}},
              "teacher": {"total": 0.8, "quality": 0.9, "semantic": 0.6, "nfe": 100}, "baselines": {},
              "passed": True, "failed": [], "num_samples": 2, "seconds": {"total": 3.0}}
    clean = without_timings(report)
    assert "seconds" not in json.dumps(clean)
    assert clean["candidate"]["by_nfe"]["1"]["total"] == 0.7 and clean["candidate"]["drift"]["4"]["delta_total"] == -0.1
    metrics = metrics_of(report)
    assert metrics["seconds"] == {"total": 3.0} and metrics["drift"]["candidate"]["4"]["seconds_per_chunk"] == 0.1


@pytest.mark.parametrize("extra", [{}, {"flow_run": "x"}])
def test_promotion_records_provenance_not_the_release(tmp_path, monkeypatch, extra):
    """`anyflow promote` records git sha, dirty flag and dvc.lock digest with the candidate; the release bytes
    (and so their DVC hash) stay free of them."""
    from anyflow.cli import main
    from anyflow.export.manifest import build_manifest, write_manifest

    repo = tmp_path / "repo"
    rel = repo / "artifacts" / "release"
    rel.mkdir(parents=True)
    (rel / "model.onnx").write_bytes(b"graph")
    write_manifest(rel, build_manifest(rel, gate={"passed": True}, profile="toy", parity={}))
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "params.yaml").write_text("profile: toy\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=repo, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)
    before = (rel / "manifest.json").read_bytes()
    args = ["promote", "--name", "p1"] + [f"--meta={k}={v}" for k, v in extra.items()]
    assert main(args) == 0
    meta = json.loads((repo / "registry/releases/p1/store.json").read_text())["metadata"]
    assert meta["git_sha"] == sha and meta["git_dirty"] == "false"  # untracked files do not make it dirty
    assert meta["dvc_lock_digest"] == hashlib.sha256(b"schema: '2.0'\n").hexdigest()
    assert all(meta[k] == v for k, v in extra.items())
    assert (rel / "manifest.json").read_bytes() == before


def test_a_killed_writes_temporary_file_is_not_part_of_an_output():
    """[L] A shard killed mid-write leaves `.shard-*.safetensors.<random>.tmp` inside artifacts/data (shards are
    written in place so synthesis resumes); .dvcignore keeps it out of the output's hash."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stray = "artifacts/data/.shard-00001.safetensors.k2j4h1.tmp"
    out = subprocess.run([sys.executable, "-m", "dvc", "check-ignore", stray], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and stray in out.stdout, out.stdout + out.stderr
    kept = subprocess.run([sys.executable, "-m", "dvc", "check-ignore", "artifacts/data/shard-00001.safetensors"],
                          cwd=root, capture_output=True, text=True)
    assert kept.returncode == 1
