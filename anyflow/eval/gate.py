"""The release gate policy (``cfg.gate.policy``, DESIGN §5) as a pure function over a gate report.

Report layout (written by :mod:`anyflow.stages.gate`)::

    {"teacher": {"total": T, "quality": ..., "semantic": ..., "dimensions": {toy_name: score}, "guidance_scale": w},
     "teacher_at_budget": {"by_nfe": {"1": {"total": ..., "steps": 1, ...}, ...}},   # N Euler steps × CFG
     "candidate": {"by_nfe": {"1": {"total": ..., "dimensions": {...}, "fidelity": {...}}, "2": {...}, ...}},
     "dead_dimensions": {toy_name: reason}}

Criteria (each has a stable name; the gate fails with the names of those that fail):

* ``total_at_4``: Total(candidate, 4 NFE) ≥ Total(teacher) − ``total_tolerance``;
* ``monotone_<a>_to_<b>``: for consecutive evaluated NFEs a < b with a ≥ ``monotone_from_nfe``,
  Total(b) ≥ Total(a) − ``monotone_tolerance`` (the any-step criterion: more steps never hurt);
* ``fidelity_monotone_<a>_to_<b>``: the same NFE pairs on the fidelity dimension ``fidelity_metric`` (lower is
  better: latent distance to the teacher's sample, a Fréchet distance, later the toy FVD):
  f(b) ≤ f(a)·(1 + ``fidelity_rel_tolerance``); missing values fail;
* ``beats_teacher@<n>``: for every evaluated NFE n ≤ ``beat_teacher_up_to_nfe``, Total(candidate, n) >
  Total(teacher at n Euler steps × CFG) (``teacher_at_budget``; missing fails);
* ``semantic_floor_<dim>@<nfe>``: the semantic accuracy of ``dim`` (toy name: color, shape, direction) at every
  evaluated NFE ≥ 4 is ≥ its floor — for live dimensions only (a dimension in ``dead_dimensions`` has no floor).

Dead dimensions (:func:`dead_dimensions`): a dimension that is constant over every evaluated row (teacher, teacher
at budget, every model at every NFE), or a semantic accuracy the reference teacher scores below
``teacher_accuracy_floor`` on (the teacher cannot do it, so no student distilled from it can), carries no ranking
information: it is dropped from Quality / Semantic / Total everywhere in the report, with its reason.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

GATE_NFE = 4
ACCURACY_DIMS = ("color", "shape", "direction", "road_scene")  # semantic accuracies (the teacher-floor rule)
CONSTANT_ATOL = 1e-9


def _get(policy: Any, name: str, default=None):
    if isinstance(policy, Mapping):
        return policy.get(name, default)
    return getattr(policy, name, default)


def dead_dimensions(teacher_dims: Mapping[str, float], rows: Iterable[Mapping[str, float]],
                    teacher_floor: float) -> dict[str, str]:
    """``{dim: reason}`` for the dimensions to drop: a semantic accuracy (``ACCURACY_DIMS``) with the reference
    teacher's score below ``teacher_floor``, or a dimension whose score is the same (within ``CONSTANT_ATOL``) in
    ``teacher_dims`` and every one of ``rows`` (each a ``{dim: score}`` of one model at one NFE)."""
    rows = [dict(teacher_dims)] + [dict(r) for r in rows]
    dead: dict[str, str] = {}
    for dim, t in teacher_dims.items():
        if dim in ACCURACY_DIMS and float(t) < float(teacher_floor):
            dead[dim] = f"the teacher cannot do it: held-out accuracy {float(t):.3f} < floor {float(teacher_floor):g}"
            continue
        values = [float(r[dim]) for r in rows if r.get(dim) is not None]
        if len(rows) > 1 and len(values) == len(rows) and max(values) - min(values) <= CONSTANT_ATOL:
            dead[dim] = f"constant {values[0]:.4f} over the teacher and all {len(rows) - 1} evaluated rows"
    return dead


def fidelity_value(entry: Mapping, metric: str) -> Optional[float]:
    """The lower-is-better fidelity number ``metric`` of one NFE entry: ``entry[metric]`` (a number, or a dict with
    ``"value"``) or else ``entry["fidelity"][metric]``, where a dict (the gate's toy FVD, ``{"procedural": d,
    "teacher": d}``) gives its ``procedural`` distance; ``fvd.teacher`` names a key of it."""
    name, _, key = metric.partition(".")
    v = entry.get(metric)
    if isinstance(v, Mapping):
        v = v.get("value")
    if v is None:
        v = (entry.get("fidelity") or {}).get(name)
        if isinstance(v, Mapping):
            v = v.get(key or "procedural")
    return None if v is None else float(v)


def check(report: Mapping, policy: Any) -> list[dict]:
    """Every criterion as ``{"name", "passed", "value", "threshold"}`` (value/threshold None when not evaluable)."""
    teacher_total = float(report["teacher"]["total"])
    by_nfe = {int(k): v for k, v in report["candidate"]["by_nfe"].items()}
    nfes = sorted(by_nfe)
    out: list[dict] = []
    thr = teacher_total - float(_get(policy, "total_tolerance"))
    if GATE_NFE in by_nfe:
        v = float(by_nfe[GATE_NFE]["total"])
        out.append({"name": "total_at_4", "passed": v >= thr, "value": v, "threshold": thr})
    else:
        out.append({"name": "total_at_4", "passed": False, "value": None, "threshold": thr})
    tol, start = float(_get(policy, "monotone_tolerance")), int(_get(policy, "monotone_from_nfe"))
    mono = [n for n in nfes if n >= start]
    for a, b in zip(mono, mono[1:]):
        ta, tb = float(by_nfe[a]["total"]), float(by_nfe[b]["total"])
        out.append({"name": f"monotone_{a}_to_{b}", "passed": tb >= ta - tol, "value": tb, "threshold": ta - tol})
    metric = str(_get(policy, "fidelity_metric", "latent_distance"))
    rel = float(_get(policy, "fidelity_rel_tolerance", 0.0))
    for a, b in zip(mono, mono[1:]):
        fa, fb = fidelity_value(by_nfe[a], metric), fidelity_value(by_nfe[b], metric)
        ok = fa is not None and fb is not None and fb <= fa * (1 + rel)
        out.append({"name": f"fidelity_monotone_{a}_to_{b}", "passed": ok, "value": fb,
                    "threshold": None if fa is None else fa * (1 + rel), "metric": metric})
    budget = {int(k): v for k, v in (report.get("teacher_at_budget") or {}).get("by_nfe", {}).items()}
    for n in (n for n in nfes if n <= int(_get(policy, "beat_teacher_up_to_nfe", 0))):
        v = float(by_nfe[n]["total"])
        t = budget.get(n, {}).get("total")
        out.append({"name": f"beats_teacher@{n}", "passed": t is not None and v > float(t), "value": v,
                    "threshold": None if t is None else float(t)})
    return out + _floors(report, policy, by_nfe, nfes)


def _floors(report: Mapping, policy: Any, by_nfe: Mapping[int, Mapping], nfes: list[int]) -> list[dict]:
    dead = report.get("dead_dimensions") or {}
    measured = report["teacher"].get("dimensions")  # None: a report without the teacher's dimensions (all apply)
    out = []
    for dim, floor in dict(_get(policy, "semantic_floors")).items():
        if dim in dead or (measured is not None and dim not in measured):
            continue  # dead, or not a dimension of this evaluation set (a prompt file has no colour ground truth)
        for n in (n for n in nfes if n >= GATE_NFE):
            dims = by_nfe[n].get("dimensions", {})
            v = dims.get(dim)
            out.append({"name": f"semantic_floor_{dim}@{n}", "passed": v is not None and float(v) >= float(floor),
                        "value": None if v is None else float(v), "threshold": float(floor)})
    return out


def failed_criteria(report: Mapping, policy: Any) -> list[str]:
    """Names of the criteria the report fails (empty list: the gate passes)."""
    return [c["name"] for c in check(report, policy) if not c["passed"]]
