"""``anyflow pull NAME --dest DIR``: fetch a release (or ``latest``) and verify every file's sha256.

The download goes to a temporary directory beside ``DIR`` and is swapped in only after every file matched the
release manifest; a mismatch is an error (exit 1) and leaves ``DIR`` as it was.
"""

from __future__ import annotations

from anyflow.config import Config


def add_arguments(parser) -> None:
    parser.add_argument("name", help="release name, or 'latest'")
    parser.add_argument("--dest", required=True, help="directory to create or replace")


def main(cfg: Config, args) -> int:
    from anyflow.stages.promote import open_configured_store
    from anyflow.store import StoreError

    store = open_configured_store(cfg)
    try:
        dest = store.pull(args.name, args.dest)
    except StoreError as err:  # VerificationError included: dest untouched
        raise RuntimeError(str(err)) from None
    print(f"pulled {args.name} -> {dest} (every sha256 verified)")
    return 0
