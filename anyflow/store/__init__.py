"""Release store (DESIGN §6): gated promotion of ``anyflow export`` releases, rollback and verified pulls.

``open_store(cfg.store, ...)`` picks the backend: ``local`` (embedded default, a directory registry) or ``lakefs``
(the maintained ``lakefs`` SDK). Credentials are arguments, read from the environment only at the CLI edge.
"""

from __future__ import annotations

from pathlib import Path

from anyflow.config import Store as StoreConfig
from anyflow.store.base import (LATEST, Candidate, GateFailedError, Release, Store, StoreError, VerificationError,  # noqa: F401
                                read_manifest, verify_tree)

__all__ = ["open_store", "read_manifest", "verify_tree", "Store", "Candidate", "Release", "StoreError",
           "GateFailedError", "VerificationError", "LATEST"]


def open_store(cfg: StoreConfig, access_key_id: str | None = None, secret_access_key: str | None = None,
               root: str | Path = ".") -> Store:
    """Build the configured backend. ``root`` anchors a relative ``local_root`` (the repository directory)."""
    if cfg.backend == "local":
        from anyflow.store.local import LocalStore

        return LocalStore(Path(root) / cfg.local_root)
    if cfg.backend == "lakefs":
        from anyflow.store.lakefs import LakeFSStore

        return LakeFSStore(cfg.lakefs_endpoint, access_key_id or "", secret_access_key or "",
                           cfg.lakefs_repository, cfg.lakefs_main)
    raise ValueError(f"store.backend: unknown backend {cfg.backend!r}")
