"""DMD-style distribution matching on the student's own rollouts (DESIGN §3 "Stage 2"; DMD2, Yin et al. 2024).

Conventions (DESIGN §2): t ∈ [0, 1], t = 1 is pure noise, ``z_t = (1 − t)·x0 + t·ε``, velocity ``v = ε − x0``, so
a velocity prediction converts to a clean-sample prediction by ``x̂0 = z_t − t·v``.

Generator step, for a student rollout x̂ (from :mod:`anyflow.objectives.simulation`):

1. re-noise ``z_t' = (1 − t')·x̂ + t'·ε`` with ``t' = clamp(shift(U(0, 1)), t_min, t_max)`` (:func:`dmd_time`;
   reference ``trainer_wan_anyflow_onpolicy.py:181-183``);
2. real score: the frozen teacher with classifier-free guidance in the one convention of the project,
   ``v_real = v_u + w·(v_c − v_u)`` (:func:`guided_velocity`; the same form as stage 1's fusion and the teacher
   sampler); fake score: the ``fake_score`` adapter (tracks the student's distribution);
3. DMD gradient ``g = (x̂0_fake − x̂0_real) / mean|x̂ − x̂0_real|`` (per sample, no grad);
4. loss ``MSE(x̂, sg(x̂ − g))`` — plain MSE as the reference (``trainer_wan_anyflow_onpolicy.py:193``), gradient
   w.r.t. x̂ ``2·g / numel``: descent moves x̂ towards the real score and away from the fake one.

Fake-score step: plain flow matching ``‖u_fake(z_t, t, t) − (ε − x̂)‖²`` on detached rollouts at times from the
same :func:`dmd_time` the generator step queries it at — a fake score never trained where it is asked is the
unguided teacher there, and DMD then pushes the bare CFG direction.
All functions are pure: the scores come in as velocity callables ``v(z, t)`` with t of shape (B,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from anyflow.objectives.simulation import time_shift

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # velocity v(z_t, t), t: (B,)


def _bcast(t_B: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return t_B.reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)


def dmd_time(batch_size: int, shift: float, t_min: float, t_max: float,
             generator: torch.Generator) -> torch.Tensor:
    """``t = clamp(shift(U(0, 1)), t_min, t_max)``, shape (B,): the times the DMD step queries both scores at AND
    the times the fake score trains at (one distribution for both, DESIGN §3 "Stage 2").

    The query is the reference's (``trainer_wan_anyflow_onpolicy.py:181-183``: ``apply_shift(rand)``, clamped).
    The reference trains its fake score at ``shift(sigmoid(N(0, 1)))`` (``:236-239``) — shifted too, but another
    law (P(t > 0.8) 0.59 against the query's 0.56 at shift 5); here both draw from this one function."""
    u = torch.rand(batch_size, generator=generator)
    return time_shift(u, shift).clamp(t_min, t_max)


renoise_time = dmd_time  # the generator step's name for it

FAKE_TIME_LAWS = ("query", "reference", "logit_normal")


def fake_score_time(batch_size: int, shift: float, t_min: float, t_max: float, generator: torch.Generator,
                    law: str = "query") -> torch.Tensor:
    """The fake score's training times (``stage2.fake_times``): ``query`` = :func:`dmd_time`, the law DMD queries
    it at (default); ``reference`` = ``shift(sigmoid(N(0, 1)))`` (``trainer_wan_anyflow_onpolicy.py:236-239``);
    ``logit_normal`` = ``sigmoid(N(0, 1))`` unshifted — this project's code before issue [I] (8 % of its training
    above t = 0.8 against 56 % of the queries), kept so the README's ablation can measure the fix."""
    if law == "query":
        return dmd_time(batch_size, shift, t_min, t_max, generator)
    if law not in FAKE_TIME_LAWS:
        raise ValueError(f"stage2.fake_times: unknown {law!r} ({' | '.join(FAKE_TIME_LAWS)})")
    s = torch.sigmoid(torch.randn(batch_size, generator=generator))
    return time_shift(s, shift) if law == "reference" else s


def noise_to(x0: torch.Tensor, eps: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """``z_t = (1 − t)·x0 + t·ε``."""
    t = _bcast(t_B, x0)
    return (1.0 - t) * x0 + t * eps


def x0_from_velocity(z_t: torch.Tensor, t_B: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x̂0 = z_t − t·v`` (exact for the linear interpolation path)."""
    return z_t - _bcast(t_B, z_t) * v


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ``v_u + w·(v_c − v_u)`` (w = 1: the conditional velocity, no guidance) — the one
    convention of the project: stage 1 fuses the same form (:func:`anyflow.objectives.flowmap.fuse_guidance`), the
    teacher samples with it (:func:`anyflow.models.teacher.teacher_ode_sample`). The reference writes the real
    score as ``c + s·(c − u)`` (``trainer_wan_anyflow_onpolicy.py:130-132``), i.e. w = 1 + s. ``scale`` a float or
    one w per sample (B,) (:func:`guidance_at`)."""
    if torch.is_tensor(scale):
        scale = _bcast(scale.to(v_cond.dtype), v_cond)
    return v_uncond + scale * (v_cond - v_uncond)


def guidance_at(t: torch.Tensor, scale: float, min_t: float = 0.0) -> torch.Tensor:
    """The CFG scale in force at times ``t`` (any shape) under a guidance interval (``model.guidance_min_t``;
    Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"): ``scale`` where ``t > min_t``, 1 — the
    conditional velocity — at and below it. ``min_t`` ≤ 0 is guidance at every time (the reference, Wan2.1's own
    sampler). The teacher's sampler, stage 1's fused target and stage 2's real score all read it from here, so the
    student learns the very ODE the gate's teacher reference integrates."""
    if min_t <= 0:
        return torch.full_like(t, float(scale))
    return torch.where(t > min_t, torch.full_like(t, float(scale)), torch.ones_like(t))


def dmd_gradient(x_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                 eps: float = 1e-8) -> torch.Tensor:
    """``g = (x̂0_fake − x̂0_real) / mean|x̂ − x̂0_real|`` with the mean taken per sample (DMD2's normaliser)."""
    dims = tuple(range(1, x_hat.ndim))
    norm = (x_hat - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    return (x0_fake - x0_real) / norm


def dmd_loss(x_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``MSE(x̂, sg(x̂ − g))`` = mean g²; ∂L/∂x̂ = 2·g / numel. Plain MSE as the reference
    (``trainer_wan_anyflow_onpolicy.py:193``): ``½·MSE`` would halve DMD against the co-trained stage-1 term."""
    return F.mse_loss(x_hat.float(), (x_hat - grad).detach().float(), reduction="mean")


@dataclass
class DMDOut:
    loss: torch.Tensor
    grad_norm: float  # mean |g|
    t_prime: torch.Tensor


def generator_dmd_loss(x_hat: torch.Tensor, real_v: ScoreFn, fake_v: ScoreFn, t_prime: torch.Tensor,
                       eps: torch.Tensor) -> DMDOut:
    """DMD loss of a student rollout ``x_hat`` (with grad) re-noised at ``t_prime`` with noise ``eps``.

    The scores are evaluated without gradients; only the returned loss carries the graph back through x̂.
    """
    with torch.no_grad():
        z = noise_to(x_hat.detach(), eps, t_prime)
        x0_real = x0_from_velocity(z, t_prime, real_v(z, t_prime))
        x0_fake = x0_from_velocity(z, t_prime, fake_v(z, t_prime))
        g = dmd_gradient(x_hat.detach(), x0_real, x0_fake)
    return DMDOut(dmd_loss(x_hat, g), float(g.abs().mean()), t_prime)


def fake_score_loss(fake_v: ScoreFn, x0: torch.Tensor, eps: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """Flow matching on (detached) student samples: ``mean ‖v_fake(z_t, t) − (ε − x0)‖²``; ``t_B`` from
    :func:`dmd_time` (reference ``trainer_wan_anyflow_onpolicy.py:243-250``)."""
    x0 = x0.detach()
    z = noise_to(x0, eps, t_B)
    return F.mse_loss(fake_v(z, t_B).float(), (eps - x0).float())
