"""``anyflow promote``: store ``artifacts/release`` as a candidate and promote it only if its gate passed.

Not a DVC stage (promotion is a side effect). Exit codes: 0 promoted (or rolled back), 3 refused because the gate
failed (the candidate is stored, nothing is promoted), 1 any other error. ``--rollback NAME`` makes an earlier
release current again; ``--list`` prints the releases. lakeFS credentials are read here, at the edge, from
``LAKEFS_ACCESS_KEY_ID`` / ``LAKEFS_SECRET_ACCESS_KEY``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from anyflow.config import Config
from anyflow.stages.common import StagePaths

EXIT_GATE_FAILED = 3


def add_arguments(parser) -> None:
    parser.add_argument("--release", default=None, help="release directory (default: <paths.root>/release)")
    parser.add_argument("--name", default=None, help="release name (default: r<UTC time>-<git sha>)")
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                        help="extra metadata recorded with the candidate (e.g. the Prefect flow-run id)")
    parser.add_argument("--rollback", default=None, metavar="NAME", help="make release NAME current again")
    parser.add_argument("--list", action="store_true", help="list promoted releases and the current one")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def open_configured_store(cfg: Config):
    """The configured store, with lakeFS credentials taken from the environment (the only place we read them)."""
    from anyflow.store import open_store

    return open_store(cfg.store, os.environ.get("LAKEFS_ACCESS_KEY_ID"), os.environ.get("LAKEFS_SECRET_ACCESS_KEY"))


def gate_metrics_for(manifest: dict, paths: StagePaths) -> Path:
    """The metrics file of the gate that judged this release: the manifest's ``gate.source`` names the report
    (``artifacts/<name>/report.json`` or ``metrics/<name>.json``) and the gate writes ``metrics/<name>.json``
    — ``gate`` for the distilled student, ``domain`` for a domain-adapted one."""
    source = Path(str(manifest.get("gate", {}).get("source") or "gate.json"))
    name = source.parent.name if source.name == "report.json" else source.stem
    return paths.metric(name or "gate")


def gate_verdict(release_dir: Path, paths: StagePaths) -> tuple[bool, str]:
    """(passed, reason) from the release manifest, cross-checked with the latest metrics of the gate that judged
    it (:func:`gate_metrics_for`) if present.

    A failing ``anyflow gate`` stops ``dvc repro`` before export, so ``artifacts/release`` may still hold an older,
    passing release; ``metrics/gate.json`` (written by the gate run that just failed) catches that.
    """
    from anyflow.store import read_manifest
    from anyflow.utils.io import read_json

    manifest = read_manifest(release_dir)
    if not manifest["gate"]["passed"]:
        return False, f"{release_dir}/manifest.json: gate.passed is false"
    gate_metrics = gate_metrics_for(manifest, paths)
    if gate_metrics.exists():
        metrics = read_json(gate_metrics)
        if isinstance(metrics, dict) and metrics.get("passed") is False:
            return False, f"{gate_metrics}: passed is false (the latest gate run failed; the release is stale)"
    return True, "gate passed"


def _emit(args, payload: dict) -> None:
    print(json.dumps(payload, sort_keys=True) if args.json else
          " ".join(f"{k}={v}" for k, v in payload.items()))


def main(cfg: Config, args) -> int:
    from anyflow.export.manifest import provenance
    from anyflow.store import GateFailedError

    store = open_configured_store(cfg)
    if args.list:
        _emit(args, {"releases": store.list(), "latest": store.latest()})
        return 0
    if args.rollback:
        release = store.rollback(args.rollback)
        _emit(args, {"action": "rollback", "release": release.name, "latest": store.latest()})
        return 0
    paths = StagePaths.of(cfg)
    release_dir = Path(args.release) if args.release else paths.release
    passed, reason = gate_verdict(release_dir, paths)
    # provenance is recorded here, not in the release (whose bytes depend only on code, params and seeds)
    extra = {**provenance("."), **dict(item.split("=", 1) for item in args.meta if "=" in item)}
    candidate = store.put_release(release_dir, metadata=extra, name=args.name)
    if not passed:
        print(f"anyflow promote: refused: {reason}; candidate {candidate.name} stored, nothing promoted",
              file=sys.stderr)
        _emit(args, {"action": "refused", "candidate": candidate.name, "reason": reason})
        return EXIT_GATE_FAILED
    try:
        release = store.promote(candidate)
    except GateFailedError as err:
        print(f"anyflow promote: refused: {err}", file=sys.stderr)
        _emit(args, {"action": "refused", "candidate": candidate.name, "reason": str(err)})
        return EXIT_GATE_FAILED
    _emit(args, {"action": "promote", "release": release.name, "latest": store.latest()})
    return 0
