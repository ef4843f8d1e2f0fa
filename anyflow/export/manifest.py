"""The release manifest: what ``anyflow export`` wrote, with checksums and the gate verdict (DESIGN §6).

``manifest.json`` at the release root::

    {"files": [{"path": "onnx/transformer.onnx", "sha256": "<64 hex>", "size": 1234}, ...],
     "gate": {"passed": true, ...gate metrics}, "profile": "toy",
     "parity": {"transformer": {"max_abs": ..., "max_rel": ...}, ...}, "components": {...}}

The manifest is a pure function of what was exported: no clock, no commit, no dvc.lock digest, so the same code,
params and seeds write the same bytes on every machine and DVC's hashes (and run cache) are shared. Provenance —
git commit, dirty flag, dvc.lock digest — is recorded where it is true: when a release is **promoted**
(:func:`provenance`, stored as the candidate's metadata). :func:`verify_release` recomputes every size and sha256
and reports missing, tampered and unlisted files.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Mapping

from anyflow.utils.io import read_json, sha256_file, write_json

MANIFEST = "manifest.json"


class ReleaseVerificationError(ValueError):
    """A release directory does not match its manifest; the message lists every offending file."""


def file_entries(root: str | Path) -> list[dict]:
    """``[{"path", "sha256", "size"}]`` for every file under ``root`` except the manifest, sorted by path."""
    root = Path(root)
    out = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        out.append({"path": rel, "sha256": sha256_file(p), "size": p.stat().st_size})
    return out


def git_state(repo: str | Path = ".") -> tuple[str, bool]:
    """(HEAD commit sha, working tree dirty?) — ("", False) outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "", False


def dvc_lock_digest(path: str | Path = "dvc.lock") -> str:
    """sha256 of ``dvc.lock`` (the exact versions of every stage output), or '' when there is none yet."""
    path = Path(path)
    return sha256_file(path) if path.is_file() else ""


def provenance(repo: str | Path = ".") -> dict:
    """What a promotion records about where a release came from: ``git_sha``, ``git_dirty``, ``dvc_lock_digest``."""
    sha, dirty = git_state(repo)
    return {"git_sha": sha, "git_dirty": dirty, "dvc_lock_digest": dvc_lock_digest(Path(repo) / "dvc.lock")}


def gate_summary(candidates: list[str | Path]) -> dict:
    """The first existing gate report among ``candidates`` with a boolean ``passed``; ``passed: False`` (and why)
    when none exists, so an un-gated release can never be promoted."""
    for path in candidates:
        path = Path(path)
        if path.is_file():
            report = read_json(path)
            if not isinstance(report, dict):
                raise ValueError(f"{path}: gate report must be a JSON object")
            gate = dict(report)
            gate["passed"] = _verdict(report)
            gate["source"] = str(path)
            return gate
    return {"passed": False, "reason": "no gate report found at " + ", ".join(str(c) for c in candidates)}


def _verdict(report: Mapping[str, Any]) -> bool:
    """A top-level boolean ``passed``, or one nested a level down (``{"gate": {"passed": ...}}``); else False."""
    if isinstance(report.get("passed"), bool):
        return report["passed"]
    for value in report.values():
        if isinstance(value, Mapping) and isinstance(value.get("passed"), bool):
            return value["passed"]
    return False


def build_manifest(root: str | Path, *, gate: Mapping[str, Any], profile: str, parity: Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> dict:
    """Assemble the manifest for the files now under ``root`` (pure apart from hashing the files)."""
    if not isinstance(gate.get("passed"), bool):
        raise ValueError("gate.passed: must be true or false")
    manifest = {"files": file_entries(root), "gate": dict(gate), "profile": profile, "parity": dict(parity)}
    manifest.update(extra or {})
    if not manifest["files"]:
        raise ValueError(f"{root}: release has no files")
    return manifest


def write_manifest(root: str | Path, manifest: Mapping[str, Any]) -> Path:
    return write_json(Path(root) / MANIFEST, manifest)


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: release manifest not found (run `anyflow export`)")
    manifest = read_json(path)
    for key in ("files", "gate"):
        if key not in manifest:
            raise ValueError(f"{path}: missing field '{key}'")
    return manifest


def release_problems(root: str | Path, manifest: Mapping[str, Any] | None = None,
                     allow_unlisted: bool = False) -> list[str]:
    """Every mismatch between ``root`` and its manifest: missing, wrong size, wrong sha256, unlisted files."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    problems = []
    listed = set()
    for entry in manifest["files"]:
        rel = entry["path"]
        listed.add(rel)
        p = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: path escapes the release")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry["size"]:
            problems.append(f"{rel}: size {p.stat().st_size} != manifest {entry['size']}")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (tampered or corrupt)")
    if not allow_unlisted:
        for p in sorted(q for q in root.rglob("*") if q.is_file()):
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")
    return problems


def verify_release(root: str | Path, allow_unlisted: bool = False) -> dict:
    """Check every file of a release against ``manifest.json``; returns the manifest, raises
    :class:`ReleaseVerificationError` listing every problem."""
    manifest = read_manifest(root)
    problems = release_problems(root, manifest, allow_unlisted=allow_unlisted)
    if problems:
        raise ReleaseVerificationError(f"{root}: release does not match its manifest: " + "; ".join(problems))
    return manifest
