"""``anyflow gate`` end to end on a tiny trained teacher: the samples it compares are aligned (same noise, same
schedule), the verdict and its named failures reach metrics/report before the exit code, and the outputs people
look at (summary, plot, previews, DVC plot) hold what the report says."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from anyflow.config import GatePolicy
from anyflow.eval.report import preview_grid, step_rows
from anyflow.export.manifest import gate_summary
from anyflow.utils.io import read_json

NFES = (1, 4, 50)


def _setup(root, cfg, teacher_path, paradigm="flowmap"):
    """artifacts/teacher → the fixture teacher; artifacts/stage1/ema_adapter = the zero-LoRA student."""
    from anyflow.models.student import load_student, save_adapter
    from anyflow.models.teacher import load_teacher

    art = root / "artifacts"
    art.mkdir(exist_ok=True)
    if not (art / "teacher").exists():
        os.symlink(teacher_path, art / "teacher")
    model = load_student(load_teacher(teacher_path).transformer, cfg.student)
    out = art / ("stage1" if paradigm == "flowmap" else "stage1_consistency") / "ema_adapter.safetensors"
    save_adapter(model, out, metadata={"paradigm": paradigm, "steps": 0})


def _tiny_fvd_net(root, cfg):
    """artifacts/fvd_net: a toy FVD network trained for a few steps at the fixture's video geometry."""
    from anyflow.eval import toy_fvd

    v = cfg.video
    clips = toy_fvd.make_clips(48, seed=0, tag=0, num_frames=v.num_frames, height=v.height, width=v.width)
    net, _ = toy_fvd.train(clips, seed=0, steps=10, batch_size=16, lr=3e-3, width=8, feature_dim=16)
    toy_fvd.save_fvd_net(net, root / "artifacts" / "fvd_net" / "model.safetensors")


def _cfg(cfg, **policy):
    pol = GatePolicy(**{"total_tolerance": 0.02, "monotone_tolerance": 0.01, "monotone_from_nfe": 2,
                        "semantic_floors": {"color": 0.0}, **policy})
    gate = replace(cfg.gate, nfes=NFES, teacher_steps=50, teacher_guidance_scale=1.0, num_prompts=2,
                   seeds_per_prompt=2, num_previews=2, policy=pol)
    return replace(cfg, gate=gate)


@pytest.fixture(scope="module")
def gate_run(toy_teacher_dir, tmp_path_factory):
    """One failing gate run (impossible tolerance) with a consistency baseline, in a scratch working dir."""
    from anyflow.stages import gate

    cfg, teacher_path = toy_teacher_dir
    root = tmp_path_factory.mktemp("gate")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    try:
        _setup(root, cfg, teacher_path)
        _setup(root, cfg, teacher_path, paradigm="consistency")
        _tiny_fvd_net(root, cfg)
        strict = _cfg(cfg, total_tolerance=-1.0)
        args = type("A", (), dict(candidate="stage1", paradigm=None, compare=["stage1_consistency"], out="gate",
                                  no_progress=True))
        code = gate.main(strict, args)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root, cfg, teacher_path, code


def test_samples_are_aligned_with_the_teacher(gate_run):
    """Zero-LoRA student = the teacher's field used as a flow map (r enters only through the 0.25-gated copy), so
    with an unguided 50-step teacher its N-step samples from the SAME noises approach the teacher's as N → 50."""
    root, *_ = gate_run
    report = read_json(root / "artifacts/gate/report.json")
    d = {int(n): r["fidelity"]["latent_distance"] for n, r in report["candidate"]["by_nfe"].items()}
    assert d[50] < d[4] < d[1]
    assert d[50] < 0.2 * d[1], d
    assert report["teacher"]["fidelity"]["latent_distance"] == 0.0
    assert report["baselines"]["consistency"]["paradigm"] == "consistency"
    # 2 prompts × 2 seeds, cycled over the held-out split
    assert report["num_samples"] == 4 and report["prompts"][0] == report["prompts"][1]


def test_failed_gate_names_criteria_in_every_output(gate_run):
    root, *_ , code = gate_run
    assert code == 1
    metrics = read_json(root / "metrics/gate.json")
    report = read_json(root / "artifacts/gate/report.json")
    assert metrics["passed"] is False and report["passed"] is False
    assert "total_at_4" in metrics["failed"] and metrics["failed"] == report["failed"]
    at4 = report["candidate"]["by_nfe"]["4"]["total"]
    crit = next(c for c in report["criteria"] if c["name"] == "total_at_4")
    assert crit["threshold"] == pytest.approx(report["teacher"]["total"] + 1.0) and crit["value"] == at4
    assert "`total_at_4`" in (root / "artifacts/gate/summary.md").read_text()
    assert gate_summary([root / "artifacts/gate/report.json"])["passed"] is False  # export can't promote it
    # the DVC plot: one row per NFE, a column per model, values equal to the report's
    lines = (root / "plots/gate_steps.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [dict(zip(lines[0].split(","), ln.split(","))) for ln in lines[1:]]
    assert [int(r["nfe"]) for r in rows] == list(NFES)
    assert {"student_total", "consistency_total", "teacher_total"} <= set(header)
    for r in rows:
        assert float(r["student_total"]) == pytest.approx(report["candidate"]["by_nfe"][r["nfe"]]["total"], 1e-5)
        assert float(r["consistency_semantic"]) == pytest.approx(
            report["baselines"]["consistency"]["by_nfe"][r["nfe"]]["semantic"], 1e-5)
        assert float(r["teacher_total"]) == pytest.approx(report["teacher"]["total"], 1e-5)
    assert [r["model"] for r in step_rows(report)].count("consistency") == len(NFES)
    # [J] the teacher at the same budget (N Euler steps, here unguided: w = 1 → N evaluations), one row per NFE, and
    # the reference teacher's guidance named in the report, the summary and the metrics
    budget = report["teacher_at_budget"]["by_nfe"]
    assert sorted(map(int, budget)) == list(NFES)
    assert all(budget[str(n)]["steps"] == n == budget[str(n)]["evaluations"] for n in NFES)
    # 50 Euler steps from the same noises is the reference teacher's own sample
    assert budget["50"]["fidelity"]["latent_distance"] == pytest.approx(0.0, abs=1e-6)
    assert budget["50"]["total"] == pytest.approx(report["teacher"]["total"], abs=1e-6)
    assert [r["model"] for r in step_rows(report)].count("teacher_n_steps") == len(NFES)
    assert report["teacher"]["guidance_scale"] == 1.0 and report["teacher"]["guidance_convention"] == "u + w·(c − u)"
    assert metrics["teacher"]["guidance_scale"] == 1.0
    assert set(metrics["teacher_at_budget"]["total"]) == {str(n) for n in NFES}
    summary = (root / "artifacts/gate/summary.md").read_text()
    assert "guidance scale w = 1.0" in summary and "teacher_n_steps" in summary
    assert "teacher_n_steps_total" in header
    assert {c["name"] for c in report["criteria"]} >= {"beats_teacher@1", "beats_teacher@4",
                                                         "fidelity_monotone_4_to_50"}
    # dead dimensions: every one named with a reason, and none of them in any Total
    from anyflow.eval import vbench_like
    dead = report["dead_dimensions"]
    assert metrics["dead_dimensions"] == sorted(dead)
    for r in [report["teacher"], *report["candidate"]["by_nfe"].values(), *budget.values()]:
        assert r["total"] == pytest.approx(vbench_like.aggregate(r["dimensions"], drop=tuple(dead))["total"])
    for name in ("step_scaling.png", "previews/grid.png", "previews/grid.gif", "previews/grid.mp4"):
        assert (root / "artifacts/gate" / name).stat().st_size > 0, name


def test_passing_gate_replaces_the_failed_verdict(gate_run):
    from anyflow.stages import gate

    root, cfg, _, _ = gate_run
    before = read_json(root / "metrics/gate.json")["candidate"]["total"]
    first = read_json(root / "artifacts/gate/report.json")
    dead_before = first["dead_dimensions"]
    dims_before = {n: r["dimensions"] for n, r in first["candidate"]["by_nfe"].items()}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        # [J] lenient on the criteria added since (beat the same-budget teacher, fidelity monotone) as well
        lenient = _cfg(cfg, total_tolerance=10.0, monotone_tolerance=10.0, beat_teacher_up_to_nfe=0,
                       fidelity_rel_tolerance=10.0)
        report = gate.run(lenient, candidate="stage1", progress=False)
    finally:
        os.chdir(cwd)
    assert report["passed"] and read_json(root / "metrics/gate.json")["passed"] is True
    assert read_json(root / "artifacts/gate/report.json")["baselines"] == {}
    # same seeds, same candidate: the scores reproduce exactly run to run (only the verdict changed) — [J] as long as
    # the dead-dimension set is the same (it is computed over the rows evaluated, here without the baseline)
    after = read_json(root / "artifacts/gate/report.json")
    if after["dead_dimensions"].keys() == dead_before.keys():
        assert read_json(root / "metrics/gate.json")["candidate"]["total"] == before
    raw = {n: r["dimensions"] for n, r in after["candidate"]["by_nfe"].items()}
    assert raw == dims_before


def test_preview_grid_places_each_clip():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (3, 4, 5, 6, 3), dtype=np.uint8) for _ in range(2))
    g = preview_grid({"teacher": a, "N=1": b}, scale=2, gap=2)
    assert g.shape == (4, 3 * 12 + 2, 2 * 14 + 2, 3)
    # clip i of column j at rows 2 + i*12, cols 2 + j*14, nearest-neighbour upscaled ×2
    np.testing.assert_array_equal(g[:, 2 + 12:2 + 12 + 10:2, 2 + 14:2 + 14 + 12:2], b[1])
    np.testing.assert_array_equal(g[:, 2:12:2, 2:14:2], a[0])
    assert (g[:, 0] == 255).all() and (g[:, :, 1] == 255).all()  # the gaps stay white
    with pytest.raises(ValueError, match="differ in shape"):
        preview_grid({"a": a, "b": b[:, :2]})


def test_toy_fvd_is_reported_beside_total(gate_run):
    """With artifacts/fvd_net present every row carries the toy FVD to the procedural clips and (after the
    teacher's own row) to the teacher's samples; the zero-LoRA student's samples from the teacher's noises approach
    the teacher's, so its FVD to the teacher falls from 1 to 50 steps; metrics, summary and the policy read it."""
    from anyflow.eval.gate import fidelity_value

    root, *_ = gate_run
    report = read_json(root / "artifacts/gate/report.json")
    assert set(report["teacher"]["fidelity"]["fvd"]) == {"procedural"}
    by_nfe = report["candidate"]["by_nfe"]
    to_teacher = {int(n): r["fidelity"]["fvd"]["teacher"] for n, r in by_nfe.items()}
    assert to_teacher[50] < to_teacher[1], to_teacher
    for n, r in by_nfe.items():
        assert fidelity_value(r, "fvd") == r["fidelity"]["fvd"]["procedural"] >= 0.0
        assert fidelity_value(r, "fvd.teacher") == r["fidelity"]["fvd"]["teacher"]
    metrics = read_json(root / "metrics/gate.json")
    assert metrics["candidate"]["fvd"] == {n: r["fidelity"]["fvd"]["procedural"] for n, r in by_nfe.items()}
    assert metrics["teacher_fvd"] == report["teacher"]["fidelity"]["fvd"]["procedural"]
    summary = (root / "artifacts/gate/summary.md").read_text()
    assert "toy FVD" in summary and f"{by_nfe['4']['fidelity']['fvd']['procedural']:.3f}" in summary


def test_gate_reference_gives_the_same_report(gate_run):
    """`anyflow gate-reference` then `anyflow gate --reference` writes byte-identical report, summary, previews and
    metrics to a gate that computes the teacher rows itself, and so does one reading the baseline rows of `anyflow
    gate-baseline` (--baseline); a reference of other settings, or baseline rows of another adapter, are refused by
    name."""
    import shutil

    from safetensors import safe_open

    from anyflow.stages import gate, gate_baseline, gate_reference
    from anyflow.utils.io import write_safetensors

    root, cfg, _, _ = gate_run
    strict = _cfg(cfg, total_tolerance=-1.0)
    strict = replace(strict, gate=replace(strict.gate, nfes=(1, 2, 16)))  # not in the order of their strings
    cwd = os.getcwd()
    os.chdir(root)
    try:
        kw = dict(candidate="stage1", compare=("stage1_consistency",), progress=False)
        gate.run(strict, out_name="gate_own", **kw)
        gate_reference.main(strict, type("A", (), dict(no_progress=True)))
        ref = root / "artifacts" / "gate_reference"
        via_ref = gate.run(strict, out_name="gate_ref", reference=ref, **kw)
        assert list(via_ref["teacher_at_budget"]["by_nfe"]) == ["1", "2", "16"]  # the console prints this order
        # `anyflow gate-baseline` (the consistency rows, computed beside stage 2), then `anyflow gate --baseline`
        args = type("A", (), dict(compare=["stage1_consistency"], reference=str(ref), drift_nfes=None,
                                  out="gate_baseline", no_progress=True))
        assert gate_baseline.main(strict, args) == 0
        base = root / "artifacts" / "gate_baseline"
        gate.run(strict, out_name="gate_base", reference=ref, baseline=base, **kw)
        # the baseline adapter changed since its rows were stored: refused, naming its sha256, never used
        other = root / "other_consistency"
        shutil.copytree(root / "artifacts" / "stage1_consistency", other)
        with safe_open(str(other / "ema_adapter.safetensors"), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        first = sorted(tensors)[0]
        tensors[first] = tensors[first] + 1e-3
        write_safetensors(other / "ema_adapter.safetensors", tensors, metadata=meta)
        with pytest.raises(ValueError, match=r"baselines\.consistency\.adapter_sha256"):
            gate.run(strict, out_name="gate_bad", candidate="stage1", compare=(str(other / "ema_adapter.safetensors"),),
                     progress=False, reference=ref, baseline=base)
        with pytest.raises(ValueError, match=r"gate\.seed \(reference 1234, now 5\)"):
            gate.run(replace(strict, gate=replace(strict.gate, seed=5)), out_name="gate_bad", reference=ref, **kw)
    finally:
        os.chdir(cwd)
    own, via, base = (root / "artifacts" / d for d in ("gate_own", "gate_ref", "gate_base"))
    for name in ("report.json", "summary.md", "previews/grid.png", "previews/columns.txt"):
        assert (own / name).read_bytes() == (via / name).read_bytes() == (base / name).read_bytes(), name
    assert (root / "plots/gate_own_steps.csv").read_text() == (root / "plots/gate_ref_steps.csv").read_text()
    assert (root / "plots/gate_own_steps.csv").read_text() == (root / "plots/gate_base_steps.csv").read_text()
    assert read_json(base / "report.json")["baselines"]["consistency"]["by_nfe"]
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert strip(read_json(root / "metrics/gate_own.json")) == strip(read_json(root / "metrics/gate_ref.json"))
    assert not (root / "artifacts" / "gate_bad").exists()

