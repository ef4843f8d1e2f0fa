"""Stage 2 for the causal student (AnyFlow-FAR) through the *same* trainer and losses as the bidirectional one: the
FAR student on a model of its own (``far_rollout``), teacher and ``fake_score`` on the bidirectional base model.
Gradient routing across the two models, step isolation, DMD against a reference built from the Wan teacher and
KV-cache generation, DMD = 0 when fake = real, exact resume, the stage's model assembly and evaluation sampler."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from anyflow.config import Config, Stage2
from anyflow.models.far import far_generate
from anyflow.models.student import add_lora, save_adapter, student_from_teacher, student_velocity
from anyflow.objectives.dmd import dmd_gradient, guided_velocity, renoise_time, x0_from_velocity
from anyflow.objectives.simulation import draw_rollout
from anyflow.stages.stage2 import build_far_models, output_name, sample_student, stage1_fn_for
from anyflow.train.stage2 import (FAKE, STUDENT, Stage2Trainer, adapter_params, far_rollout, generator_loss,
                                  use_adapter)
from conftest import make_tiny_wan
from test_far import FAR, randomise_lora

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

BIDI = replace(FAR, architecture="bidirectional")
CFG = replace(Config(), student=FAR,
              stage2=replace(Stage2(), batch_size=2, num_steps_choices=(2, 4, 16), ckpt_every=2, log_every=1))
NEG = torch.zeros(1, 8, 64)
SHIFT = CFG.model.flow_shift


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_wan()


def build(teacher, fake_random=True):
    """(scores, far): bidirectional base with a ``fake_score`` LoRA (random unless ``fake_random`` is False, then
    peft's identity init = the teacher) and the FAR student with a random ``student`` LoRA."""
    scores = student_from_teacher(teacher, BIDI)
    torch.manual_seed(1)
    add_lora(scores, BIDI, FAKE)
    if fake_random:
        randomise_lora(scores, seed=5)
    far = student_from_teacher(teacher, FAR)
    add_lora(far, FAR, STUDENT)
    randomise_lora(far, seed=3)
    return scores, far


def data_fn(generator):
    return SimpleNamespace(latents=torch.randn(2, 8, 5, 8, 8, generator=generator),
                           prompt_embeds=torch.randn(2, 8, 64, generator=generator), index=torch.arange(2))


def snapshot(*models):
    return [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_far_generator_loss_reaches_only_the_far_student_lora(teacher):
    scores, far = build(teacher)
    g = torch.Generator().manual_seed(2)
    batch = data_fn(g)
    use_adapter(far, STUDENT, STUDENT)
    loss, parts = generator_loss(scores, CFG, batch, NEG, g, lambda: stage1_fn_for(far, CFG, NEG)(batch, g),
                                 far_rollout(far, SHIFT))
    loss.backward()
    lora = adapter_params(far, STUDENT)
    assert parts["dmd_grad"] > 0 and parts["stage1"] > 0 and loss.item() == pytest.approx(
        parts["dmd"] + CFG.stage2.stage1_weight * parts["stage1"], rel=1e-6)
    assert lora and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora.values())
    others = [n for n, p in far.named_parameters() if n not in lora and p.grad is not None]
    others += [f"scores.{n}" for n, p in scores.named_parameters() if p.grad is not None]
    assert others == []  # FAR base, teacher/base of the scores, fake_score: no gradient


def test_far_dmd_term_is_dmd_of_generation_against_the_wan_teacher(teacher):
    """N = 2: the three-jump rollout is the 2-step sample whatever k, i.e. KV-cache far_generate; the real score is
    the Wan teacher itself with CFG on the whole video, the fake score the fake_score LoRA — the DMD loss from these
    independent paths equals generator_loss's (same draws from the same generator)."""
    scores, far = build(teacher)
    cfg = replace(CFG, stage2=replace(CFG.stage2, num_steps_choices=(2,), real_guidance_scale=3.0))
    x0, text = data_fn(torch.Generator().manual_seed(4)).latents, data_fn(torch.Generator().manual_seed(5))
    batch = SimpleNamespace(latents=x0, prompt_embeds=text.prompt_embeds, index=torch.arange(2))
    neg = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(6))
    loss, parts = generator_loss(scores, cfg, batch, neg, torch.Generator().manual_seed(9),
                                 rollout=far_rollout(far, SHIFT))

    g = torch.Generator().manual_seed(9)
    n, _ = draw_rollout((2,), g)
    noise = torch.randn(x0.shape, generator=g)
    s2 = cfg.stage2
    t_prime = renoise_time(2, SHIFT, s2.renoise_min, s2.renoise_max, g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        x_hat = far_generate(far, noise, batch.prompt_embeds, n, SHIFT)
        tb = t_prime.reshape(-1, 1, 1, 1, 1)
        z = (1 - tb) * x_hat + tb * eps
        wan = lambda c: teacher(z, timestep=1000 * t_prime, encoder_hidden_states=c, return_dict=False)[0]  # noqa
        real = guided_velocity(wan(batch.prompt_embeds), wan(neg.expand(2, -1, -1)), 3.0)
        use_adapter(scores, FAKE, None)
        fake = student_velocity(scores, z, t_prime, t_prime, batch.prompt_embeds)
        gr = dmd_gradient(x_hat, x0_from_velocity(z, t_prime, real), x0_from_velocity(z, t_prime, fake))
    assert parts["num_steps"] == 2 and float(gr.abs().mean()) > 1e-2
    assert parts["dmd_grad"] == pytest.approx(float(gr.abs().mean()), rel=1e-4)
    assert loss.item() == pytest.approx(float(gr.pow(2).mean()), rel=1e-4)  # MSE(x̂, x̂ − g) = mean g² (reference)


def test_dmd_vanishes_when_fake_equals_real(teacher):
    """fake_score at peft's identity init is the teacher; with no guidance (w = 1) real = fake, so the DMD
    gradient g = (x̂0_fake − x̂0_real)/… is zero: no loss, no student gradient. A trained (random) fake is not."""
    cfg = replace(CFG, stage2=replace(CFG.stage2, real_guidance_scale=1.0, stage1_weight=0.0))
    for fake_random in (False, True):
        scores, far = build(teacher, fake_random=fake_random)
        g = torch.Generator().manual_seed(3)
        use_adapter(far, STUDENT, STUDENT)
        loss, parts = generator_loss(scores, cfg, data_fn(g), NEG, g, rollout=far_rollout(far, SHIFT))
        loss.backward()
        grad = sum(float(p.grad.abs().sum()) for p in adapter_params(far, STUDENT).values())
        if fake_random:
            assert parts["dmd_grad"] > 1e-2 and loss.item() > 1e-5 and grad > 1e-6
        else:
            assert parts["dmd_grad"] < 1e-5 and loss.item() < 1e-11 and grad < 1e-8


def test_far_steps_update_only_their_own_adapter(teacher):
    scores, far = build(teacher)
    trainer = Stage2Trainer(scores, CFG, data_fn, NEG, stage1_fn=stage1_fn_for(far, CFG, NEG),
                            rollout=far_rollout(far, SHIFT))
    assert set(trainer.student) == set(adapter_params(far, STUDENT)) and trainer.fake == adapter_params(scores, FAKE)
    s0, f0 = snapshot(scores, far)
    trainer.fake_step()
    assert changed(scores, s0) == set(trainer.fake) and changed(far, f0) == set()
    s1, f1 = snapshot(scores, far)
    trainer.generator_step()
    assert changed(scores, s1) == set() and changed(far, f1) == set(trainer.student)


def test_far_resume_is_exact(teacher, tmp_path):
    def trainer(ckpt=None):
        scores, far = build(teacher)
        return Stage2Trainer(scores, CFG, data_fn, NEG, stage1_fn=stage1_fn_for(far, CFG, NEG), ckpt_dir=ckpt,
                             rollout=far_rollout(far, SHIFT))

    full = trainer()
    full.train(4, progress=False)
    crashed = trainer(tmp_path)
    crashed.train(4, progress=False, stop_after=3)  # checkpoint at step 2, "crash" after step 3
    resumed = trainer(tmp_path)
    assert resumed.maybe_resume() and resumed.state.step == 2
    resumed.train(4, progress=False)
    for a, b in ((full.student, resumed.student), (full.fake, resumed.fake), (full.ema_state(), resumed.ema_state())):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert [(r["dmd"], r["stage1"], r["fake"]) for r in full.state.history] == \
        [(r["dmd"], r["stage1"], r["fake"]) for r in resumed.state.history]
    assert any(not torch.equal(full.student[n], crashed.student[n]) for n in full.student)  # 3 ≠ 4 steps


def test_stage_builds_far_models_and_samples_with_far_generate(teacher, tmp_path):
    """The stage's assembly: scores = bidirectional base (adapters off = the Wan teacher) with fake_score only, the
    FAR student with the stage-1 file's weights; the evaluation sampler is KV-cache far_generate at the given state
    and restores the adapter; a bidirectional stage-1 file is refused."""
    assert output_name("far") == "far_stage2" and output_name() == "stage2"
    _, src = build(teacher)
    path = save_adapter(src, tmp_path / "far.safetensors", STUDENT,
                        metadata={"architecture": "far", "chunk_partition": "1,2,2"})
    scores, far = build_far_models(CFG, teacher, path)
    assert adapter_params(scores, STUDENT) == {} and adapter_params(far, FAKE) == {}
    loaded = {n: p.detach().clone() for n, p in adapter_params(far, STUDENT).items()}
    assert all(torch.equal(p, dict(src.named_parameters())[n]) for n, p in loaded.items())
    g = torch.Generator().manual_seed(0)
    z, text, t = torch.randn(2, 8, 5, 8, 8, generator=g), torch.randn(2, 8, 64, generator=g), torch.tensor([.9, .3])
    with torch.no_grad():
        use_adapter(scores, None, None)
        ref = teacher(z, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
        torch.testing.assert_close(student_velocity(scores, z, t, t, text), ref, rtol=0, atol=1e-5)

    zero = {n: torch.zeros_like(p) for n, p in loaded.items()}
    x0, x1 = sample_student(far, zero, z, text, 2, SHIFT), sample_student(far, loaded, z, text, 2, SHIFT)
    assert all(torch.equal(p, loaded[n]) for n, p in adapter_params(far, STUDENT).items())  # restored
    torch.testing.assert_close(x1, far_generate(far, z, text, 2, SHIFT), rtol=0, atol=0)
    with torch.no_grad():
        for p in adapter_params(far, STUDENT).values():
            p.zero_()
    torch.testing.assert_close(x0, far_generate(far, z, text, 2, SHIFT), rtol=0, atol=0)
    assert float((x0 - x1).abs().max()) > 1e-3  # the state is what was sampled
    bad = save_adapter(src, tmp_path / "bidi.safetensors", STUDENT, metadata={"paradigm": "flowmap"})
    with pytest.raises(ValueError, match="not a FAR stage-1 adapter"):
        build_far_models(CFG, teacher, bad)
