"""The release store interface (DESIGN §6) and the release-manifest contract shared by every backend.

A *release* is the directory written by ``anyflow export``: model files plus ``manifest.json``::

    {"files": [{"path": "transformer/model.onnx", "sha256": "…", "size": 123}, …], "gate": {"passed": true, …}}

Provenance (``git_sha``, ``git_dirty``, ``dvc_lock_digest``) is not part of the release — the same code and
params export the same bytes anywhere — but of the candidate's metadata, recorded at ``anyflow promote``
(:func:`anyflow.export.manifest.provenance`). Manifests written before that carry it themselves; it is read
from there when the metadata lacks it.

Life cycle, the same for every backend:

1. ``put_release(dir)`` stores the directory as a **candidate** (always, also when its gate failed, so a failed
   candidate can be inspected);
2. ``promote(candidate)`` makes it a named, immutable **release** and the new ``latest`` — only if the manifest's
   ``gate.passed`` is true (:class:`GateFailedError` otherwise, and nothing changes);
3. ``rollback(name)`` makes an earlier release ``latest`` again;
4. ``pull(name, dest)`` downloads into a temporary directory beside ``dest``, verifies every file's size and sha256
   against the manifest, and only then swaps the directory in; on any mismatch ``dest`` is left as it was.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from anyflow.utils.io import atomic_dir, read_json, sha256_file

MANIFEST = "manifest.json"
LATEST = "latest"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
PROVENANCE = ("git_sha", "git_dirty", "dvc_lock_digest")


class StoreError(RuntimeError):
    """A store operation failed; the message names the release, file or field."""


class GateFailedError(StoreError):
    """Promotion refused: the candidate's manifest says ``gate.passed`` is false."""


class VerificationError(StoreError):
    """A pulled file is missing, has the wrong size or the wrong sha256."""


@dataclass(frozen=True)
class Candidate:
    """A stored, not yet promoted release. ``ref`` is backend-specific (a directory, a lakeFS commit id)."""

    name: str
    gate_passed: bool
    ref: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Release:
    """A promoted release. ``ref`` is backend-specific (a directory, a lakeFS tag)."""

    name: str
    ref: str


# ------------------------------------------------------------------------------------------------ manifest
def validate_manifest(manifest: Any, where: str = MANIFEST) -> dict:
    """Check the manifest contract (see module docstring); every error names ``where`` and the field."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: top level must be an object")
    for key in ("files", "gate"):
        if key not in manifest:
            raise ValueError(f"{where}: missing field '{key}'")
    files = manifest["files"]
    if not isinstance(files, list) or not files:
        raise ValueError(f"{where}: 'files' must be a non-empty list")
    seen = set()
    for i, entry in enumerate(files):
        loc = f"{where}: files[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{loc}: must be an object with path, sha256, size")
        for key in ("path", "sha256", "size"):
            if key not in entry:
                raise ValueError(f"{loc}: missing field '{key}'")
        path = entry["path"]
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in Path(path).parts:
            raise ValueError(f"{loc}.path: must be a relative path inside the release (got {path!r})")
        if path == MANIFEST:
            raise ValueError(f"{loc}.path: the manifest cannot list itself")
        if path in seen:
            raise ValueError(f"{loc}.path: duplicate {path!r}")
        seen.add(path)
        if not isinstance(entry["sha256"], str) or not _SHA.match(entry["sha256"]):
            raise ValueError(f"{loc}.sha256: must be 64 lowercase hex digits (got {entry['sha256']!r})")
        if not isinstance(entry["size"], int) or isinstance(entry["size"], bool) or entry["size"] < 0:
            raise ValueError(f"{loc}.size: must be a non-negative integer (got {entry['size']!r})")
    gate = manifest["gate"]
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        raise ValueError(f"{where}: 'gate.passed' must be true or false")
    for key in PROVENANCE:
        if key in manifest and not isinstance(manifest[key], (str, bool)):
            raise ValueError(f"{where}: '{key}' must be a string")
    return manifest


def read_manifest(release_dir: str | Path) -> dict:
    """Read and validate ``<release_dir>/manifest.json`` (errors name the file and the field)."""
    path = Path(release_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: release manifest not found (run `anyflow export` first)")
    return validate_manifest(read_json(path), where=str(path))


def verify_tree(root: str | Path, manifest: Mapping) -> None:
    """Every manifest file exists under ``root`` with the listed size and sha256, else :class:`VerificationError`."""
    root = Path(root)
    for entry in manifest["files"]:
        p = root / entry["path"]
        if not p.is_file():
            raise VerificationError(f"{entry['path']}: missing from the release")
        size = p.stat().st_size
        if size != entry["size"]:
            raise VerificationError(f"{entry['path']}: size {size} != manifest size {entry['size']}")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise VerificationError(f"{entry['path']}: sha256 {digest} != manifest sha256 {entry['sha256']}")


def check_name(name: str) -> str:
    """Release names double as lakeFS tag/branch ids: letters, digits, '_' and '-', at most 63 characters."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"release name {name!r}: use letters, digits, '_' and '-' (1-63 characters)")
    return name


def default_name(metadata: Mapping, when: str) -> str:
    """``r<UTC yyyymmddHHMMSS>-<git sha[:8]>``: sortable by time and traceable to the source commit."""
    sha = re.sub(r"[^0-9a-zA-Z]", "", str(metadata.get("git_sha") or ""))[:8] or "nogit"
    return check_name(f"r{when}-{sha}")


def commit_metadata(manifest: Mapping, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Flat string metadata for a commit/registry entry: provenance (from ``extra``, else an older manifest),
    every gate metric, then ``extra``."""
    extra = dict(extra or {})
    meta = {key: _str(extra.get(key, manifest.get(key, ""))) for key in PROVENANCE}
    for key, value in _flatten(manifest["gate"], "gate.").items():
        meta[key] = _str(value)
    for key, value in extra.items():
        meta[str(key)] = _str(value)
    return meta


def _str(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        return {prefix.rstrip("."): ",".join(str(v) for v in obj)}
    return {prefix.rstrip("."): obj}


# ------------------------------------------------------------------------------------------------ interface
class Store(abc.ABC):
    """Candidate → gated promotion → named releases with a ``latest`` pointer, rollback and verified pulls."""

    @abc.abstractmethod
    def put_release(self, release_dir: str | Path, metadata: Mapping[str, Any] | None = None,
                    name: str | None = None) -> Candidate:
        """Store ``release_dir`` (validated manifest) as a candidate named ``name`` (default: time + git sha)."""

    @abc.abstractmethod
    def promote(self, candidate: Candidate | str) -> Release:
        """Make a candidate a release and the new ``latest``; :class:`GateFailedError` if its gate failed."""

    @abc.abstractmethod
    def rollback(self, to_release: str) -> Release:
        """Make the earlier release ``to_release`` the ``latest`` again."""

    @abc.abstractmethod
    def list(self) -> list[str]:
        """Promoted release names, oldest first."""

    @abc.abstractmethod
    def latest(self) -> str | None:
        """Name of the current release, or None when nothing was promoted."""

    @abc.abstractmethod
    def _fetch(self, name: str, tmp: Path) -> None:
        """Download release ``name`` (manifest and files) into the empty directory ``tmp``."""

    def pull(self, name: str, dest: str | Path) -> Path:
        """Fetch ``name`` ('latest' allowed) into ``dest``, all-or-nothing, every sha256 verified."""
        if name == LATEST:
            current = self.latest()
            if current is None:
                raise StoreError("no release has been promoted yet ('latest' is empty)")
            name = current
        check_name(name)
        dest = Path(dest)
        with atomic_dir(dest) as tmp:
            self._fetch(name, tmp)
            manifest = read_manifest(tmp)
            verify_tree(tmp, manifest)
            listed = {e["path"] for e in manifest["files"]} | {MANIFEST}
            extra = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()
                           and str(p.relative_to(tmp)) not in listed)
            if extra:
                raise VerificationError(f"release {name}: files not listed in the manifest: {', '.join(extra)}")
        return dest
