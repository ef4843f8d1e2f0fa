"""Stage 1: forward flow-map (MeanFlow-style) objective as small pure functions (DESIGN §3 "Stage 1").

Conventions: t ∈ [0, 1] with t = 1 noise, ``z_t = (1 − t)·x0 + t·ε``, ``v = ε − x0``, flow map
``f(z_t, t, r) = z_t − (t − r)·u(z_t, t, r)``. Velocity callables ``u(z, t, r, text)`` take z (B, C, F, H, W),
t and r of shape (B,), text (B, L, D).

The mean velocity of the ODE from t to r satisfies the MeanFlow identity ``u = v − (t − r)·dF/dt`` with dF/dt the
total derivative of u along the trajectory (tangent v for z, 1 for t, 0 for r). The student regresses onto the
stop-gradient of the right-hand side evaluated with itself:

* :func:`sample_times` — t, r as max/min of two U(0, 1); by *global* sample index the first ``split[0]`` of the
  global batch get r = t (plain flow matching), the next ``split[1]`` r = 0, the rest keep (t, r); both shifted.
  ``paradigm: consistency`` (the baseline) uses r ≡ 0 for every sample.
* :func:`time_weight` — λ(t): ``beta08`` = Beta(2, 1.5) density ``t·(1 − t)^0.5 / B(2, 1.5)``, ``uniform`` = 1,
  ``gaussian`` = Normal(0.5, 0.25) density — evaluated at the unshifted draw s (the paper's Fig. 6 reweights the
  density p(s) = 2s of max(U, U)).
* :func:`total_derivative` — dF/dt by central difference ``[u(z + εv, t + ε) − u(z − εv, t − ε)] / 2ε``
  (reference, ε = 0.005 on the [0, 1] scale) or exactly by forward-mode AD (``torch.func.jvp``).
* :func:`fuse_guidance` — the prediction compared to the target is ``(u_c − (1 − w)·sg(u_∅)) / w``: the student's
  conditional output learns the CFG-guided flow map (one call per step at inference); dF/dt is that of u_c divided
  by w, as the reference does. Samples whose text was dropped (to the negative embedding) use w = 1.
* :func:`adaptive_weights` — every r ≠ t sample is rescaled by ``sg(μ_{r=t} / (ℓ_i + c))`` with μ the mean loss
  of the r = t samples (all-reduced across ranks under DDP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from anyflow.objectives.simulation import time_shift

TextVelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

KIND_DIFFUSION, KIND_CONSISTENCY, KIND_FREE = 0, 1, 2
BETA_2_15 = math.gamma(2.0) * math.gamma(1.5) / math.gamma(3.5)  # B(2, 1.5) = 4/15


def _b(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# --------------------------------------------------------------------------------------------- times and weights
def split_kinds(global_index: torch.Tensor, global_batch: int, split: Sequence[float]) -> torch.Tensor:
    """Kind of each sample by its index in the *global* batch: 0 = r = t, 1 = r = 0, 2 = free (t, r)."""
    if len(split) != 3 or abs(sum(split) - 1.0) > 1e-6 or min(split) < 0:
        raise ValueError(f"stage1.time_split: three non-negative fractions summing to 1 (got {tuple(split)})")
    n_diff = int(round(split[0] * global_batch))
    n_cons = int(round((split[0] + split[1]) * global_batch)) - n_diff
    kinds = torch.full(global_index.shape, KIND_FREE, dtype=torch.long)
    kinds[global_index < n_diff + n_cons] = KIND_CONSISTENCY
    kinds[global_index < n_diff] = KIND_DIFFUSION
    return kinds


@dataclass
class Times:
    t: torch.Tensor  # shifted, (B,)
    r: torch.Tensor  # shifted, (B,), r ≤ t
    s: torch.Tensor  # unshifted draw of t (weights are evaluated here)
    kind: torch.Tensor  # (B,) KIND_*


def sample_times(batch_size: int, shift: float, split: Sequence[float], generator: Optional[torch.Generator],
                 paradigm: str = "flowmap", global_offset: int = 0, global_batch: Optional[int] = None,
                 uniforms: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Times:
    """(t, r) for one (local) batch whose samples have global indices ``global_offset + i`` (from ``generator``, or
    from two given (B,) uniform draws)."""
    if uniforms is None:
        uniforms = torch.rand(batch_size, generator=generator), torch.rand(batch_size, generator=generator)
    a, b = uniforms
    s_t, s_r = torch.maximum(a, b), torch.minimum(a, b)
    if paradigm == "consistency":
        kind = torch.full((batch_size,), KIND_CONSISTENCY, dtype=torch.long)
    elif paradigm == "flowmap":
        kind = split_kinds(global_offset + torch.arange(batch_size), global_batch or batch_size, split)
    else:
        raise ValueError(f"student.paradigm: unknown {paradigm!r} (flowmap | consistency)")
    s_r = torch.where(kind == KIND_DIFFUSION, s_t, torch.where(kind == KIND_CONSISTENCY, torch.zeros_like(s_r), s_r))
    return Times(t=time_shift(s_t, shift), r=time_shift(s_r, shift), s=s_t, kind=kind)


def time_weight(s: torch.Tensor, kind: str) -> torch.Tensor:
    """λ(s) as a density on [0, 1]."""
    if kind == "uniform":
        return torch.ones_like(s)
    if kind == "beta08":
        return s * (1.0 - s).clamp_min(0.0).sqrt() / BETA_2_15
    if kind == "gaussian":
        return torch.exp(-0.5 * ((s - 0.5) / 0.25) ** 2) / (0.25 * math.sqrt(2 * math.pi))
    raise ValueError(f"stage1.weighting: unknown {kind!r} (beta08 | uniform | gaussian)")


# --------------------------------------------------------------------------------------------- the target
def total_derivative(u: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor, t: torch.Tensor,
                     v: torch.Tensor, method: str = "central", eps: float = 0.005) -> torch.Tensor:
    """dF/dt of ``u(z, t)`` (r held fixed inside ``u``) along the tangent (v, 1), without grad."""
    with torch.no_grad():
        if method == "central":
            hi = u(z + eps * v, t + eps)
            lo = u(z - eps * v, t - eps)
            return (hi - lo) / (2.0 * eps)
        if method == "jvp":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD has no fused-attention rule on CPU
                return torch.func.jvp(u, (z, t), (v, torch.ones_like(t)))[1]
    raise ValueError(f"stage1.derivative: unknown {method!r} (central | jvp)")


def meanflow_target(dfdt: torch.Tensor, v: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``u_tgt = v − (t − r)·dF/dt``."""
    return v - _b(t - r, v) * dfdt


def fuse_guidance(u_cond: torch.Tensor, u_uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """``(u_c − (1 − w)·sg(u_∅)) / w``; inverse of CFG: fuse(u_∅ + w·(v_c − u_∅), u_∅, w) = v_c."""
    w = torch.as_tensor(w, dtype=u_cond.dtype)
    if w.ndim:
        w = _b(w, u_cond)
    return (u_cond - (1.0 - w) * u_uncond.detach()) / w


def adaptive_weights(per_sample: torch.Tensor, kind: torch.Tensor, c: float) -> torch.Tensor:
    """sg(μ_{r=t} / (ℓ_i + c)) for r ≠ t samples, 1 for r = t samples (and for all when no r = t sample exists
    anywhere in the global batch)."""
    per_sample = per_sample.detach()
    diff = kind == KIND_DIFFUSION
    stats = torch.stack([per_sample[diff].sum(), diff.sum().to(per_sample.dtype)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    if float(stats[1]) == 0:
        return torch.ones_like(per_sample)
    mu = stats[0] / stats[1]
    return torch.where(diff, torch.ones_like(per_sample), mu / (per_sample + c))


# --------------------------------------------------------------------------------------------- the loss
@dataclass
class Stage1Out:
    loss: torch.Tensor
    parts: dict = field(default_factory=dict)


def draw(x0: torch.Tensor, generator: Optional[torch.Generator], sample_seeds: Optional[Sequence[int]] = None):
    """The per-step randomness: two uniforms for (t, r), one for text dropout, the noise ε. With ``sample_seeds``
    every sample draws from its own seed, so a sample's draws do not depend on which rank or batch holds it (a
    2-rank DDP step then equals the 1-process step on the global batch)."""
    b = x0.shape[0]
    if sample_seeds is None:
        ua, ub = torch.rand(b, generator=generator), torch.rand(b, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return ua, ub, torch.rand(b, generator=generator), eps
    if len(sample_seeds) != b:
        raise ValueError(f"sample_seeds: {len(sample_seeds)} seeds for a batch of {b}")
    rows = []
    for seed in sample_seeds:
        g = torch.Generator().manual_seed(int(seed))
        rows.append((torch.rand(3, generator=g), torch.randn(x0.shape[1:], generator=g, dtype=x0.dtype)))
    u3 = torch.stack([r[0] for r in rows])
    return u3[:, 0], u3[:, 1], u3[:, 2], torch.stack([r[1] for r in rows])


def stage1_terms(u: TextVelocityFn, x0: torch.Tensor, text: torch.Tensor, negative: torch.Tensor, s1,
                 paradigm: str, shift: float, generator: Optional[torch.Generator], global_offset: int = 0,
                 global_batch: Optional[int] = None, sample_seeds: Optional[Sequence[int]] = None,
                 u_nograd: Optional[TextVelocityFn] = None,
                 v_teacher: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None
                 ) -> Stage1Out:
    """The stage-1 loss of velocity ``u`` on clean latents ``x0`` with text ``text``; ``s1`` is ``cfg.stage1``.
    ``u_nograd`` (default ``u``) serves the no-grad evaluations (dF/dt, the unconditional branch) — under DDP the
    unwrapped module, so only the graded call goes through the wrapper. ``v_teacher(z, t, text)`` (no grad), when
    given, replaces ``v = ε − x0`` by the teacher's velocity — E[ε − x0 | z_t] on teacher-synthesised data — in both
    the r = t target and the dF/dt tangent."""
    b = x0.shape[0]
    u_ng = u_nograd or u
    ua, ub, udrop, eps = draw(x0, generator, sample_seeds)
    times = sample_times(b, shift, s1.time_split, None, paradigm, global_offset, global_batch, uniforms=(ua, ub))
    t, r = times.t.to(x0.dtype), times.r.to(x0.dtype)
    z = (1.0 - _b(t, x0)) * x0 + _b(t, x0) * eps
    drop = udrop < s1.text_dropout
    neg = negative.to(text.dtype).expand(b, -1, -1)
    text = torch.where(_b(drop, text).bool(), neg, text)
    if v_teacher is None:
        v = eps - x0
    else:
        with torch.no_grad():
            v = v_teacher(z, t, text).detach()
    w = torch.where(drop, torch.ones(b), torch.full((b,), float(s1.guidance_scale))).to(x0.dtype)

    moving = times.kind != KIND_DIFFUSION  # only r ≠ t samples need dF/dt
    target = v.clone()
    if bool(moving.any()):
        idx = moving.nonzero().squeeze(1)
        zm, tm, rm, vm, cm = z[idx], t[idx], r[idx], v[idx], text[idx]
        dfdt = total_derivative(lambda zz, tt: u_ng(zz, tt, rm, cm), zm, tm, vm, s1.derivative, s1.fd_eps)
        target[idx] = meanflow_target(dfdt / _b(w[idx], dfdt), vm, tm, rm)

    pred_c = u(z, t, r, text)
    guided = w != 1
    if bool(guided.any()):
        with torch.no_grad():
            u_unc = torch.zeros_like(pred_c)
            gi = guided.nonzero().squeeze(1)
            u_unc[gi] = u_ng(z[gi], t[gi], r[gi], neg[gi])
        pred = fuse_guidance(pred_c, u_unc, w)
    else:
        pred = pred_c
    per_sample = (pred - target.detach()).pow(2).flatten(1).mean(1)
    lam = time_weight(times.s, s1.weighting).to(x0.dtype)
    adapt = adaptive_weights(per_sample, times.kind, s1.adaptive_c)
    loss = (lam * adapt * per_sample).mean()
    parts = {"loss": float(loss.detach())}
    for k, name in ((KIND_DIFFUSION, "mse_r_eq_t"), (KIND_CONSISTENCY, "mse_r_eq_0"), (KIND_FREE, "mse_free")):
        sel = times.kind == k
        if bool(sel.any()):
            parts[name] = float(per_sample[sel].detach().mean())
    return Stage1Out(loss, parts)


def model_text_velocity(model) -> TextVelocityFn:
    from anyflow.models.student import student_velocity

    return lambda z, t, r, text: student_velocity(model, z, t, r, text)


def stage1_loss(model, cfg, batch, negative: torch.Tensor, generator: torch.Generator, global_offset: int = 0,
                global_batch: Optional[int] = None) -> torch.Tensor:
    """The full stage-1 loss of ``model``'s active adapter on a :class:`~anyflow.data.shards.Batch`."""
    from anyflow.models.student import STUDENT, teacher_velocity

    v_teacher = teacher_velocity(model, STUDENT) if cfg.stage1.velocity_target == "teacher" else None
    return stage1_terms(model_text_velocity(model), batch.latents, batch.prompt_embeds, negative, cfg.stage1,
                        cfg.student.paradigm, cfg.model.flow_shift, generator, global_offset, global_batch,
                        v_teacher=v_teacher).loss
