"""DMD-style distribution matching on the student's own rollouts (DESIGN §3 "Stage 2"; DMD2, Yin et al. 2024).

Conventions (DESIGN §2): t ∈ [0, 1], t = 1 is pure noise, ``z_t = (1 − t)·x0 + t·ε``, velocity ``v = ε − x0``, so
a velocity prediction converts to a clean-sample prediction by ``x̂0 = z_t − t·v``.

Generator step, for a student rollout x̂ (from :mod:`anyflow.objectives.simulation`):

1. re-noise ``z_t' = (1 − t')·x̂ + t'·ε`` with ``t' = clamp(shift(U(0, 1)), t_min, t_max)``;
2. real score: the frozen teacher with classifier-free guidance ``v_real = v_c + s·(v_c − v_u)``;
   fake score: the ``fake_score`` adapter (tracks the student's distribution);
3. DMD gradient ``g = (x̂0_fake − x̂0_real) / mean|x̂ − x̂0_real|`` (per sample, no grad);
4. loss ``½·MSE(x̂, sg(x̂ − g))`` — its gradient w.r.t. x̂ is ``g / numel``, i.e. descent moves x̂ towards the
   real score and away from the fake one: ∇θ L = −E[(s_real − s_fake)·∂x̂/∂θ].

Fake-score step: plain flow matching ``‖u_fake(z_t, t, t) − (ε − x̂)‖²`` on detached rollouts at logit-normal t.
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


def renoise_time(batch_size: int, shift: float, t_min: float, t_max: float,
                 generator: torch.Generator) -> torch.Tensor:
    """``t' = clamp(shift(U(0, 1)), t_min, t_max)``, shape (B,)."""
    u = torch.rand(batch_size, generator=generator)
    return time_shift(u, shift).clamp(t_min, t_max)


def logit_normal_time(batch_size: int, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """``t = sigmoid(N(mean, std²))``, shape (B,) — the fake-score training times."""
    return torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator))


def noise_to(x0: torch.Tensor, eps: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """``z_t = (1 − t)·x0 + t·ε``."""
    t = _bcast(t_B, x0)
    return (1.0 - t) * x0 + t * eps


def x0_from_velocity(z_t: torch.Tensor, t_B: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x̂0 = z_t − t·v`` (exact for the linear interpolation path)."""
    return z_t - _bcast(t_B, z_t) * v


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in the reference's form ``v_c + s·(v_c − v_u)``."""
    return v_cond + scale * (v_cond - v_uncond)


def dmd_gradient(x_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                 eps: float = 1e-8) -> torch.Tensor:
    """``g = (x̂0_fake − x̂0_real) / mean|x̂ − x̂0_real|`` with the mean taken per sample (DMD2's normaliser)."""
    dims = tuple(range(1, x_hat.ndim))
    norm = (x_hat - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    return (x0_fake - x0_real) / norm


def dmd_loss(x_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``½·MSE(x̂, sg(x̂ − g))``; ∂L/∂x̂ = g / numel."""
    return 0.5 * F.mse_loss(x_hat.float(), (x_hat - grad).detach().float(), reduction="mean")


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
    """Flow matching on (detached) student samples: ``mean ‖v_fake(z_t, t) − (ε − x0)‖²``."""
    x0 = x0.detach()
    z = noise_to(x0, eps, t_B)
    return F.mse_loss(fake_v(z, t_B).float(), (eps - x0).float())
