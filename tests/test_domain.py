"""[G] domain continued training: the driving domain and its pixel scorers, the domain gate's criteria, and the
`anyflow domain` stage (exact resume, metrics consistent with the gate function)."""

import numpy as np
import pytest
import torch

from anyflow.config import GatePolicy, build
from anyflow.data import driving, toy
from anyflow.eval import domain_gate, driving_scorers as ds


def _blur(frames):
    x = np.pad(frames.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(x[:, i:i + frames.shape[1], j:j + frames.shape[2]] for i in range(3) for j in range(3)) / 9.0


# --------------------------------------------------------------------------------------------- the driving domain
def test_render_is_deterministic_and_matches_ground_truth():
    spec = driving.Spec("green", "truck", "right")
    a, gt = driving.render(spec, 5)
    b, _ = driving.render(spec, 5)
    c, _ = driving.render(spec, 6)
    assert a.shape == (9, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and not np.array_equal(a, c)
    # the vehicle is where the ground truth says: its colour at every centre, one lane width travelled to the right
    for f, (x, y) in enumerate(gt.centers):
        assert tuple(a[f, int(y), int(x)]) == toy.COLORS["green"]
    assert gt.centers[-1][0] - gt.centers[0][0] == pytest.approx(32 / 3, abs=1e-3)
    # the stripes flow toward the viewer: each frame is the previous dash pattern shifted down
    assert all((o2 - o1) % 8 > 0 for o1, o2 in zip(gt.stripe_offsets, gt.stripe_offsets[1:]))


def test_split_and_prompts():
    train, held = driving.split(0, 0.25)
    assert len(held) == 4 and len(train) == 12 and not set(train) & set(held)
    for field, values in (("color", driving.COLORS), ("vehicle", driving.VEHICLES), ("direction",
                                                                                      driving.DIRECTIONS)):
        assert {getattr(s, field) for s in train} == set(values)
    for s in driving.all_specs():
        assert driving.parse_prompt(s.prompt) == s
    with pytest.raises(ValueError, match="unknown vehicle 'bus'"):
        driving.parse_prompt("a red bus veering left")


def test_every_toy_prompt_fits_the_text_encoder_window():
    """The toy tokenizer is byte-level: a prompt of more than max_text_len − 1 bytes loses its tail (the driving
    domain's first wording lost its direction word that way, so direction could not be learnt)."""
    from anyflow.config import Config
    from anyflow.data import toy

    limit = Config().model.max_text_len - 1  # one slot for EOS
    for mod in (toy, driving):
        longest = max(mod.all_specs(), key=lambda s: len(s.prompt.encode())).prompt
        assert len(longest.encode()) <= limit, (mod.__name__, longest)


# --------------------------------------------------------------------------------------------- scorers
@pytest.mark.parametrize("corrupt", ["clean", "noise_blur"])
def test_scorers_recover_every_spec(corrupt):
    rng = np.random.default_rng(0)
    wrong = []
    for spec in driving.all_specs():
        for seed in range(4):
            frames, _ = driving.render(spec, seed)
            if corrupt == "noise_blur":
                frames = np.clip(np.round(_blur(frames) + rng.normal(0, 8.0, frames.shape)), 0, 255).astype(np.uint8)
            r = ds.score_clip(frames, spec)
            if not (r["color"] and r["vehicle"] and r["direction"] and r["road_scene"]):
                wrong.append((spec.prompt, seed, r["pred_color"], r["pred_vehicle"], r["pred_direction"]))
    assert wrong == []


def _hand_made(color, w, l, x0, dx, y=16, f=9):
    """A road with one w × l rectangle moving dx pixels per frame (no stripes)."""
    clip = np.empty((f, 32, 32, 3), np.uint8)
    clip[:] = driving.ROAD
    for i in range(f):
        x = x0 + dx * i
        clip[i, y - l // 2: y + l // 2, x: x + w] = color
    return clip


def test_hand_made_clips_known_answers():
    truck = _hand_made(toy.COLORS["blue"], 6, 20, 4, 2)  # elongation 20/6 = 3.3, moves right 16 px
    r = ds.score_clip(truck, driving.Spec("blue", "truck", "right"))
    assert (r["pred_color"], r["pred_vehicle"], r["pred_direction"]) == ("blue", "truck", "right")
    assert (r["color"], r["vehicle"], r["direction"], r["visible_fraction"]) == (1, 1, 1, 1.0)
    car = _hand_made(toy.COLORS["yellow"], 8, 10, 20, -2)  # elongation 1.25, moves left
    assert (ds.score_clip(car, driving.Spec("yellow", "car", "left"))["pred_vehicle"],
            ds.score_clip(car, driving.Spec("yellow", "car", "left"))["pred_direction"]) == ("car", "left")
    # the same pixels judged against other prompts fail exactly the dimension that differs
    assert ds.score_clip(car, driving.Spec("red", "car", "left"))["color"] == 0
    assert ds.score_clip(car, driving.Spec("yellow", "truck", "left"))["vehicle"] == 0
    assert ds.score_clip(car, driving.Spec("yellow", "car", "right"))["direction"] == 0
    assert ds.score_clip(car[::-1], driving.Spec("yellow", "car", "right"))["direction"] == 1
    static = _hand_made(toy.COLORS["red"], 6, 8, 12, 0)
    assert ds.score_clip(static, driving.Spec("red", "car", "left"))["pred_direction"] == "none"
    # a road with stripes but no vehicle: nothing is found (the stripes are achromatic)
    frames, _ = driving.render(driving.Spec("red", "car", "left"), 0)
    road = frames.copy()
    road[ds.vehicle_mask(frames)] = driving.ROAD
    r = ds.score_clip(road, driving.Spec("red", "car", "left"))
    assert (r["color"], r["vehicle"], r["direction"], r["visible_fraction"]) == (0, 0, 0, 0.0)


def test_score_videos_and_gate_score_use_driving_scorers():
    from anyflow.eval import fidelity
    from anyflow.stages.gate import eval_set, score

    cfg = build({})
    specs = eval_set(cfg, "driving")
    assert {s.prompt for s in specs} == {s.prompt for s in driving.split(0, 0.25)[1]}
    assert len(specs) == cfg.gate.num_prompts * cfg.gate.seeds_per_prompt
    frames = np.stack([driving.render(s, i)[0] for i, s in enumerate(specs)])
    x = torch.zeros(len(specs), 1)
    out = score(frames, specs, x, x, fidelity.video_features(list(frames)), domain="driving")
    assert out["dimensions"]["color"] == out["dimensions"]["shape"] == out["dimensions"]["direction"] == 1.0
    assert out["semantic"] == pytest.approx(1.0) and out["dimensions"]["background_cleanliness"] == 1.0
    # vehicles recoloured to a wrong palette colour: colour accuracy 0, semantic drops by a third
    wrong = frames.copy()
    for i, s in enumerate(specs):
        other = "red" if s.color != "red" else "blue"
        wrong[i][ds.vehicle_mask(frames[i])] = toy.COLORS[other]
    out2 = score(wrong, specs, x, x, fidelity.video_features(list(frames)), domain="driving")
    assert out2["dimensions"]["color"] == 0.0 and out2["semantic"] == pytest.approx(3 / 4)
    # the lane markings painted over with road: the road-scene dimension fails, the other three still hold
    bare = frames.copy()
    bare[(bare == driving.STRIPE).all(-1)] = driving.ROAD
    out3 = score(bare, specs, x, x, fidelity.video_features(list(frames)), domain="driving")
    assert out3["dimensions"]["road_scene"] == 0.0 and out3["semantic"] == pytest.approx(3 / 4)
    assert out3["dimensions"]["shape"] == out3["dimensions"]["direction"] == 1.0


def test_lane_markings_known_answers():
    spec = driving.Spec("red", "truck", "right")
    frames, _ = driving.render(spec, 3)
    assert ds.lane_markings(frames) == 1.0  # dashes of period H/4 cross every boundary band in every frame
    bare = frames.copy()
    bare[(bare == driving.STRIPE).all(-1)] = driving.ROAD
    assert ds.lane_markings(bare) == 0.0 and ds.score_clip(bare, spec)["road_scene"] == 0
    # markings in 3 of 9 frames: a third of the (frame, boundary) pairs, not a road scene
    part = bare.copy()
    part[:3] = frames[:3]
    assert ds.lane_markings(part) == pytest.approx(1 / 3) and ds.score_clip(part, spec)["road_scene"] == 0
    # dim markings (contrast 30 < MARKING_CONTRAST) do not count; a shapes-domain clip has none
    dim = bare.copy()
    dim[(frames == driving.STRIPE).all(-1)] = np.array(driving.ROAD) + 30
    assert ds.lane_markings(dim) == 0.0
    shapes_clip, _ = toy.render(toy.all_specs()[0], 0)
    assert ds.lane_markings(shapes_clip) == 0.0
    # a road without markings (the hand-made clips) is no road scene
    assert ds.score_clip(_hand_made(toy.COLORS["blue"], 6, 20, 8, 0), spec)["road_scene"] == 0


# --------------------------------------------------------------------------------------------- domain gate
def _report(shapes_totals, driving_totals, driving_semantic_at_4):
    def entry(totals, sem4=0.5):
        return {"by_nfe": {str(n): {"total": t, "semantic": sem4 if n == 4 else 0.5, "dimensions": {}}
                           for n, t in zip((1, 2, 4, 8), totals)}}
    return {"shapes": entry(shapes_totals), "driving": entry(driving_totals, driving_semantic_at_4)}


def test_domain_gate_criteria():
    policy = GatePolicy()  # monotone tolerance 0.01 from NFE 2
    base = _report([0.70, 0.75, 0.80, 0.81], [0.60, 0.62, 0.64, 0.65], 0.40)
    good = _report([0.69, 0.74, 0.78, 0.80], [0.66, 0.70, 0.72, 0.73], 0.70)
    assert domain_gate.failed_criteria(base, good, policy, 0.05) == []
    names = [c["name"] for c in domain_gate.check(base, good, policy, 0.05)]
    assert names == ["domain_semantic@4", "forgetting@1", "forgetting@2", "forgetting@4", "forgetting@8",
                     "shapes:monotone_2_to_4", "shapes:monotone_4_to_8", "driving:monotone_2_to_4",
                     "driving:monotone_4_to_8"]

    # forgetting: base-domain Total at 4 NFE drops 0.06 > tolerance 0.05 → fails and is named (nothing else fails)
    forgot = _report([0.69, 0.74, 0.74, 0.80], [0.66, 0.70, 0.72, 0.73], 0.70)
    assert domain_gate.failed_criteria(base, forgot, policy, 0.05) == ["forgetting@4"]
    assert domain_gate.failed_criteria(base, forgot, policy, 0.07) == []  # within a larger tolerance
    crit = {c["name"]: c for c in domain_gate.check(base, forgot, policy, 0.05)}
    assert crit["forgetting@4"]["value"] == 0.74 and crit["forgetting@4"]["threshold"] == pytest.approx(0.75)

    # no semantic improvement on the new domain (equal is not better)
    same = _report([0.70, 0.75, 0.80, 0.81], [0.66, 0.70, 0.72, 0.73], 0.40)
    assert domain_gate.failed_criteria(base, same, policy, 0.05) == ["domain_semantic@4"]
    # any-step criterion broken on the new domain: 8 NFE worse than 4 by more than 0.01
    worse = _report([0.69, 0.74, 0.78, 0.80], [0.66, 0.70, 0.72, 0.70], 0.70)
    assert domain_gate.failed_criteria(base, worse, policy, 0.05) == ["driving:monotone_4_to_8"]
    with pytest.raises(KeyError, match="driving"):
        domain_gate.check(base, {"shapes": good["shapes"]}, policy, 0.05)


# --------------------------------------------------------------------------------------------- the stage
def _stage_cfg(tmp_path, teacher_path, **domain):
    cfg = build({"paths": {"root": str(tmp_path / "artifacts"), "metrics": str(tmp_path / "metrics"),
                           "plots": str(tmp_path / "plots"), "checkpoints": str(tmp_path / "ckpt")},
                 "synthesize": {"num_samples": 8, "samples_per_shard": 4, "batch_size": 4, "steps": 2,
                                "threads": 1},
                 "student": {"lora_rank": 4, "lora_alpha": 4.0},
                 "domain": {"num_samples": 8, "batch_size": 4, "base_mix": 0.25, "max_steps": 4, "ckpt_every": 2,
                            "log_every": 1, **domain},
                 "gate": {"nfes": [1, 2, 4], "num_prompts": 2, "teacher_steps": 2}})
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "teacher").symlink_to(teacher_path)
    return cfg


def _base_adapter(cfg, teacher_path):
    """A flow-map 'distilled' adapter: non-zero LoRA weights saved where stage 1 writes its EMA adapter."""
    from anyflow.models.student import STUDENT, adapter_parameters, load_student, save_adapter
    from anyflow.models.teacher import load_teacher

    torch.manual_seed(0)
    model = load_student(load_teacher(teacher_path).transformer, cfg.student)
    with torch.no_grad():
        for p in adapter_parameters(model, STUDENT).values():
            p.normal_(0, 0.02)
    path = save_adapter(model, tmp_root(cfg) / "stage1" / "ema_adapter.safetensors", STUDENT,
                        metadata={"paradigm": "flowmap", "steps": 1})
    return path


def tmp_root(cfg):
    from pathlib import Path

    return Path(cfg.paths.root)


@pytest.mark.slow  # toy teacher fixture + 2 short runs + a tiny evaluation (~60 s on 2 cores)
def test_domain_stage_resume_equals_uninterrupted_and_gate_is_applied(tmp_path, toy_teacher_dir):
    from safetensors.torch import load_file

    from anyflow.models.student import adapter_metadata
    from anyflow.stages import domain, encode_clips, synthesize
    from anyflow.utils.io import read_json

    torch.set_num_threads(1)
    _, teacher_path = toy_teacher_dir
    cfg = _stage_cfg(tmp_path, teacher_path)
    synthesize.run(cfg, progress=False)  # base shards (artifacts/data) for base_mix
    base = _base_adapter(cfg, teacher_path)
    with pytest.raises(FileNotFoundError, match=r"continued/dvc\.yaml:encode_clips"):
        domain.run(cfg, fresh=True, no_eval=True, progress=False)  # no domain shards yet: names the stage
    encode_clips.run(cfg, progress=False)  # the encode_clips stage: artifacts/domain_data (source: synthetic)
    root = tmp_root(cfg)

    m = domain.run(cfg, fresh=True, no_eval=True, progress=False)
    assert m["training"]["steps"] == 4 and not m["training"]["resumed"]
    assert m["training"]["base_rows_per_batch"] == 1 and m["training"]["domain_samples"] == 8
    full = load_file(str(root / "domain" / "ema_adapter.safetensors"))
    full_raw = load_file(str(root / "domain" / "adapter.safetensors"))
    start = load_file(str(base))
    assert max((full_raw[k] - start[k]).abs().max().item() for k in start) > 0  # training moved the adapter
    meta = adapter_metadata(root / "domain" / "ema_adapter.safetensors")
    assert meta["paradigm"] == "flowmap" and meta["domain"] == "driving" and meta["base_adapter"] == str(base)
    assert len((tmp_path / "plots" / "domain_loss.csv").read_text().strip().splitlines()) == 1 + 4

    (root / "domain" / "ema_adapter.safetensors").unlink()
    out = domain.run(cfg, no_eval=True, progress=False, stop_after=3)  # "crash" after 3 of 4 steps
    assert out == {"steps": 3, "interrupted": True} and (tmp_path / "ckpt" / "domain" / "last.pt").exists()
    m2 = domain.run(cfg, no_eval=True, progress=False)
    assert m2["training"]["resumed"] and m2["training"]["steps"] == 4
    resumed = load_file(str(root / "domain" / "ema_adapter.safetensors"))
    assert set(resumed) == set(full) and all(torch.equal(resumed[k], full[k]) for k in full)
    assert not (tmp_path / "ckpt" / "domain" / "last.pt").exists()

    # evaluation only: metrics carry the verdict the pure domain gate gives on the written report
    m3 = domain.run(cfg, evaluate_only=True, progress=False)
    report = read_json(root / "domain" / "report.json")
    assert m3["failed"] == domain_gate.failed_criteria(report["base"], report["domain"], cfg.gate.policy,
                                                       cfg.domain.forgetting_tolerance)
    assert m3["passed"] == (m3["failed"] == [])
    assert set(m3["table"]) == {"shapes", "driving"} and set(m3["table"]["driving"]) == {"1", "2", "4"}
    assert report["prompts"]["driving"][0] in {s.prompt for s in driving.split(0, 0.25)[1]}
    assert read_json(tmp_path / "metrics" / "domain.json")["training"]["steps"] == 4


# --------------------------------------------------------------------------------------------- self-distillation
def _student_and_base_file(tmp_path):
    """Tiny student with a non-zero 'student' adapter saved to a file, plus the frozen copy of it loaded as
    selfdistill.FROZEN."""
    from stage1_fixtures import STUDENT_CFG, tiny_teacher

    from anyflow.models.student import STUDENT, adapter_parameters, add_lora, save_adapter, student_from_teacher
    from anyflow.train import selfdistill

    torch.manual_seed(1)
    model = student_from_teacher(tiny_teacher(), STUDENT_CFG)
    add_lora(model, STUDENT_CFG, STUDENT)
    with torch.no_grad():
        for p in adapter_parameters(model, STUDENT).values():
            p.normal_(0, 0.05)
    path = save_adapter(model, tmp_path / "base.safetensors", STUDENT)
    selfdistill.add_frozen_base(model, STUDENT_CFG, path)
    return model, path


def _rows(b=6):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 8, 5, 8, 8, generator=g), torch.randn(b, 8, 64, generator=g), torch.zeros(1, 8, 64)


def test_self_distillation_is_zero_for_the_unchanged_student_and_trains_only_the_student(tmp_path):
    from stage1_fixtures import STUDENT_CFG, tiny_teacher

    from anyflow.models.student import STUDENT, adapter_parameters, load_student, student_velocity
    from anyflow.objectives.flowmap import split_kinds
    from anyflow.train import selfdistill

    torch.set_num_threads(1)
    model, path = _student_and_base_file(tmp_path)
    student, frozen = adapter_parameters(model, STUDENT), adapter_parameters(model, selfdistill.FROZEN)
    assert student and len(frozen) == len(student)
    assert all(p.requires_grad for p in student.values()) and not any(p.requires_grad for p in frozen.values())
    x0, text, neg = _rows()
    kind = split_kinds(torch.arange(6), 6, (0.5, 0.25, 0.25))
    seeds = list(range(100, 106))
    u = lambda z, t, r, c: student_velocity(model, z, t, r, c)  # noqa: E731
    u_base = selfdistill.frozen_velocity(model)

    # the student equals the frozen base: every row's loss and the whole gradient are exactly 0
    per_row = selfdistill.distill_terms(u, u_base, x0, text, neg, kind, seeds, 0.3, 5.0)
    assert torch.equal(per_row, torch.zeros(6))
    per_row.mean().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in student.values())
    assert all(p.grad is None for p in frozen.values())

    # move the student: the loss is ‖u_student − u_base‖² of two independently built models at the same (z, t, r)
    with torch.no_grad():
        for p in student.values():
            p.add_(0.02 * torch.randn_like(p))
            p.grad = None
    frozen_before = {n: p.detach().clone() for n, p in frozen.items()}
    per_row = selfdistill.distill_terms(u, u_base, x0, text, neg, kind, seeds, 0.0, 5.0)
    per_row.mean().backward()
    assert all(p.grad is None for p in frozen.values())
    assert sum(float(p.grad.abs().sum()) for p in student.values()) > 0
    assert all(torch.equal(frozen_before[n], p) for n, p in frozen.items())
    ua, ub, _, eps = selfdistill.draw(x0, None, seeds)
    t, r = selfdistill.row_times(ua, ub, kind, 5.0)
    assert torch.equal(r[kind == 0], t[kind == 0]) and torch.all(r[kind == 1] == 0) and torch.all(r <= t)
    z = (1 - t[:, None, None, None, None]) * x0 + t[:, None, None, None, None] * eps
    ref_base = load_student(tiny_teacher(), STUDENT_CFG, path)
    with torch.no_grad():
        want = (u(z, t, r, text) - student_velocity(ref_base, z, t, r, text)).pow(2).flatten(1).mean(1)
    assert float(want.min()) > 0
    torch.testing.assert_close(per_row.detach(), want, rtol=1e-5, atol=1e-9)


def test_row_times_are_stage1_times():
    from anyflow.objectives.flowmap import sample_times, split_kinds
    from anyflow.train.selfdistill import row_times

    g = torch.Generator().manual_seed(0)
    ua, ub = torch.rand(16, generator=g), torch.rand(16, generator=g)
    want = sample_times(16, 5.0, (0.5, 0.25, 0.25), None, uniforms=(ua, ub))
    t, r = row_times(ua, ub, split_kinds(torch.arange(16), 16, (0.5, 0.25, 0.25)), 5.0)
    assert torch.equal(t, want.t) and torch.equal(r, want.r)


def test_self_distill_trainer_step_keeps_an_unchanged_student_and_pulls_a_moved_one_back(tmp_path):
    from dataclasses import replace

    from stage1_fixtures import CFG, dataset

    from anyflow.data.shards import Batch
    from anyflow.models.student import STUDENT, adapter_parameters
    from anyflow.train.selfdistill import SelfDistillTrainer

    torch.set_num_threads(1)
    model, _ = _student_and_base_file(tmp_path)
    data = dataset()
    cfg = replace(CFG, domain=replace(CFG.domain, batch_size=4))

    def data_fn(g):
        i = torch.randint(16, (4,), generator=g)
        return Batch(latents=data.latents[i], noise=data.noise[i], prompt_embeds=data.prompt_embeds[i],
                     prompts=[data.prompts[int(k)] for k in i], index=torch.arange(4))

    trainer = SelfDistillTrainer(model, cfg, data_fn, torch.zeros(1, 8, 64), cfg.stage1.optim, None, 0, 0,
                                 batch_size=4, is_base=lambda b: torch.ones(4, dtype=torch.bool), mode="base")
    params = adapter_parameters(model, STUDENT)
    start = {n: p.detach().clone() for n, p in params.items()}
    row = trainer.step()  # every row distilled from an identical base: loss 0, AdamW moves nothing
    assert row["loss"] == 0.0 and row["distill"] == 0.0 and "mse_r_eq_t" not in row
    assert all(torch.equal(start[n], p) for n, p in params.items())
    with torch.no_grad():
        for p in params.values():
            p.add_(0.02 * torch.randn_like(p))
    first = trainer.step()["distill"]
    for _ in range(5):
        last = trainer.step()["distill"]
    assert first > 0 and last < first
    with pytest.raises(ValueError, match="distill_rows: unknown 'all'"):
        SelfDistillTrainer(model, cfg, data_fn, torch.zeros(1, 8, 64), cfg.stage1.optim, None, 0, 0,
                           batch_size=4, is_base=lambda b: b.index >= 0, mode="all")
