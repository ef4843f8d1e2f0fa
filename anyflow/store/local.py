"""``local`` store: a directory registry (the embedded default, ``cfg.store.local_root``).

Layout::

    <root>/candidates/<name>/            a stored release directory + store.json (metadata, gate verdict)
    <root>/releases/<name>/              promoted releases (moved from candidates/, never modified again)
    <root>/latest                        the current release name (replaced atomically)
    <root>/history.json                  every promote/rollback, oldest first (replaced atomically)

Every write is atomic: directories are built under a temporary name and renamed into place
(:func:`anyflow.utils.io.atomic_dir`), pointer files are replaced with ``os.replace``. A crash leaves either the old
or the new state, never a half-written release. A promotion is decided by moving ``candidates/<name>`` to
``releases/<name>`` (after the gate and checksum checks); ``history.json`` then records it and ``latest`` follows.
A crash between those steps is finished by the next write (:meth:`LocalStore._recover`): an unrecorded release is
recorded, a ``latest`` behind history is rewritten. Promoting the current release again is a no-op, so a retried
``anyflow promote --name NAME`` ends where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from anyflow.store.base import (MANIFEST, Candidate, GateFailedError, Release, Store, StoreError, check_name,
                                commit_metadata, default_name, read_manifest, verify_tree)
from anyflow.utils.io import atomic_dir, atomic_write_text, read_json, write_json

STORE_JSON = "store.json"


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    def _candidate(self, name: str) -> Path:
        return self.root / "candidates" / name

    def _release(self, name: str) -> Path:
        return self.root / "releases" / name

    # ------------------------------------------------------------------ interface
    def put_release(self, release_dir: str | Path, metadata: Mapping[str, Any] | None = None,
                    name: str | None = None) -> Candidate:
        release_dir = Path(release_dir)
        manifest = read_manifest(release_dir)
        verify_tree(release_dir, manifest)  # never store a release that does not match its own manifest
        meta = commit_metadata(manifest, metadata)
        name = check_name(name or default_name(meta, time.strftime("%Y%m%d%H%M%S", time.gmtime())))
        with self._lock():
            self._recover()
        done = self._release(name)
        if done.exists():
            if self.latest() == name and (done / MANIFEST).read_bytes() == (release_dir / MANIFEST).read_bytes():
                # a retry of the promotion that made it current (e.g. after a crash): nothing left to store
                return Candidate(name, manifest["gate"]["passed"], str(done),
                                 read_json(done / STORE_JSON)["metadata"])
            raise StoreError(f"release {name}: already promoted; releases are immutable")
        with atomic_dir(self._candidate(name)) as tmp:
            for entry in manifest["files"]:
                target = tmp / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(release_dir / entry["path"], target)
            shutil.copy2(release_dir / MANIFEST, tmp / MANIFEST)
            write_json(tmp / STORE_JSON, {"name": name, "gate_passed": manifest["gate"]["passed"],
                                          "metadata": meta, "stored_at": time.time()})
        return Candidate(name, manifest["gate"]["passed"], str(self._candidate(name)), meta)

    def promote(self, candidate: Candidate | str) -> Release:
        with self._lock():
            self._recover()
            return self._promote(candidate)

    def _promote(self, candidate: Candidate | str) -> Release:
        name = candidate.name if isinstance(candidate, Candidate) else check_name(candidate)
        src = self._candidate(name)
        if not src.exists() and self._release(name).is_dir() and self.latest() == name:
            return Release(name, str(self._release(name)))  # already done: promoting the current release again
        if not src.is_dir():
            raise StoreError(f"candidate {name}: not found under {src.parent}")
        manifest = read_manifest(src)
        if not manifest["gate"]["passed"]:
            raise GateFailedError(f"candidate {name}: gate.passed is false in {src / MANIFEST}; not promoted")
        verify_tree(src, manifest)
        dst = self._release(name)
        if dst.exists():
            raise StoreError(f"release {name}: already promoted")
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)  # same filesystem: atomic
        self._set_latest(name, action="promote")
        return Release(name, str(dst))

    def rollback(self, to_release: str) -> Release:
        with self._lock():
            return self._rollback(to_release)

    def _rollback(self, to_release: str) -> Release:
        self._recover()
        name = check_name(to_release)
        if not self._release(name).is_dir():
            known = ", ".join(self.list()) or "none"
            raise StoreError(f"release {name}: not found (promoted releases: {known})")
        self._set_latest(name, action="rollback")
        return Release(name, str(self._release(name)))

    def list(self) -> list[str]:
        seen: list[str] = []
        for event in self.history():
            if event["action"] == "promote" and event["release"] not in seen:
                seen.append(event["release"])
        return seen

    def latest(self) -> str | None:
        path = self.root / "latest"
        return path.read_text().strip() or None if path.exists() else None

    def history(self) -> list[dict]:
        path = self.root / "history.json"
        return read_json(path) if path.exists() else []

    def _fetch(self, name: str, tmp: Path) -> None:
        src = self._release(name)
        if not src.is_dir():
            raise StoreError(f"release {name}: not found under {src.parent}")
        for p in src.rglob("*"):
            if p.is_file() and not (p.parent == src and p.name == STORE_JSON):
                target = tmp / p.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, target)

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _lock(self):
        """Serialise promote/rollback between processes (history.json is read-modify-write)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _recover(self) -> None:
        """Finish what a crash interrupted (under the lock): record every release directory that history does not
        name (the move is the promotion's decision, taken after its checks), then point ``latest`` at history's
        last event."""
        releases = self.root / "releases"
        recorded = set(self.list())
        if releases.is_dir():
            for d in sorted(p for p in releases.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if d.name not in recorded:
                    verify_tree(d, read_manifest(d))
                    self._set_latest(d.name, action="promote")
        events = self.history()
        if events and self.latest() != events[-1]["release"]:
            atomic_write_text(self.root / "latest", events[-1]["release"] + "\n")

    def _set_latest(self, name: str, action: str) -> None:
        events = self.history()
        events.append({"action": action, "release": name, "previous": self.latest(), "at": time.time()})
        write_json(self.root / "history.json", events)
        atomic_write_text(self.root / "latest", name + "\n")
