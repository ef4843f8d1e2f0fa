"""Release manifest: hashes verify; tampered, missing and unlisted files are detected."""

import json

import pytest

from anyflow.export.manifest import (ReleaseVerificationError, build_manifest, gate_summary, release_problems,
                                     verify_release, write_manifest)


def _release(tmp_path, gate=None):
    root = tmp_path / "release"
    (root / "onnx").mkdir(parents=True)
    (root / "onnx" / "transformer.onnx").write_bytes(b"\x08\x01graph" * 100)
    (root / "pipeline").mkdir()
    (root / "pipeline" / "model_index.json").write_text('{"_class_name": "AnyFlowPipeline"}')
    m = build_manifest(root, gate=gate or {"passed": True, "total@4": 0.8}, profile="toy",
                       parity={"transformer": {"max_abs": 1e-6}})
    write_manifest(root, m)
    return root


def test_manifest_lists_every_file_with_hash_and_verifies(tmp_path):
    import hashlib

    root = _release(tmp_path)
    m = verify_release(root)
    paths = {e["path"]: e for e in m["files"]}
    assert set(paths) == {"onnx/transformer.onnx", "pipeline/model_index.json"}
    data = (root / "onnx" / "transformer.onnx").read_bytes()
    assert paths["onnx/transformer.onnx"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert paths["onnx/transformer.onnx"]["size"] == len(data)
    assert m["gate"]["passed"] is True


def test_manifest_bytes_depend_only_on_the_release(tmp_path):
    """No clock, commit or dvc.lock digest in the manifest: the same files give the same bytes (provenance is
    recorded at promotion), so DVC's hash of a release is reproducible."""
    first = (_release(tmp_path / "a") / "manifest.json").read_bytes()
    second = (_release(tmp_path / "b") / "manifest.json").read_bytes()
    assert first == second
    assert not {"git_sha", "git_dirty", "dvc_lock_digest", "created"} & set(json.loads(first))


def test_manifest_satisfies_the_store_contract(tmp_path):
    base = pytest.importorskip("anyflow.store.base")
    root = _release(tmp_path)
    base.validate_manifest(json.loads((root / "manifest.json").read_text()))
    base.verify_tree(root, json.loads((root / "manifest.json").read_text()))


def test_tampered_same_size_file_is_detected(tmp_path):
    root = _release(tmp_path)
    p = root / "onnx" / "transformer.onnx"
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    p.write_bytes(bytes(data))
    with pytest.raises(ReleaseVerificationError, match="onnx/transformer.onnx: sha256"):
        verify_release(root)


def test_missing_and_unlisted_files_are_detected(tmp_path):
    root = _release(tmp_path)
    (root / "pipeline" / "model_index.json").unlink()
    (root / "onnx" / "extra.onnx").write_bytes(b"x")
    problems = release_problems(root)
    assert any("model_index.json: missing" in p for p in problems)
    assert any("extra.onnx: not listed" in p for p in problems)
    assert not any("extra" in p for p in release_problems(root, allow_unlisted=True))


def test_gate_summary_copies_report_and_defaults_to_failed(tmp_path):
    assert gate_summary([tmp_path / "nope.json"])["passed"] is False
    (tmp_path / "gate.json").write_text(json.dumps({"passed": True, "total": {"4": 0.7}}))
    g = gate_summary([tmp_path / "nope.json", tmp_path / "gate.json"])
    assert g["passed"] is True and g["total"] == {"4": 0.7}


def test_gate_verdict_nested_one_level(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"policy": {"passed": True}, "total": 0.5}))
    assert gate_summary([tmp_path / "report.json"])["passed"] is True
    (tmp_path / "report.json").write_text(json.dumps({"passed": "yes"}))
    assert gate_summary([tmp_path / "report.json"])["passed"] is False  # only a real boolean counts
