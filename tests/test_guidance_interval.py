"""The guidance interval (``model.guidance_min_t``, Kynkäänniemi et al. 2024): CFG at t > τ, the conditional velocity
(w = 1) at and below τ — in the teacher's sampler, stage 1's fused target (tests/test_guided_closed_form.py (f):
the exact interval-guided flow map is the zero of the loss) and stage 2's real score, so the student learns the ODE
the gate's teacher reference integrates. τ = 0 is guidance everywhere (the reference, the wan profiles)."""

import pytest
import torch

from anyflow import config as C
from anyflow.models.teacher import ode_schedule, teacher_nfe, teacher_ode_sample
from anyflow.objectives.dmd import guidance_at, guided_velocity


def test_guidance_at_is_the_scale_in_force():
    t = torch.tensor([1.0, 0.61, 0.6, 0.3, 0.0])
    assert guidance_at(t, 5.0, 0.6).tolist() == [5.0, 5.0, 1.0, 1.0, 1.0]  # at τ itself: unguided
    assert guidance_at(t, 5.0, 0.0).tolist() == [5.0] * 5  # τ = 0: every t, t = 0 included
    tk = t.reshape(1, 5).expand(2, 5)  # per-chunk times (B, K) keep their shape
    assert guidance_at(tk, 3.0, 0.5).shape == (2, 5)
    c, u = torch.full((5, 2, 1, 1, 1), 2.0), torch.full((5, 2, 1, 1, 1), 0.5)
    got = guided_velocity(c, u, guidance_at(t, 5.0, 0.6))  # per-sample w
    assert got[:, 0, 0, 0, 0].tolist() == [0.5 + 5 * 1.5] * 2 + [2.0] * 3


class Echo(torch.nn.Module):
    """v = the first entry of the text embedding, everywhere; records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.batches = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        self.batches.append(hidden_states.shape[0])
        return (encoder_hidden_states[:, :1, :1, None, None].expand_as(hidden_states),)


@pytest.mark.parametrize("min_t,guided", [(0.0, 4), (0.3, 3), (0.5, 2), (0.7, 2), (0.8, 1), (0.99, 1)])
def test_teacher_sampler_guides_only_above_the_boundary(min_t, guided):
    """Shift 1, 4 steps: the steps start at t = 1, 0.75, 0.5, 0.25; each guided step moves by ¼·(u + w(c − u)),
    each unguided one by ¼·c, and only guided steps pay the unconditional pass (teacher_nfe counts them)."""
    m = Echo()
    z = torch.zeros(2, 1, 1, 1, 1)
    cond, neg, w = torch.full((2, 1, 1), 2.0), torch.full((1, 1, 1), 0.5), 3.0
    out = teacher_ode_sample(m, z, cond, neg, steps=4, guidance_scale=w, shift=1.0, guidance_min_t=min_t)
    assert ode_schedule(4, 1.0)[:-1].tolist() == [1.0, 0.75, 0.5, 0.25]
    v_g, v_c = 0.5 + w * (2.0 - 0.5), 2.0
    torch.testing.assert_close(out, z - 0.25 * (guided * v_g + (4 - guided) * v_c))
    assert m.batches == [4] * guided + [2] * (4 - guided)
    assert teacher_nfe(4, w, 1.0, min_t) == 4 + guided
    assert teacher_nfe(4, 1.0, 1.0, min_t) == 4  # w = 1: never an unconditional pass


def test_real_score_takes_each_samples_scale(monkeypatch):
    """Stage 2's real score: u + w(c − u) on samples with t > τ, c on the others (one batched teacher call)."""
    from anyflow.train import stage2 as S

    def fake_velocity(model, adapter, prompt_embeds, trainable):
        return lambda z, t, r: prompt_embeds[:, :1, :1, None, None].expand_as(z).clone()
    monkeypatch.setattr(S, "velocity", fake_velocity)
    cond, uncond = torch.full((3, 1, 1), 2.0), torch.full((3, 1, 1), 0.5)
    real = S.teacher_cfg_score(None, cond, uncond, 4.0, None, guidance_min_t=0.5)
    got = real(torch.zeros(3, 1, 1, 1, 1), torch.tensor([0.9, 0.5, 0.2]))
    assert got.flatten().tolist() == [0.5 + 4.0 * 1.5, 2.0, 2.0]
    every = S.teacher_cfg_score(None, cond, uncond, 4.0, None)(torch.zeros(3, 1, 1, 1, 1), torch.tensor([0.9, 0.5, 0.2]))
    assert every.flatten().tolist() == [0.5 + 4.0 * 1.5] * 3


def test_generator_loss_passes_the_configured_boundary(monkeypatch):
    """The wiring: generator_loss builds the real score with ``model.guidance_min_t``."""
    from types import SimpleNamespace

    from anyflow.train import stage2 as S

    seen = {}

    def spy(model, cond, uncond, scale, trainable, guidance_min_t=0.0):
        seen.update(scale=scale, guidance_min_t=guidance_min_t)
        return lambda z, t: torch.zeros_like(z)
    monkeypatch.setattr(S, "teacher_cfg_score", spy)
    monkeypatch.setattr(S, "score", lambda *a, **k: (lambda z, t: torch.zeros_like(z)))
    monkeypatch.setattr(S, "use_adapter", lambda *a, **k: None)
    cfg = C.build({"model": {"guidance_min_t": 0.45}})
    x0 = torch.randn(2, 8, 2, 4, 4)
    batch = SimpleNamespace(latents=x0, prompt_embeds=torch.randn(2, 6, 64))
    rollout = SimpleNamespace(model=None, simulate=lambda noise, c, n, k, tr: noise.clone().requires_grad_(True))
    S.generator_loss(None, cfg, batch, torch.zeros(1, 6, 64), torch.Generator().manual_seed(0), rollout=rollout)
    assert seen == {"scale": cfg.stage2.real_guidance_scale, "guidance_min_t": 0.45}


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_boundary_outside_the_unit_interval_names_the_field(bad):
    with pytest.raises(C.ConfigError, match="model.guidance_min_t"):
        C.build({"model": {"guidance_min_t": bad}})
