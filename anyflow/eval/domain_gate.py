"""The domain gate ([G]) as a pure function over two gate-style reports: the base student and the domain-adapted
student, each evaluated on held-out prompts of both the base domain and the new domain.

Report layout (one per student, written by :mod:`anyflow.stages.domain`)::

    {"shapes":  {"by_nfe": {"1": {"total": ..., "semantic": ..., "dimensions": {...}}, "2": ..., ...}},
     "driving": {"by_nfe": {...}}}

Criteria (stable names; the gate fails with the names of those that fail):

* ``domain_semantic@4``: Semantic(adapted, new domain, 4 NFE) > Semantic(base, new domain, 4 NFE) — the adaptation
  must improve the new domain's prompt following;
* ``forgetting@<n>``: for every NFE n both reports evaluated on the base domain,
  Total(adapted, base domain, n) ≥ Total(base, base domain, n) − ``forgetting_tolerance``;
* ``<domain>:monotone_<a>_to_<b>``: the any-step criterion of the release gate (:func:`anyflow.eval.gate.check`,
  ``gate.policy.monotone_*``) on the adapted student's Totals, on each domain.
"""

from __future__ import annotations

from typing import Any, Mapping

from anyflow.eval import gate as release_gate

GATE_NFE = release_gate.GATE_NFE


def _by_nfe(report: Mapping, domain: str, who: str) -> dict[int, Mapping]:
    if domain not in report:
        raise KeyError(f"{who} report: no evaluation on domain {domain!r} (has {sorted(report)})")
    return {int(k): v for k, v in report[domain]["by_nfe"].items()}


def check(base: Mapping, adapted: Mapping, policy: Any, forgetting_tolerance: float, domain: str = "driving",
          base_domain: str = "shapes") -> list[dict]:
    """Every criterion as ``{"name", "passed", "value", "threshold"}`` (value None when not evaluable)."""
    out: list[dict] = []
    b_new, a_new = _by_nfe(base, domain, "base"), _by_nfe(adapted, domain, "adapted")
    if GATE_NFE in b_new and GATE_NFE in a_new:
        v, thr = float(a_new[GATE_NFE]["semantic"]), float(b_new[GATE_NFE]["semantic"])
        out.append({"name": f"domain_semantic@{GATE_NFE}", "passed": v > thr, "value": v, "threshold": thr})
    else:
        out.append({"name": f"domain_semantic@{GATE_NFE}", "passed": False, "value": None, "threshold": None})
    b_old, a_old = _by_nfe(base, base_domain, "base"), _by_nfe(adapted, base_domain, "adapted")
    common = sorted(set(b_old) & set(a_old))
    if not common:
        out.append({"name": "forgetting", "passed": False, "value": None, "threshold": None})
    for n in common:
        v, thr = float(a_old[n]["total"]), float(b_old[n]["total"]) - float(forgetting_tolerance)
        out.append({"name": f"forgetting@{n}", "passed": v >= thr, "value": v, "threshold": thr})
    for name in (base_domain, domain):  # the release gate's any-step criterion, verbatim
        crit = release_gate.check({"teacher": {"total": 0.0}, "candidate": adapted[name]}, policy)
        out += [dict(c, name=f"{name}:{c['name']}") for c in crit if c["name"].startswith("monotone_")]
    return out


def failed_criteria(base: Mapping, adapted: Mapping, policy: Any, forgetting_tolerance: float,
                    domain: str = "driving", base_domain: str = "shapes") -> list[str]:
    """Names of the criteria that fail (empty list: the domain gate passes)."""
    return [c["name"] for c in check(base, adapted, policy, forgetting_tolerance, domain, base_domain)
            if not c["passed"]]
