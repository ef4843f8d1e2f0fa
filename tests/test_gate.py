"""Gate policy: passes a report meeting every criterion, fails naming each broken criterion."""

import copy

import pytest

from anyflow.config import GatePolicy
from anyflow.eval.gate import check, failed_criteria

POLICY = GatePolicy(total_tolerance=0.02, monotone_tolerance=0.01, monotone_from_nfe=2,
                    semantic_floors={"color": 0.5, "shape": 0.3, "direction": 0.5})


def _report(totals: dict[int, float], teacher: float = 0.80, sem: dict | None = None) -> dict:
    """A gate report as the stage writes it ([J]): the teacher at the same budget (N steps × CFG) well below the
    student at every NFE, the fidelity dimension (latent distance) falling with NFE."""
    sem = sem or {"color": 0.9, "shape": 0.8, "direction": 0.9}
    return {"teacher": {"total": teacher},
            "teacher_at_budget": {"by_nfe": {str(n): {"total": t - 0.2} for n, t in totals.items()}},
            "candidate": {"by_nfe": {str(n): {"total": t, "dimensions": dict(sem),
                                              "fidelity": {"latent_distance": 1.0 / n}}
                                     for n, t in totals.items()}}}


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


# --- [J] the teacher at the same budget, the fidelity dimension, dead dimensions ---------------------------------
def test_student_must_beat_the_teacher_at_equal_budget_up_to_8():
    r = _report(GOOD)
    r["teacher_at_budget"]["by_nfe"]["2"]["total"] = 0.76  # the 2-step × CFG teacher beats the 2-NFE student
    r["teacher_at_budget"]["by_nfe"]["16"]["total"] = 0.99  # beyond beat_teacher_up_to_nfe = 8: not a criterion
    assert failed_criteria(r, POLICY) == ["beats_teacher@2"]
    names = [c["name"] for c in check(r, POLICY)]
    assert [n for n in names if n.startswith("beats_teacher")] == [f"beats_teacher@{n}" for n in (1, 2, 4, 8)]
    r["teacher_at_budget"]["by_nfe"]["2"]["total"] = GOOD[2]  # a tie is not a win
    assert failed_criteria(r, POLICY) == ["beats_teacher@2"]
    del r["teacher_at_budget"]  # a report without the budget rows cannot show it
    assert failed_criteria(r, POLICY) == [f"beats_teacher@{n}" for n in (1, 2, 4, 8)]


def test_fidelity_must_not_rise_from_2_nfe_and_accepts_a_plugged_in_metric():
    r = _report(GOOD)
    r["candidate"]["by_nfe"]["16"]["fidelity"]["latent_distance"] = 0.2  # 1/8 = 0.125 → 0.2: the consistency shape
    assert failed_criteria(r, POLICY) == ["fidelity_monotone_8_to_16"]
    r["candidate"]["by_nfe"]["1"]["fidelity"]["latent_distance"] = 0.01  # 1 → 2 is exempt (monotone_from_nfe)
    assert failed_criteria(r, POLICY) == ["fidelity_monotone_8_to_16"]
    # within the relative tolerance (2 %) passes
    r["candidate"]["by_nfe"]["16"]["fidelity"]["latent_distance"] = 0.125 * 1.019
    assert failed_criteria(r, POLICY) == []
    # a later metric (the toy FVD) recorded as its own key per NFE, by name
    fvd = GatePolicy(**{**POLICY.__dict__, "fidelity_metric": "fvd"})
    for n, e in r["candidate"]["by_nfe"].items():
        e["fvd"] = {"value": 100.0 / int(n)}
    assert failed_criteria(r, fvd) == []
    r["candidate"]["by_nfe"]["32"]["fvd"] = {"value": 50.0}
    assert failed_criteria(r, fvd) == ["fidelity_monotone_16_to_32"]
    del r["candidate"]["by_nfe"]["4"]["fvd"]  # missing values fail, never pass silently
    assert {"fidelity_monotone_2_to_4", "fidelity_monotone_4_to_8"} <= set(failed_criteria(r, fvd))


def test_dead_dimensions_rule_and_no_floor_on_them():
    from anyflow.eval.gate import dead_dimensions

    teacher = {"color": 0.99, "shape": 0.417, "direction": 1.0, "dynamic_degree": 1.0, "motion_smoothness": 0.8}
    rows = [{"color": 1.0, "shape": 0.417, "direction": 1.0, "dynamic_degree": 1.0, "motion_smoothness": 0.7},
            {"color": 0.9, "shape": 0.417, "direction": 0.98, "dynamic_degree": 1.0, "motion_smoothness": 0.75}]
    dead = dead_dimensions(teacher, rows, 0.5)
    assert sorted(dead) == ["dynamic_degree", "shape"]
    assert "teacher cannot do it" in dead["shape"] and "0.417" in dead["shape"]
    assert "constant" in dead["dynamic_degree"]
    # a dimension the teacher does well, varying over rows, is live; a constant one is dead even when it is 1.0
    assert "color" not in dead and "direction" not in dead
    assert "direction" in dead_dimensions(teacher, [dict(r, direction=1.0) for r in rows], 0.5)
    # the policy skips the floor of a dead dimension (shape 0.1 at 8 NFE fails only while shape is live)
    r = _report(GOOD)
    r["candidate"]["by_nfe"]["8"]["dimensions"]["shape"] = 0.1
    assert failed_criteria(r, POLICY) == ["semantic_floor_shape@8"]
    r["dead_dimensions"] = {"shape": dead["shape"]}
    assert failed_criteria(r, POLICY) == []
    assert not [c for c in check(r, POLICY) if c["name"].startswith("semantic_floor_shape")]


def test_aggregate_drops_dead_dimensions_from_total():
    from anyflow.eval import vbench_like as V

    scores = {"subject_consistency": 0.9, "background_cleanliness": 0.8, "temporal_flickering": 0.95,
              "motion_smoothness": 0.9, "dynamic_degree": 1.0, "imaging_quality": 0.5, "color": 1.0,
              "shape": 0.417, "direction": 1.0}
    full, dropped = V.aggregate(scores), V.aggregate(scores, drop=("shape", "dynamic_degree"))
    live = {k: v for k, v in scores.items() if k not in ("shape", "dynamic_degree")}
    assert dropped["total"] == pytest.approx(V.aggregate(live)["total"])
    assert dropped["semantic"] == pytest.approx(1.0) and full["semantic"] < 0.81
    # a constant kept in the Total compresses differences: dropping it widens the gap between two candidates
    worse = dict(scores, motion_smoothness=0.8)
    assert (dropped["total"] - V.aggregate(worse, drop=("shape", "dynamic_degree"))["total"]
            > full["total"] - V.aggregate(worse)["total"])
    # every semantic dimension dead: Total is Quality alone (not None, not a constant)
    all_sem = V.aggregate(scores, drop=("color", "shape", "direction"))
    assert all_sem["semantic"] is None and all_sem["total"] == pytest.approx(all_sem["quality"])


def test_outputs_survive_a_group_dropped_whole(tmp_path):
    """When every semantic dimension is dead (a teacher below the accuracy floor on all of them), Semantic is None
    and Total is Quality alone: the plot leaves the Semantic panel's points out and the summary shows blanks, instead
    of crashing after the report was computed (found by the e2e pipeline on its 10-step teacher)."""
    from anyflow.eval.report import summary_markdown, write_step_plot

    row = lambda total: {"total": total, "quality": total, "semantic": None, "dimensions": {},  # noqa: E731
                         "fidelity": {"latent_distance": 0.5}}
    report = {"teacher": {**row(0.8), "nfe": 100}, "candidate": {"by_nfe": {"1": row(0.7), "4": row(0.75)}},
              "baselines": {}, "passed": False, "failed": ["total_at_4"], "policy": {"total_tolerance": 0.02}}
    png = write_step_plot(report, tmp_path / "steps.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| student | 4 | 0.750 | 0.750 |  |" in summary_markdown(report)


def test_gate_cli_prints_a_report_without_semantic(monkeypatch, capsys):
    """The stage's console lines read the same report: Semantic None is said, not formatted (a TypeError there
    killed the e2e pipeline's gate after it had written its outputs)."""
    from anyflow.stages import gate

    row = {"total": 0.8, "quality": 0.8, "semantic": None}
    report = {"teacher": {**row, "steps": 50, "guidance_scale": 5.0, "guidance_convention": "u + w·(c − u)",
                          "nfe": 100},
              "teacher_at_budget": {"by_nfe": {"4": row}}, "dead_dimensions": {"color": "teacher below floor"},
              "candidate": {"paradigm": "flowmap", "by_nfe": {"4": row}}, "baselines": {}, "passed": True,
              "criteria": [], "failed": []}
    monkeypatch.setattr(gate, "run", lambda *a, **k: report)
    args = type("A", (), dict(candidate="stage2", paradigm=None, compare=[], out="gate", no_progress=True))
    assert gate.main(None, args) == 0
    out = capsys.readouterr().out
    assert "semantic dropped: every semantic dimension dead" in out and "gate PASSED" in out


def test_floors_apply_only_to_dimensions_the_evaluation_set_measures():
    """A prompt-file evaluation set (real models) has no colour/shape/direction: their floors do not apply — and do
    not fail the gate as missing — while a measured dimension below its floor still fails it."""
    r = _report(GOOD, sem={"temporal_flickering": 0.9})
    r["teacher"]["dimensions"] = {"temporal_flickering": 0.95}
    assert failed_criteria(r, POLICY) == []
    assert not [c for c in check(r, POLICY) if c["name"].startswith("semantic_floor")]
    r["teacher"]["dimensions"]["color"] = 0.9  # measured by the set, but missing in the candidate's rows
    assert failed_criteria(r, POLICY)[:1] == ["semantic_floor_color@4"]


def test_drift_metrics_of_a_prompt_set_have_no_semantic_delta():
    """A FAR gate on a prompt set (a real model) has Total = Quality and no semantic score: its drift metrics carry
    the quality delta and None for semantic (metrics_of raised TypeError on None − None; `make wan-smoke`)."""
    from anyflow.stages.gate import metrics_of

    row = {"total": 0.7, "quality": 0.7, "semantic": None, "fidelity": {"latent_distance": 0.3}}
    drift = {"first": {"total": 0.8, "quality": 0.8, "semantic": None},
             "last": {"total": 0.75, "quality": 0.75, "semantic": None}, "delta_total": -0.05, "seconds_per_chunk": 0.1}
    report = {"candidate": {"paradigm": "flowmap", "by_nfe": {"4": row}, "drift": {"4": drift}},
              "teacher": {"total": 0.8, "quality": 0.8, "semantic": None, "nfe": 100}, "baselines": {},
              "passed": True, "failed": [], "num_samples": 2, "seconds": {"total": 1.0}}
    got = metrics_of(report)["drift"]["candidate"]["4"]
    assert got["delta_semantic"] is None and got["delta_quality"] == pytest.approx(-0.05)
