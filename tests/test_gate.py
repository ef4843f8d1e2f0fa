"""Gate policy: passes a report meeting every criterion, fails naming each broken criterion."""

import copy

from anyflow.config import GatePolicy
from anyflow.eval.gate import check, failed_criteria

POLICY = GatePolicy(total_tolerance=0.02, monotone_tolerance=0.01, monotone_from_nfe=2,
                    semantic_floors={"color": 0.5, "shape": 0.3, "direction": 0.5})


def _report(totals: dict[int, float], teacher: float = 0.80, sem: dict | None = None) -> dict:
    sem = sem or {"color": 0.9, "shape": 0.8, "direction": 0.9}
    return {"teacher": {"total": teacher},
            "candidate": {"by_nfe": {str(n): {"total": t, "dimensions": dict(sem)} for n, t in totals.items()}}}


GOOD = {1: 0.60, 2: 0.75, 4: 0.79, 8: 0.795, 16: 0.80, 32: 0.80}


def test_passes_when_all_criteria_met():
    assert failed_criteria(_report(GOOD), POLICY) == []
    names = [c["name"] for c in check(_report(GOOD), POLICY)]
    # 1 → 2 is exempt (monotone_from_nfe = 2): 2→4, 4→8, 8→16, 16→32
    assert names[:5] == ["total_at_4", "monotone_2_to_4", "monotone_4_to_8", "monotone_8_to_16", "monotone_16_to_32"]


def test_total_at_4_within_tolerance_boundary():
    assert "total_at_4" not in failed_criteria(_report({**GOOD, 4: 0.781}), POLICY)  # 0.80 − 0.02 = 0.78
    assert failed_criteria(_report({**GOOD, 4: 0.77, 2: 0.70}), POLICY) == ["total_at_4"]


def test_monotone_violation_named():
    bad = {**GOOD, 16: 0.77}  # drops 0.025 > 0.01 from 8 to 16
    assert failed_criteria(_report(bad), POLICY) == ["monotone_8_to_16"]
    # a small dip within tolerance passes; a dip before monotone_from_nfe is ignored
    assert failed_criteria(_report({**GOOD, 16: 0.788}), POLICY) == []
    assert failed_criteria(_report({**GOOD, 1: 0.9}), POLICY) == []


def test_semantic_floor_and_missing_nfe_named():
    r = _report(GOOD)
    r["candidate"]["by_nfe"]["8"]["dimensions"]["shape"] = 0.1
    assert failed_criteria(r, POLICY) == ["semantic_floor_shape@8"]
    r2 = copy.deepcopy(_report(GOOD))
    del r2["candidate"]["by_nfe"]["4"]
    assert "total_at_4" in failed_criteria(r2, POLICY)
    # policy given as a plain mapping (params.yaml) works the same
    assert failed_criteria(_report(GOOD), {"total_tolerance": 0.02, "monotone_tolerance": 0.01,
                                           "monotone_from_nfe": 2, "semantic_floors": {"color": 0.95}}) == [
        "semantic_floor_color@4", "semantic_floor_color@8", "semantic_floor_color@16", "semantic_floor_color@32"]
