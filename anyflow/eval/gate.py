"""The release gate policy (``cfg.gate.policy``, DESIGN §5) as a pure function over a gate report.

Report layout (written by :mod:`anyflow.stages.gate`)::

    {"teacher": {"total": T, "quality": ..., "semantic": ..., "dimensions": {toy_name: score}},
     "candidate": {"by_nfe": {"1": {"total": ..., "dimensions": {...}}, "2": {...}, ...}}}

Criteria (each has a stable name; the gate fails with the names of those that fail):

* ``total_at_4``: Total(candidate, 4 NFE) ≥ Total(teacher) − ``total_tolerance``;
* ``monotone_<a>_to_<b>``: for consecutive evaluated NFEs a < b with a ≥ ``monotone_from_nfe``,
  Total(b) ≥ Total(a) − ``monotone_tolerance`` (the any-step criterion: more steps never hurt);
* ``semantic_floor_<dim>@<nfe>``: the semantic accuracy of ``dim`` (toy name: color, shape, direction) at every
  evaluated NFE ≥ 4 is ≥ its floor.
"""

from __future__ import annotations

from typing import Any, Mapping

GATE_NFE = 4


def _get(policy: Any, name: str):
    return policy[name] if isinstance(policy, Mapping) else getattr(policy, name)


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
    for dim, floor in dict(_get(policy, "semantic_floors")).items():
        for n in (n for n in nfes if n >= GATE_NFE):
            dims = by_nfe[n].get("dimensions", {})
            v = dims.get(dim)
            out.append({"name": f"semantic_floor_{dim}@{n}", "passed": v is not None and float(v) >= float(floor),
                        "value": None if v is None else float(v), "threshold": float(floor)})
    return out


def failed_criteria(report: Mapping, policy: Any) -> list[str]:
    """Names of the criteria the report fails (empty list: the gate passes)."""
    return [c["name"] for c in check(report, policy) if not c["passed"]]
