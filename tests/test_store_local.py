"""The ``local`` store: atomic registry writes, the latest pointer, rollback, verified all-or-nothing pulls."""

import json
import os

import pytest

from fake_lakefs import make_release

from anyflow.store.base import GateFailedError, StoreError, VerificationError, read_manifest
from anyflow.store.local import LocalStore


def test_promote_moves_candidate_and_updates_latest_and_history(tmp_path):
    store = LocalStore(tmp_path / "reg")
    cand = store.put_release(make_release(tmp_path / "a"), metadata={"run": "1"}, name="r1")
    assert (tmp_path / "reg/candidates/r1/manifest.json").exists() and store.latest() is None
    store.promote(cand)
    assert not (tmp_path / "reg/candidates/r1").exists()
    assert (tmp_path / "reg/releases/r1/transformer/model.onnx").exists()
    assert store.latest() == "r1" and store.list() == ["r1"]
    meta = json.loads((tmp_path / "reg/releases/r1/store.json").read_text())["metadata"]
    assert meta["git_sha"] == "0123456789abcdef" and meta["gate.passed"] == "true" and meta["run"] == "1"
    # no temporary files left beside the registry entries
    leftovers = [p for p in (tmp_path / "reg").rglob(".*") if p.name != ".lock"]
    assert leftovers == []


def test_failed_gate_is_stored_but_never_promoted(tmp_path):
    store = LocalStore(tmp_path / "reg")
    cand = store.put_release(make_release(tmp_path / "a", passed=False), name="bad")
    assert cand.gate_passed is False
    with pytest.raises(GateFailedError):
        store.promote(cand)
    assert store.latest() is None and store.list() == [] and not (tmp_path / "reg/releases").exists()


def test_rollback_and_pull_latest(tmp_path):
    store = LocalStore(tmp_path / "reg")
    store.promote(store.put_release(make_release(tmp_path / "a", payload=b"A" * 10), name="r1"))
    store.promote(store.put_release(make_release(tmp_path / "b", payload=b"B" * 10), name="r2"))
    assert store.latest() == "r2"
    assert (store.pull("latest", tmp_path / "d") / "transformer/model.onnx").read_bytes() == b"B" * 10
    store.rollback("r1")
    assert store.latest() == "r1" and store.list() == ["r1", "r2"]
    assert [e["action"] for e in store.history()] == ["promote", "promote", "rollback"]
    assert (store.pull("latest", tmp_path / "d") / "transformer/model.onnx").read_bytes() == b"A" * 10
    assert not (tmp_path / "d" / "store.json").exists()
    with pytest.raises(StoreError, match="not found"):
        store.rollback("r9")


def test_pull_detects_tampered_file_and_leaves_dest_untouched(tmp_path):
    store = LocalStore(tmp_path / "reg")
    store.promote(store.put_release(make_release(tmp_path / "a"), name="r1"))
    target = tmp_path / "reg/releases/r1/transformer/model.onnx"
    data = bytearray(target.read_bytes())
    data[0] ^= 1  # same size, different content
    target.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("previous release")
    with pytest.raises(VerificationError, match="transformer/model.onnx: sha256"):
        store.pull("r1", dest)
    assert sorted(os.listdir(dest)) == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == ["a", "dest", "reg"]  # no half-written temp dir left behind


def test_put_release_refuses_inconsistent_release_and_names_the_field(tmp_path):
    rel = make_release(tmp_path / "a")
    (rel / "model_index.json").write_text("changed")
    with pytest.raises(VerificationError, match="model_index.json: size"):
        LocalStore(tmp_path / "reg").put_release(rel, name="x")
    manifest = json.loads((rel / "manifest.json").read_text())
    del manifest["gate"]["passed"]
    (rel / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="gate.passed"):
        read_manifest(rel)
    manifest["gate"]["passed"] = True
    manifest["files"][0]["sha256"] = "xyz"
    (rel / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"files\[0\].sha256"):
        read_manifest(rel)


def test_cli_promote_refuses_failed_gate_and_pull_verifies(tmp_path, monkeypatch):
    from anyflow.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("profile: toy\nstore:\n  local_root: reg\n")
    make_release(tmp_path / "artifacts/release", passed=False)
    assert main(["promote", "--name", "bad"]) == 3
    assert LocalStore(tmp_path / "reg").latest() is None
    make_release(tmp_path / "artifacts/release", passed=True)
    assert main(["promote", "--name", "good"]) == 0
    assert LocalStore(tmp_path / "reg").latest() == "good"
    # a later failing gate run leaves metrics/gate.json passed=false and a stale release: refused
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/gate.json").write_text(json.dumps({"passed": False}))
    assert main(["promote", "--name", "stale"]) == 3
    assert main(["pull", "latest", "--dest", "out"]) == 0
    assert (tmp_path / "out/manifest.json").exists()
    assert main(["promote", "--rollback", "nope"]) == 1  # unknown release: a clear error, nothing changes
    assert LocalStore(tmp_path / "reg").list() == ["good"]


def test_cli_promote_cross_checks_the_gate_that_judged_the_release(tmp_path, monkeypatch):
    """A domain release (manifest gate.source = artifacts/domain/report.json) is judged by the domain gate's latest
    metrics (metrics/domain.json), not by the distillation gate's, and vice versa."""
    from anyflow.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("profile: toy\nstore:\n  local_root: reg\n")
    rel = make_release(tmp_path / "artifacts/release_domain", passed=True)
    manifest = json.loads((rel / "manifest.json").read_text())
    manifest["gate"]["source"] = "artifacts/domain/report.json"
    (rel / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/gate.json").write_text(json.dumps({"passed": False}))  # stage 2's gate: not this release's
    (tmp_path / "metrics/domain.json").write_text(json.dumps({"passed": True}))
    assert main(["promote", "--release", str(rel), "--name", "dom1"]) == 0
    assert LocalStore(tmp_path / "reg").latest() == "dom1"
    (tmp_path / "metrics/domain.json").write_text(json.dumps({"passed": False}))  # a later failing domain run
    assert main(["promote", "--release", str(rel), "--name", "dom2"]) == 3
    assert LocalStore(tmp_path / "reg").latest() == "dom1"


def test_store_accepts_the_manifest_written_by_anyflow_export(tmp_path):
    """Contract test with the export side: a manifest from anyflow.export.manifest promotes and pulls."""
    mf = pytest.importorskip("anyflow.export.manifest")
    rel = tmp_path / "release"
    (rel / "onnx").mkdir(parents=True)
    (rel / "onnx/transformer.onnx").write_bytes(b"graph" * 100)
    (rel / "model_index.json").write_text("{}")
    manifest = mf.build_manifest(rel, gate={"passed": True, "total_at_4": 0.8}, profile="toy",
                                 parity={"transformer": 1e-5})
    mf.write_manifest(rel, manifest)
    store = LocalStore(tmp_path / "reg")
    prov = {"git_sha": "abc1234", "git_dirty": False, "dvc_lock_digest": "e" * 64}
    cand = store.put_release(rel, metadata=prov)
    assert cand.name.endswith("-abc1234")  # named after the commit recorded at promotion
    store.promote(cand)
    out = store.pull(cand.name, tmp_path / "pulled")
    assert mf.verify_release(out)["gate"]["passed"] is True
    meta = json.loads((tmp_path / "reg/releases" / cand.name / "store.json").read_text())["metadata"]
    assert (meta["git_sha"], meta["git_dirty"], meta["dvc_lock_digest"]) == ("abc1234", "false", "e" * 64)


def test_a_crash_between_move_and_history_is_finished_by_the_next_write(tmp_path):
    """[L] The move to releases/ is the promotion's decision; a crash before history.json/latest record it leaves
    an unrecorded release that the next write records (then makes its own change), and a `latest` file behind
    history is rewritten."""
    store = LocalStore(tmp_path / "reg")
    store.put_release(make_release(tmp_path / "a", payload=b"A" * 10), name="r1")
    os.makedirs(tmp_path / "reg/releases")
    os.replace(tmp_path / "reg/candidates/r1", tmp_path / "reg/releases/r1")  # "killed" right after the move
    assert store.list() == [] and store.latest() is None
    store.promote(store.put_release(make_release(tmp_path / "b", payload=b"B" * 10), name="r2"))
    assert store.list() == ["r1", "r2"] and store.latest() == "r2"
    (tmp_path / "reg/latest").write_text("r1\n")  # "killed" between history.json and latest
    store.rollback("r2")
    assert store.latest() == "r2" and [e["action"] for e in store.history()] == ["promote", "promote", "rollback"]


def test_retrying_the_promotion_of_the_current_release_is_a_no_op(tmp_path):
    store = LocalStore(tmp_path / "reg")
    rel = make_release(tmp_path / "a", payload=b"A" * 10)
    store.promote(store.put_release(rel, name="r1"))
    store.promote(store.put_release(rel, name="r1"))  # e.g. a Prefect retry after the promotion went through
    assert store.list() == ["r1"] and len(store.history()) == 1
    with pytest.raises(StoreError, match="already promoted"):  # another release under the same name is refused
        store.put_release(make_release(tmp_path / "b", payload=b"B" * 10), name="r1")
