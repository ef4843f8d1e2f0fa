"""The ``lakefs`` store end to end through the real ``lakefs`` SDK, against ``tests/fake_lakefs.py``.

What this exercises: every SDK call our backend makes (paths, query parameters, request and response bodies as the
SDK's models define them, basic auth, streamed uploads, ranged downloads), the candidate-branch → commit →
merge → tag flow, rollback by reverts, and verified pulls. What it cannot: a real lakeFS server's storage
adapters, pre-signed URLs, branch protection and its exact merge/revert conflict rules (docs/orchestration.md).
"""

import json

import pytest

from fake_lakefs import FakeLakeFSServer, make_release

from anyflow.store.base import GateFailedError, StoreError, VerificationError
from anyflow.store.lakefs import LakeFSStore, candidate_branch

KEY, SECRET = "AKIATEST", "s3cr3t"


@pytest.fixture
def lakefs_store():
    import lakefs

    with FakeLakeFSServer(KEY, SECRET) as server:
        client = lakefs.Client(host=server.endpoint + "/api/v1", username=KEY, password=SECRET)
        lakefs.Repository("anyflow", client=client).create(storage_namespace="local://anyflow")
        yield LakeFSStore(server.endpoint, KEY, SECRET, "anyflow"), server


def _main_commits(store):
    return list(store.repo.branch("main").log(first_parent=True))


def test_candidate_commit_carries_metadata_and_passing_gate_merges_and_tags(tmp_path, lakefs_store):
    store, server = lakefs_store
    cand = store.put_release(make_release(tmp_path / "rel", passed=True), metadata={"flow_run": "abc"}, name="r1")
    commit = store.repo.commit(cand.ref).get_commit()
    assert commit.metadata["git_sha"] == "0123456789abcdef"
    assert commit.metadata["dvc_lock_digest"] == "d" * 64
    assert commit.metadata["gate.passed"] == "true" and commit.metadata["gate.total_at_4"] == "0.81"
    assert commit.metadata["flow_run"] == "abc"
    assert store.latest() is None and store.list() == []  # a candidate is not a release

    store.promote(cand)
    assert store.list() == ["r1"] and store.latest() == "r1"
    head = _main_commits(store)[0]
    assert len(head.parents) == 2 and store.repo.tag("r1").get_commit().id == head.id  # merge commit, tagged
    # the merge commit records the candidate's provenance and metadata again (the promotion is what ops audit)
    assert (head.metadata["git_sha"], head.metadata["flow_run"], head.metadata["release"]) == \
        ("0123456789abcdef", "abc", "r1")
    assert ("POST", "repositories/{}/refs/{}/merge/{}") in server.fake.calls


def test_failed_gate_is_committed_on_its_branch_but_never_merged_or_tagged(tmp_path, lakefs_store):
    store, server = lakefs_store
    before = [c.id for c in _main_commits(store)]
    cand = store.put_release(make_release(tmp_path / "bad", passed=False), name="bad1")
    assert store.repo.commit(cand.ref).get_commit().metadata["gate.passed"] == "false"
    with pytest.raises(GateFailedError, match="not merged"):
        store.promote(cand)
    assert [c.id for c in _main_commits(store)] == before
    assert store.list() == [] and store.latest() is None
    assert not any(r.endswith("merge/{}") or r.endswith("tags") and m == "POST" for m, r in server.fake.calls)
    assert candidate_branch("bad1") in [b.id for b in store.repo.branches()]


def test_pull_verifies_and_rollback_reverts_main(tmp_path, lakefs_store):
    store, _ = lakefs_store
    rel1 = make_release(tmp_path / "a", payload=b"A" * 50_000)
    rel2 = make_release(tmp_path / "b", files={"transformer/model.onnx": b"B" * 70_000, "extra.bin": b"x"})
    store.promote(store.put_release(rel1, name="r1"))
    store.promote(store.put_release(rel2, name="r2"))
    assert store.latest() == "r2" and store.list() == ["r1", "r2"]

    out = store.pull("r1", tmp_path / "pulled")
    assert (out / "transformer/model.onnx").read_bytes() == b"A" * 50_000
    assert (store.pull("latest", tmp_path / "cur") / "extra.bin").read_bytes() == b"x"

    store.rollback("r1")
    assert store.latest() == "r1"
    main_paths = sorted(o.path for o in store.repo.branch("main").objects(prefix="release/"))
    assert main_paths == ["release/manifest.json", "release/model_index.json", "release/transformer/model.onnx"]
    assert store.list() == ["r1", "r2"]  # history kept; r2 still pullable by tag
    assert (store.pull("r2", tmp_path / "again") / "extra.bin").exists()

    # a release promoted after a rollback merges cleanly on top of the reverts
    store.promote(store.put_release(make_release(tmp_path / "c"), name="r3"))
    assert store.latest() == "r3"


def test_pull_detects_tampered_object_and_leaves_dest(tmp_path, lakefs_store):
    store, server = lakefs_store
    store.promote(store.put_release(make_release(tmp_path / "a"), name="r1"))
    # tamper with the stored blob behind the tag (as a corrupted object store would)
    repo = server.fake.repos["anyflow"]
    stat = repo.commits[repo.tags["r1"]]["tree"]["release/transformer/model.onnx"]
    repo.blobs[stat["checksum"]] = b"evil" + repo.blobs[stat["checksum"]][4:]
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    with pytest.raises(VerificationError, match="sha256"):
        store.pull("r1", dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")]


def test_bad_credentials_and_unknown_release_are_clear_errors(tmp_path, lakefs_store):
    import lakefs.exceptions

    store, server = lakefs_store
    wrong = LakeFSStore(server.endpoint, KEY, "wrong", "anyflow")
    with pytest.raises(lakefs.exceptions.NotAuthorizedException):
        wrong.list()
    with pytest.raises(StoreError, match="credentials"):
        LakeFSStore(server.endpoint, "", "", "anyflow")
    with pytest.raises(Exception):
        store.rollback("nope")
    store.promote(store.put_release(make_release(tmp_path / "a"), name="r1"))
    with pytest.raises(StoreError, match="already tagged"):  # releases are immutable; checked before any write
        store.put_release(make_release(tmp_path / "b"), name="r1")


def test_cli_promote_and_pull_with_lakefs_backend(tmp_path, lakefs_store, monkeypatch):
    """`anyflow promote` / `anyflow pull` with store.backend=lakefs; credentials only from the environment."""
    from anyflow.cli import main

    store, server = lakefs_store
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"profile: toy\nstore:\n  backend: lakefs\n  lakefs_endpoint: "
                                          f"{server.endpoint}\n  lakefs_repository: anyflow\n")
    make_release(tmp_path / "artifacts/release", passed=True)
    monkeypatch.delenv("LAKEFS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("LAKEFS_SECRET_ACCESS_KEY", raising=False)
    assert main(["promote", "--name", "cli1"]) == 1  # no credentials: a clear error, nothing stored
    monkeypatch.setenv("LAKEFS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("LAKEFS_SECRET_ACCESS_KEY", SECRET)
    assert main(["promote", "--name", "cli1"]) == 0
    make_release(tmp_path / "artifacts/release", passed=False)
    assert main(["promote", "--name", "cli2"]) == 3
    assert store.list() == ["cli1"] and store.latest() == "cli1"
    assert main(["pull", "latest", "--dest", "pulled"]) == 0
    assert json.loads((tmp_path / "pulled/manifest.json").read_text())["gate"]["passed"] is True
