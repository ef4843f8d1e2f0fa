"""``lakefs`` store on the maintained ``lakefs`` Python SDK (not the deprecated ``lakefs-client``).

Model (DESIGN §6), in one lakeFS repository whose ``main`` branch holds the *current* release::

    main ─┬─────────────── merge (tag r…-a) ───────── merge (tag r…-b) ── revert … (rollback to r…-a)
          └─ candidate-<name>: delete release/*, upload files, commit with metadata ─┘

- ``put_release``: branch ``candidate-<name>`` from ``main``; replace everything under ``release/`` with the release
  directory (streamed uploads); write ``release.json`` (name + metadata); **commit** with metadata (git sha,
  dvc.lock digest, every gate metric). This happens for failed candidates too, so they can be inspected.
- ``promote``: re-reads the candidate's manifest *from lakeFS*; only when ``gate.passed`` is true, **merge** the
  candidate into ``main`` (source wins over a concurrent promotion) and **tag** the merge commit ``<name>``.
  A failed gate raises :class:`GateFailedError` and neither merges nor tags.
- ``rollback(name)``: revert, newest first, every first-parent commit of ``main`` after the tag's commit (merge
  commits relative to parent 1); ``main`` then holds exactly the tagged release again, and history is kept.
- ``pull(name)``: download ``release/manifest.json`` and every listed object of tag ``name`` (or ``main`` for
  'latest') into a temporary directory, verify every sha256, swap in (see :meth:`Store.pull`).

Credentials and endpoint are arguments, built at the CLI edge (``anyflow/stages/promote.py``, ``pull.py``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from anyflow.store.base import (MANIFEST, Candidate, GateFailedError, Release, Store, StoreError, check_name,
                                commit_metadata, default_name, read_manifest, validate_manifest, verify_tree)

PREFIX = "release/"
RELEASE_JSON = "release.json"
_CHUNK = 8 << 20


def api_host(endpoint: str) -> str:
    """The SDK wants the API base URL: ``http://host:8000`` → ``http://host:8000/api/v1``."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/api/v1") else endpoint + "/api/v1"


def candidate_branch(name: str) -> str:
    return f"candidate-{name}"


class LakeFSStore(Store):
    def __init__(self, endpoint: str, access_key_id: str, secret_access_key: str, repository: str,
                 main: str = "main"):
        import lakefs  # optional dependency: pip install anyflow-pipeline[lakefs]

        if not access_key_id or not secret_access_key:
            raise StoreError("lakeFS credentials missing (LAKEFS_ACCESS_KEY_ID / LAKEFS_SECRET_ACCESS_KEY)")
        self._lakefs = lakefs
        self.client = lakefs.Client(host=api_host(endpoint), username=access_key_id, password=secret_access_key)
        self.repo = lakefs.Repository(repository, client=self.client)
        self.main = main

    # ------------------------------------------------------------------ interface
    def put_release(self, release_dir: str | Path, metadata: Mapping[str, Any] | None = None,
                    name: str | None = None) -> Candidate:
        release_dir = Path(release_dir)
        manifest = read_manifest(release_dir)
        verify_tree(release_dir, manifest)
        meta = commit_metadata(manifest, metadata)
        name = check_name(name or default_name(meta, time.strftime("%Y%m%d%H%M%S", time.gmtime())))
        meta["release"] = name
        if name in self.list():
            raise StoreError(f"release {name}: already tagged in lakefs://{self.repo.id}; releases are immutable")
        try:
            branch = self.repo.branch(candidate_branch(name)).create(self.main)
        except self._lakefs.exceptions.ConflictException:
            raise StoreError(f"candidate {name}: branch {candidate_branch(name)} already exists in "
                             f"lakefs://{self.repo.id}; choose another name") from None
        stale = [o.path for o in branch.objects(prefix=PREFIX)]
        if stale:
            branch.delete_objects(stale)
        for entry in manifest["files"]:
            self._upload(branch, PREFIX + entry["path"], release_dir / entry["path"])
        self._upload(branch, PREFIX + MANIFEST, release_dir / MANIFEST)
        branch.object(RELEASE_JSON).upload(json.dumps({"name": name, "metadata": meta}, sort_keys=True),
                                           mode="w", pre_sign=False, content_type="application/json")
        ref = branch.commit(message=f"candidate {name} (gate {'passed' if manifest['gate']['passed'] else 'FAILED'})",
                            metadata=meta)
        return Candidate(name, manifest["gate"]["passed"], ref.id, meta)

    def promote(self, candidate: Candidate | str) -> Release:
        name = candidate.name if isinstance(candidate, Candidate) else check_name(candidate)
        branch = self.repo.branch(candidate_branch(name))
        manifest = validate_manifest(json.loads(self._read(branch.object(PREFIX + MANIFEST))),
                                     where=f"lakefs://{self.repo.id}/{branch.id}/{PREFIX}{MANIFEST}")
        if not manifest["gate"]["passed"]:
            raise GateFailedError(f"candidate {name}: gate.passed is false; not merged into {self.main}, not tagged")
        if name in self.list():  # check before merging: a failed tag after a merge would leave main untagged
            raise StoreError(f"release {name}: already tagged in lakefs://{self.repo.id}")
        stored = json.loads(self._read(branch.object(RELEASE_JSON))).get("metadata", {})
        meta = commit_metadata(manifest, {**stored, "release": name})  # the candidate's provenance, recorded again
        merge_id = branch.merge_into(self.main, message=f"promote {name}", metadata=meta, strategy="source-wins")
        self.repo.tag(name).create(merge_id)
        return Release(name, name)

    def rollback(self, to_release: str) -> Release:
        name = check_name(to_release)
        target = self.repo.tag(name).get_commit().id
        main = self.repo.branch(self.main)
        to_revert = []
        for commit in main.log(first_parent=True):
            if commit.id == target:
                break
            to_revert.append(commit)
        else:
            raise StoreError(f"release {name}: its commit {target} is not on {self.main}'s first-parent history")
        for commit in to_revert:  # newest first
            main.revert(commit.id, parent_number=1 if len(commit.parents) > 1 else 0)
        if self.latest() != name:
            raise StoreError(f"rollback to {name}: {self.main} now reports release {self.latest()!r}")
        return Release(name, name)

    def list(self) -> list[str]:
        return sorted(t.id for t in self.repo.tags())

    def latest(self) -> str | None:
        obj = self.repo.branch(self.main).object(RELEASE_JSON)
        if not obj.exists():
            return None
        return json.loads(self._read(obj))["name"]

    def _fetch(self, name: str, tmp: Path) -> None:
        ref = self.repo.ref(name)
        (tmp / MANIFEST).write_bytes(self._read(ref.object(PREFIX + MANIFEST)))
        manifest = read_manifest(tmp)
        for entry in manifest["files"]:
            target = tmp / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            with ref.object(PREFIX + entry["path"]).reader("rb", pre_sign=False) as src, open(target, "wb") as dst:
                while block := src.read(_CHUNK):
                    dst.write(block)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _upload(branch, path: str, source: Path) -> None:
        """Stream a local file to ``path`` on ``branch`` (direct upload through the lakeFS API)."""
        with branch.object(path).writer("wb", pre_sign=False) as dst, open(source, "rb") as src:
            shutil.copyfileobj(src, dst, _CHUNK)

    @staticmethod
    def _read(obj) -> bytes:
        with obj.reader("rb", pre_sign=False) as fh:
            return fh.read()
