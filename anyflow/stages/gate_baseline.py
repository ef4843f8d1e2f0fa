"""``anyflow gate-baseline``: the gate's baseline rows, computed beside stage 2 (DVC stage ``gate_baseline``).

The gate reports baselines beside its candidate — on the toy, the consistency student at every gate NFE (the paper's
Fig. 1 comparison). Those rows depend on the baseline adapter, the teacher rows (``gate_reference``) and the gate's
settings, not on the candidate; computed inside the gate they were ~40 s of its 90 s at the end of the toy pipeline's
critical path (2026-12-02, 2-core CPU), where the other core idles. This stage computes them with the gate's own
function (:func:`anyflow.stages.gate.adapter_rows`) as soon as the baseline adapter exists, so under
``anyflow repro --jobs 2`` they run beside stage 2; ``anyflow gate --baseline artifacts/gate_baseline`` reads them.

Output (swapped in atomically; no timings in the rows' fingerprint): ``artifacts/gate_baseline/rows.json`` —
``fingerprint`` (the teacher reference's fingerprint, and per baseline its name, adapter sha256, paradigm,
architecture, the drift NFEs) and ``rows`` (each baseline's gate entry, in --compare order); ``metrics/
gate_baseline.json`` (seconds). The gate checks the fingerprint against what it would compute the rows from and
names every difference (tests/test_gate_stage.py: a gate reading the stored rows writes the same report bytes as one
computing them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from anyflow.config import Config
from anyflow.stages.common import StagePaths
from anyflow.utils.io import _json_default, atomic_dir, atomic_write_text, read_json, sha256_file, write_json

OUT = "gate_baseline"
ROWS = "rows.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compare", action="append", default=[], metavar="ADAPTER", required=True,
                   help="baseline adapter (as `anyflow gate --compare`); repeatable")
    p.add_argument("--reference", required=True, metavar="DIR",
                   help="the teacher rows of `anyflow gate-reference` the baseline is scored against")
    p.add_argument("--drift-nfes", type=int, nargs="*", default=None,
                   help="FAR baselines: as `anyflow gate --drift-nfes` (default: the gate's)")
    p.add_argument("--out", default=OUT, help="output name: artifacts/<out>, metrics/<out>.json")
    p.add_argument("--no-progress", action="store_true")


def fingerprint(reference: dict, adapters: dict, paradigms: dict, archs: dict, drift_nfes) -> dict:
    """What the stored rows depend on: the teacher reference (its own fingerprint: teacher, FVD net, evaluation set,
    gate settings) and each baseline adapter's bytes, sampler and architecture."""
    return {"reference": reference, "drift_nfes": list(drift_nfes),
            "baselines": {name: {"adapter_sha256": sha256_file(path), "paradigm": paradigms[name],
                                 "architecture": archs[name]} for name, path in adapters.items()}}


def load(path: Path, cfg: Config, es, reference: dict, adapters: dict, paradigms: dict, archs: dict,
         drift_nfes) -> dict:
    """The stored rows of ``adapters`` (name → path, in the gate's order); ValueError naming what differs when they
    were computed from other inputs."""
    from anyflow.stages.gate_reference import _differences

    path = Path(path)
    if not (path / ROWS).is_file():
        raise FileNotFoundError(f"{path / ROWS}: gate baseline not found (run `anyflow gate-baseline`)")
    stored = read_json(path / ROWS)
    want = fingerprint(reference, adapters, paradigms, archs, drift_nfes)
    diff = _differences(want, stored.get("fingerprint") or {})
    if diff:
        raise ValueError(f"{path}: gate baseline computed from other inputs: {'; '.join(diff)} "
                         f"(re-run `anyflow gate-baseline`, or drop --baseline)")
    return {name: stored["rows"][name] for name in adapters}


def main(cfg: Config, args) -> int:
    from anyflow.stages import gate, gate_reference
    from anyflow.stages.gate import DRIFT_NFES, adapter_names, adapter_rows, architecture_of, paradigm_of, setup

    t0 = time.perf_counter()
    paths = StagePaths.of(cfg)
    drift_nfes = tuple(DRIFT_NFES if args.drift_nfes is None else args.drift_nfes)
    adapters = adapter_names(cfg, None, tuple(args.compare))
    paradigms = {name: paradigm_of(p, cfg) for name, p in adapters.items()}
    archs = {name: architecture_of(p) for name, p in adapters.items()}
    pipe, es, emb, neg, noise, bar, decode = setup(cfg, not args.no_progress, args.out,
                                                   2 * len(cfg.gate.nfes) * len(adapters))
    ref = gate_reference.load(Path(args.reference), cfg, es)
    if getattr(es, "fvd", None) is not None:
        es.fvd.teacher = ref.fvd_teacher
    rows = {name: adapter_rows(cfg, name, p, paradigms[name], archs[name], pipe, es, emb, noise, bar, decode,
                               ref.x_teacher, ref.teacher_features, drift_nfes) for name, p in adapters.items()}
    bar.close()
    out = {"fingerprint": fingerprint(ref.fingerprint, adapters, paradigms, archs, drift_nfes), "rows": rows}
    with atomic_dir(paths.root / args.out) as tmp:
        # timings stay out of the bytes: the rows' sampling_seconds go to metrics, as the gate's do
        atomic_write_text(tmp / ROWS, json.dumps(gate.without_timings(out), indent=2, default=_json_default) + "\n")
    seconds = time.perf_counter() - t0
    write_json(paths.metric(args.out), {"seconds": seconds, "sampling_seconds": {
        name: {nfe: r["sampling_seconds"] for nfe, r in e["by_nfe"].items()} for name, e in rows.items()}})
    print(f"gate baseline: {', '.join(f'{k} ({paradigms[k]})' for k in adapters)} at NFE {list(cfg.gate.nfes)} → "
          f"{paths.root / args.out} ({seconds:.0f} s)")
    return 0
