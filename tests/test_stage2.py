"""Stage 2 on one base model with two adapters (DESIGN §3 "Stage 2"): gradient routing, step isolation, resume."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from anyflow.config import Config, Stage2, Student
from anyflow.objectives.simulation import flowmap_backward_simulation
from anyflow.train.stage2 import (FAKE, STUDENT, Stage2Trainer, adapter_params, generator_loss, use_adapter,
                                  velocity)

STUDENT_CFG = Student(lora_rank=4, lora_alpha=4.0)
CFG = replace(Config(), student=STUDENT_CFG,
              stage2=replace(Stage2(), batch_size=2, num_steps_choices=(2, 4, 16), ckpt_every=2, log_every=1))


def build(tiny_wan):
    student = pytest.importorskip("anyflow.models.student", reason="anyflow.models.student not built yet")
    model = student.student_from_teacher(tiny_wan, STUDENT_CFG)
    student.add_lora(model, STUDENT_CFG, STUDENT)
    student.add_lora(model, STUDENT_CFG, FAKE)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # deterministic, non-trivial adapters (peft zero-inits B, draws A from the global RNG)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_((0.05 if "lora_B" in n else 0.3) * torch.randn(p.shape, generator=g))
    return model


def data_fn(generator):
    return SimpleNamespace(latents=torch.randn(2, 8, 5, 8, 8, generator=generator),
                           prompt_embeds=torch.randn(2, 8, 64, generator=generator),
                           index=torch.arange(2))


NEG = torch.zeros(1, 8, 64)


def snapshot(params):
    return {n: p.detach().clone() for n, p in params.items()}


def test_adapters_disabled_is_the_teacher(tiny_wan):
    model = build(tiny_wan)
    g = torch.Generator().manual_seed(0)
    z, pe = torch.randn(2, 8, 5, 8, 8, generator=g), torch.randn(2, 8, 64, generator=g)
    t = torch.tensor([0.9, 0.35])
    with torch.no_grad():
        ref = tiny_wan(z, timestep=1000 * t, encoder_hidden_states=pe, return_dict=False)[0]
        teacher = velocity(model, None, pe, None)(z, t, t)
        student = velocity(model, STUDENT, pe, None)(z, t, t)
    torch.testing.assert_close(teacher, ref, rtol=0, atol=1e-5)
    assert float((student - ref).abs().max()) > 1e-3  # the adapters do change the output


@pytest.mark.parametrize("jump", [0, 1, 2])
def test_student_adapter_gets_gradient_through_each_jump(tiny_wan, jump):
    model = build(tiny_wan)
    g = torch.Generator().manual_seed(1)
    batch = data_fn(g)
    use_adapter(model, STUDENT, STUDENT)
    u = velocity(model, STUDENT, batch.prompt_embeds, STUDENT)
    calls = []

    def only_one_jump_differentiable(z, t, r):
        with torch.set_grad_enabled(len(calls) == jump):
            calls.append(1)
            return u(z, t, r)

    x_hat = flowmap_backward_simulation(only_one_jump_differentiable, torch.randn(2, 8, 5, 8, 8, generator=g),
                                        8, 3, CFG.model.flow_shift)
    x_hat.square().mean().backward()
    grads = [p.grad for p in adapter_params(model, STUDENT).values()]
    assert all(gr is not None for gr in grads) and sum(float(gr.abs().sum()) for gr in grads) > 0


def test_generator_loss_reaches_only_the_student_adapter(tiny_wan):
    model = build(tiny_wan)
    g = torch.Generator().manual_seed(2)
    use_adapter(model, STUDENT, STUDENT)
    loss, parts = generator_loss(model, CFG, data_fn(g), NEG, g)
    loss.backward()
    student, fake = adapter_params(model, STUDENT), adapter_params(model, FAKE)
    assert parts["dmd_grad"] > 0
    assert all(p.grad is not None for p in student.values())
    assert sum(float(p.grad.abs().sum()) for p in student.values()) > 0
    others = [(n, p) for n, p in model.named_parameters() if n not in student]
    assert others and all(p.grad is None for _, p in others)  # base (teacher) weights and fake adapter: no grad


def test_steps_update_only_their_own_adapter(tiny_wan):
    model = build(tiny_wan)
    trainer = Stage2Trainer(model, CFG, data_fn, NEG)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    s0, f0 = snapshot(trainer.student), snapshot(trainer.fake)
    trainer.fake_step()
    assert all(torch.equal(trainer.student[n], s0[n]) for n in s0)
    assert any(not torch.equal(trainer.fake[n], f0[n]) for n in f0)
    f1 = snapshot(trainer.fake)
    trainer.generator_step()
    assert all(torch.equal(trainer.fake[n], f1[n]) for n in f1)
    assert any(not torch.equal(trainer.student[n], s0[n]) for n in s0)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.slow
def test_resume_is_exact(tiny_wan, tmp_path):
    full = Stage2Trainer(build(tiny_wan), CFG, data_fn, NEG)
    full.train(4, progress=False)

    crashed = Stage2Trainer(build(tiny_wan), CFG, data_fn, NEG, ckpt_dir=tmp_path)
    crashed.train(4, progress=False, stop_after=3)  # checkpoint at step 2, "crash" after step 3
    resumed = Stage2Trainer(build(tiny_wan), CFG, data_fn, NEG, ckpt_dir=tmp_path)
    assert resumed.maybe_resume() and resumed.state.step == 2
    resumed.train(4, progress=False)

    for a, b in ((full.student, resumed.student), (full.fake, resumed.fake),
                 (full.ema_state(), resumed.ema_state())):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert [r["dmd"] for r in full.state.history] == [r["dmd"] for r in resumed.state.history]


def test_gaussian_frechet_closed_forms():
    from anyflow.eval.latent_stats import gaussian_frechet, latent_features

    g = torch.Generator().manual_seed(8)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert abs(gaussian_frechet(a, a)) < 1e-8
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert abs(gaussian_frechet(a, a + shift) - 5.25) < 1e-6  # same covariance: ‖Δμ‖²
    # N(0, I) vs N(0, 4I) in 3-d: Tr(I + 4I − 2·2I) = 3
    assert abs(gaussian_frechet(a, 2 * torch.randn(4000, 3, generator=g, dtype=torch.float64)) - 3.0) < 0.3
    x = torch.randn(2, 8, 5, 4, 4, generator=g)
    f = latent_features(x)
    torch.testing.assert_close(f[:, :8], x.flatten(2).mean(-1))
    torch.testing.assert_close(f[:, 8:16], x.flatten(2).std(-1))
