"""Stage 1 for the causal student (issue 10): the same ``stage1_terms`` with per-chunk (t, r) and clean-context
teacher forcing — reduction to the per-sample objective at shared times, per-chunk dF/dt, causality of the loss,
gradient only on the LoRA adapter, the trainer (exact resume) and the FAR stage-1/gate entry points."""

from dataclasses import replace

import pytest
import torch

from anyflow.models.far import far_stage1_velocity, far_velocity
from anyflow.models.student import adapter_parameters, add_lora, student_from_teacher
from anyflow.objectives import flowmap as fm
from conftest import make_tiny_wan
from stage1_fixtures import CFG, dataset
from test_far import FAR, randomise_lora

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]
CHUNKS = (1, 2, 2)


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_wan()


def far_student(teacher):
    model = student_from_teacher(teacher, FAR)
    torch.manual_seed(1)
    add_lora(model, FAR)
    randomise_lora(model)
    return model


def terms(model, x0, text, s1, seeds, chunks=CHUNKS):
    u, _ = far_stage1_velocity(model)
    return fm.stage1_terms(u, x0, text, torch.zeros(1, 8, 64), s1, "flowmap", 5.0, None, sample_seeds=seeds,
                           chunks=chunks, clean=x0)


S1 = replace(CFG.stage1, time_split=(0.25, 0.25, 0.5), text_dropout=0.3, guidance_scale=5.0)
SEEDS = [11, 12, 13, 14, 15, 16, 17, 18]


def test_chunked_draws_extend_the_per_sample_draws():
    x0 = torch.zeros(4, 8, 5, 8, 8)
    for seeds, gen in ((SEEDS[:4], None), (None, 1)):
        a = fm.draw(x0, None if gen is None else torch.Generator().manual_seed(gen), seeds)
        b = fm.draw(x0, None if gen is None else torch.Generator().manual_seed(gen), seeds, n_chunks=3)
        assert b[0].shape == (4, 3) and torch.equal(b[0][:, 0], a[0]) and torch.equal(b[1][:, 0], a[1])
        assert torch.equal(b[2], a[2]) and torch.equal(b[3], a[3])
        assert float((b[0][:, 1:] - b[0][:, :1]).abs().min()) > 0  # the other chunks draw their own times
    times = fm.sample_times(8, 5.0, (0.25, 0.25, 0.5), None, uniforms=(torch.rand(8, 3), torch.rand(8, 3)))
    assert torch.equal(times.r[:2], times.t[:2]) and torch.equal(times.r[2:4], torch.zeros(2, 3))  # kind per sample
    assert bool((times.r[4:] < times.t[4:]).all()) and float(times.t[4:].std(1).min()) > 0


@pytest.mark.parametrize("target", ["reference", "meanflow"])
def test_shared_chunk_times_give_the_per_sample_objective(teacher, monkeypatch, target):
    """With every chunk at the sample's (t, r), the chunked objective is the per-sample one (same velocity, same
    clean context): same loss, parts and LoRA gradient; with its own per-chunk draws it is not. Under both
    ``stage1.guidance_target`` options (the "meanflow" target's v_∅ = u_∅(t, t) is taken per chunk like u_∅)."""
    model = far_student(teacher)
    data = dataset(8)
    x0, text = data.latents, data.prompt_embeds
    lora = adapter_parameters(model)
    s1 = replace(S1, guidance_target=target)

    def run(chunks):
        out = terms(model, x0, text, s1, SEEDS, chunks)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in lora.items()}
        model.zero_grad(set_to_none=True)
        return out, grads

    own, _ = run(CHUNKS)
    real_draw = fm.draw

    def shared(x, g, seeds, n_chunks=1):
        ua, ub, ud, eps = real_draw(x, g, seeds, n_chunks)
        return (ua[:, :1].expand_as(ua), ub[:, :1].expand_as(ub), ud, eps) if n_chunks > 1 else (ua, ub, ud, eps)

    monkeypatch.setattr(fm, "draw", shared)
    per_chunk, g_chunk = run(CHUNKS)
    per_sample, g_sample = run(None)
    assert {"mse_r_eq_t", "mse_r_eq_0", "mse_free"} <= set(per_sample.parts)
    for key in ("mse_r_eq_t", "mse_r_eq_0", "mse_free"):
        assert per_chunk.parts[key] == pytest.approx(per_sample.parts[key], rel=1e-5)
    torch.testing.assert_close(per_chunk.loss, per_sample.loss, rtol=1e-5, atol=0)
    for n in lora:
        torch.testing.assert_close(g_chunk[n], g_sample[n], rtol=1e-4, atol=1e-7)
    assert abs(float(own.loss) - float(per_sample.loss)) > 1e-3 * float(per_sample.loss)


def test_teacher_forced_total_derivative_is_per_chunk(teacher):
    """dF/dt along (v, 1 on every chunk's t) equals, on chunk k, the derivative moving chunk k alone (and moving
    chunk k alone moves no other chunk)."""
    model = far_student(teacher)
    g = torch.Generator().manual_seed(2)
    z, x0, v = (torch.randn(2, 8, 5, 8, 8, generator=g) for _ in range(3))
    text = torch.randn(2, 8, 64, generator=g)
    t, r = torch.tensor([[0.9, 0.6, 0.4], [0.7, 0.8, 0.3]]), torch.tensor([[0.2, 0.0, 0.1], [0.5, 0.1, 0.0]])
    u = lambda zz, tt: far_velocity(model, zz, tt, r, text, CHUNKS, clean=x0)  # noqa: E731
    joint = fm.total_derivative(u, z, t, v, "jvp")
    assert float(joint.abs().max()) > 1e-2
    for k, (lo, hi) in enumerate(((0, 1), (1, 3), (3, 5))):
        vk, ones = torch.zeros_like(v), torch.zeros_like(t)
        vk[:, :, lo:hi], ones[:, k] = v[:, :, lo:hi], 1.0
        with torch.no_grad():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                alone = torch.func.jvp(u, (z, t), (vk, ones))[1]
        torch.testing.assert_close(alone[:, :, lo:hi], joint[:, :, lo:hi], rtol=0, atol=1e-5)
        outside = torch.cat([alone[:, :, :lo], alone[:, :, hi:]], dim=2)
        assert float(outside.abs().sum()) == 0  # teacher forcing: no other chunk moves with chunk k


def test_loss_is_causal_and_trains_only_the_adapter(teacher):
    """Changing a later chunk's latents leaves every earlier chunk's loss term unchanged (and changes its own);
    the loss gradient reaches only the LoRA adapter."""
    model = far_student(teacher)
    data = dataset(8)
    x0, text = data.latents, data.prompt_embeds
    base = terms(model, x0, text, S1, SEEDS)
    base.loss.backward()
    lora = adapter_parameters(model)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
    assert all(p.grad is None for p in teacher.parameters())
    model.zero_grad(set_to_none=True)
    pc = base.parts["per_chunk"]
    assert pc.shape == (8, 3) and float(pc.min()) > 0
    with torch.no_grad():
        for k, lo in ((1, 1), (2, 3)):
            x2 = x0.clone()
            x2[:, :, lo:] += torch.randn_like(x2[:, :, lo:])
            other = terms(model, x2, text, S1, SEEDS).parts["per_chunk"]
            torch.testing.assert_close(other[:, :k], pc[:, :k], rtol=0, atol=1e-7)
            assert float((other[:, k:] - pc[:, k:]).abs().min()) > 1e-6
        # ...while an earlier chunk's clean latents reach the later chunks' terms
        x3 = x0.clone()
        x3[:, :, :1] += 1.0
        assert float((terms(model, x3, text, S1, SEEDS).parts["per_chunk"][:, 1:] - pc[:, 1:]).abs().min()) > 0


def test_stage1_loss_and_teacher_target_for_far(teacher):
    from anyflow.objectives.flowmap import stage1_loss

    model = far_student(teacher)
    cfg = replace(CFG, student=FAR)
    data = dataset(4)
    loss = stage1_loss(model, cfg, data, torch.zeros(1, 8, 64), torch.Generator().manual_seed(0))
    u, chunks = far_stage1_velocity(model)
    ref = fm.stage1_terms(u, data.latents, data.prompt_embeds, torch.zeros(1, 8, 64), cfg.stage1, "flowmap",
                          cfg.model.flow_shift, torch.Generator().manual_seed(0), chunks=chunks, clean=data.latents)
    assert torch.equal(loss, ref.loss)
    with pytest.raises(ValueError, match="velocity_target"):
        fm.stage1_terms(u, data.latents, data.prompt_embeds, torch.zeros(1, 8, 64), cfg.stage1, "flowmap", 5.0,
                        None, chunks=chunks, clean=data.latents, v_teacher=lambda z, t, c: z)
    with pytest.raises(ValueError, match="chunk_partition"):
        fm.stage1_terms(u, data.latents, data.prompt_embeds, torch.zeros(1, 8, 64), cfg.stage1, "flowmap", 5.0,
                        None, chunks=(1, 2), clean=data.latents)


def test_far_trainer_resumes_exactly(teacher, tmp_path):
    """FlowMapTrainer on the FAR student: 4 steps straight = 2 steps, 'crash', resume, 2 steps; per-chunk MSEs are
    logged; velocity_target teacher is refused."""
    from stage1_fixtures import make_trainer

    cfg = replace(CFG, student=FAR)
    straight = make_trainer(tmp_path / "a", cfg, teacher)
    straight.train(4, progress=False)
    first = make_trainer(tmp_path / "b", cfg, teacher)
    first.train(4, progress=False, stop_after=2)
    first.save_checkpoint()
    second = make_trainer(tmp_path / "b", cfg, teacher)
    assert second.maybe_resume() and second.state.step == 2
    second.train(4, progress=False)
    for n, p in straight.params.items():
        assert torch.equal(p, second.params[n]), n
    row = straight.state.history[-1]
    assert {"mse_chunk0", "mse_chunk1", "mse_chunk2"} <= set(row) and isinstance(row["mse_chunk0"], float)
    assert straight.state.history[0]["loss"] != straight.state.history[-1]["loss"]
    with pytest.raises(ValueError, match="velocity_target"):
        make_trainer(tmp_path / "c", replace(cfg, stage1=replace(cfg.stage1, velocity_target="teacher")), teacher)


def test_stage1_stage_routes_far(teacher):
    """anyflow stage1 for FAR: own output name, r = t identity on the first chunk at LoRA init, evaluation samples
    with far_generate (N steps per chunk)."""
    from anyflow.data.shards import Batch
    from anyflow.models.far import far_generate
    from anyflow.sampling import sample_student
    from anyflow.stages.stage1 import output_name, teacher_identity_error

    assert output_name("flowmap", "far") == "far_stage1" and output_name("flowmap") == "stage1"
    assert output_name("consistency", "far") == "far_stage1_consistency"
    data = dataset(2)
    data = Batch(latents=data.latents, noise=data.noise, prompt_embeds=data.prompt_embeds, prompts=data.prompts,
                 index=data.index)
    fresh = student_from_teacher(teacher, FAR)
    add_lora(fresh, FAR)
    assert teacher_identity_error(fresh, teacher, data) < 1e-5
    model = far_student(teacher)
    assert teacher_identity_error(model, teacher, data) > 1e-3  # the check can fail
    x = sample_student(model, "flowmap", data.noise, data.prompt_embeds, 3, 5.0)
    torch.testing.assert_close(x, far_generate(model, data.noise, data.prompt_embeds, 3, 5.0), rtol=0, atol=0)
    assert float((x - sample_student(model, "flowmap", data.noise, data.prompt_embeds, 1, 5.0)).abs().max()) > 1e-3


def test_long_partition_and_architecture_metadata(tmp_path, teacher):
    from anyflow.models.student import save_adapter
    from anyflow.stages.gate import architecture_of, long_partition

    assert long_partition([1, 2, 2]) == [1, 2, 2, 2, 2]  # 5 → 9 latent frames: 9 → 17 pixel frames (t = 2)
    assert long_partition([1, 3, 3]) == [1, 3, 3, 3, 3] and sum(long_partition([1, 3, 3], 3)) >= 19
    model = far_student(teacher)
    old = save_adapter(model, tmp_path / "old.safetensors", metadata={"paradigm": "flowmap"})
    far = save_adapter(model, tmp_path / "far.safetensors", metadata={"architecture": "far"})
    assert architecture_of(old) == "bidirectional" and architecture_of(far) == "far"
    bad = save_adapter(model, tmp_path / "bad.safetensors", metadata={"architecture": "causal"})
    with pytest.raises(ValueError, match="architecture"):
        architecture_of(bad)


@pytest.mark.slow
def test_gate_scores_a_far_adapter_beside_a_bidirectional_one(toy_teacher_dir, tmp_path):
    """One gate report: the FAR candidate (chunk by chunk, N per chunk) and a bidirectional baseline built from
    their adapters' metadata on the same noises; the FAR drift check on twice the length; --report-only exits 0
    on a failing verdict. A FAR student whose single chunk spans the clip at zero LoRA is the teacher's field like
    the bidirectional one: identical scores (the routing changes nothing it should not)."""
    import os

    from anyflow.config import GatePolicy
    from anyflow.models.student import load_student, save_adapter
    from anyflow.models.teacher import load_teacher
    from anyflow.stages import gate

    cfg, teacher_path = toy_teacher_dir
    wan = load_teacher(teacher_path).transformer
    one_chunk = replace(cfg.student, architecture="far", chunk_partition=(5,), full_chunk_limit=3)
    pol = GatePolicy(total_tolerance=-1.0, monotone_tolerance=0.01, monotone_from_nfe=2, semantic_floors={})
    cfg = replace(cfg, student=one_chunk, gate=replace(cfg.gate, nfes=(1, 4), teacher_steps=8, num_prompts=2,
                                                       seeds_per_prompt=2, num_previews=1, policy=pol))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        (tmp_path / "artifacts").mkdir()
        os.symlink(teacher_path, tmp_path / "artifacts/teacher")
        save_adapter(load_student(wan, one_chunk), tmp_path / "far.safetensors",
                     metadata={"architecture": "far", "paradigm": "flowmap"})
        save_adapter(load_student(wan, replace(one_chunk, architecture="bidirectional")), tmp_path / "bi.safetensors",
                     metadata={"paradigm": "flowmap"})
        args = type("A", (), dict(candidate="far.safetensors", paradigm=None, compare=["bi.safetensors"],
                                  out="far_gate", no_progress=True, drift_nfes=[2], report_only=True))
        code = gate.main(cfg, args)
    finally:
        os.chdir(cwd)
    from anyflow.utils.io import read_json

    report = read_json(tmp_path / "artifacts/far_gate/report.json")
    metrics = read_json(tmp_path / "metrics/far_gate.json")
    assert code == 0 and not report["passed"] and not metrics["passed"]
    far, (bi,) = report["candidate"], report["baselines"].values()
    assert far["architecture"] == "far" and bi["architecture"] == "bidirectional"
    for n in ("1", "4"):
        assert far["by_nfe"][n]["total"] == pytest.approx(bi["by_nfe"][n]["total"], abs=1e-6)
        assert far["by_nfe"][n]["fidelity"]["latent_distance"] == pytest.approx(
            bi["by_nfe"][n]["fidelity"]["latent_distance"], rel=1e-4)
    d = far["drift"]["2"]
    assert d["chunk_partition"] == [5, 5] and d["frames"] == 19 and "drift" not in bi  # ≥ 2·(5 − 1) + 1 latents
    assert 0 < d["first"]["total"] <= 1 and 0 < d["last"]["total"] <= 1
    # its timing is in the metrics only: report.json is a DVC output, the same bytes on every run
    assert "seconds_per_chunk" not in d and metrics["drift"]["candidate"]["2"]["seconds_per_chunk"] > 0
    assert d["delta_total"] == pytest.approx(d["last"]["total"] - d["first"]["total"])
    m = metrics["drift"]["candidate"]["2"]
    assert m["delta"] == pytest.approx(d["delta_total"])
    assert m["delta_quality"] == pytest.approx(d["last"]["quality"] - d["first"]["quality"])


def test_chunkwise_backward_simulation_is_generation_with_gradients(teacher):
    """FAR stage-2 rollout (chunk-wise flow-map backward simulation): at N = 2, k = 0 (first jump of zero length)
    it is exactly 2-step KV-cache generation; chunk j ignores later chunks' noise; the simulated context is
    detached unless grad_context; the gradient reaches only the LoRA adapter."""
    from anyflow.models.far import far_backward_simulation, far_generate

    model = far_student(teacher)
    g = torch.Generator().manual_seed(21)
    noise, text = torch.randn(2, 8, 5, 8, 8, generator=g), torch.randn(2, 8, 64, generator=g)
    with torch.no_grad():
        sim = far_backward_simulation(model, noise, text, 2, 0, 5.0)
        torch.testing.assert_close(sim, far_generate(model, noise, text, 2, 5.0), rtol=0, atol=1e-5)
        other = far_backward_simulation(model, noise, text, 4, [1, 3, 0], 5.0)
        assert float((other - sim).abs().max()) > 1e-2  # exit steps matter
        n2 = noise.clone()
        n2[:, :, 3:] += 1.0
        torch.testing.assert_close(far_backward_simulation(model, n2, text, 4, [1, 3, 0], 5.0)[:, :, :3],
                                   other[:, :, :3], rtol=0, atol=1e-6)
    for grad_context in (False, True):
        z = noise.clone().requires_grad_(True)
        out = far_backward_simulation(model, z, text, 4, 2, 5.0, grad_context=grad_context)
        out[:, :, 3:].pow(2).mean().backward()
        reach = float(z.grad[:, :, :3].abs().sum())
        assert (reach > 0) == grad_context, (grad_context, reach)
        assert float(z.grad[:, :, 3:].abs().sum()) > 0
    lora = adapter_parameters(model)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
    with pytest.raises(ValueError, match="one exit step per chunk"):
        far_backward_simulation(model, noise, text, 4, [1, 2], 5.0)


@pytest.mark.parametrize("target", ["reference", "meanflow"])
def test_stage1_terms_under_bf16_autocast(teacher, target):
    """The wan profiles train stage 1 under bf16 autocast (``stage1.mixed_precision: bf16``): the objective runs
    there (the network returns bf16 into fp32 buffers; index_put refused to mix them until `make wan-smoke` found
    it) and gives the fp32 loss to bf16 accuracy, with a finite LoRA gradient."""
    model = far_student(teacher)
    data = dataset(8)
    s1 = replace(S1, guidance_target=target)
    ref = terms(model, data.latents, data.prompt_embeds, s1, SEEDS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = terms(model, data.latents, data.prompt_embeds, s1, SEEDS)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=0.05)
    grads = [p.grad for p in adapter_parameters(model).values() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert max(float(g.abs().max()) for g in grads) > 0
