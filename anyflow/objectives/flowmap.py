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
  ``gaussian`` = Normal(0.5, 0.25) density — evaluated at the *shifted* t, as the reference looks beta08 up on its
  shifted timestep grid (``scheduling_flowmap_euler_discrete.py:50-53, 60-63, 89-92``: ``get_train_weight(t)``
  with t = 1000·shift(s), ``trainer_wan_anyflow_pretrain.py:280, 311``), so λ peaks at t = 2/3 (at the
  unshifted draw it peaked at t = shift(2/3) ≈ 0.91 for shift 5). The reference normalises its grid weights to
  mean 1 over the shifted grid (÷ 0.2734 at shift 5); the density normalisation here (÷ B(2, 1.5) = 0.2667) is
  shift-independent and 2.5 % larger.
* :func:`total_derivative` — dF/dt by central difference ``[u(z + εv, t + ε) − u(z − εv, t − ε)] / 2ε``
  (reference, ε = 0.005 on the [0, 1] scale) or exactly by forward-mode AD (``torch.func.jvp``).
* :func:`fuse_guidance` — the prediction compared to the target is ``(u_c − (1 − w)·sg(u_∅)) / w``: the student's
  conditional output learns the CFG-guided flow map (one call per step at inference); dF/dt is that of u_c divided
  by w, as the reference does. Samples whose text was dropped (to the negative embedding) use w = 1.
* :func:`adaptive_weights` — applied to the λ-weighted per-sample loss ``L_i = λ_i·ℓ_i``: every r ≠ t sample's
  ``L_i`` is rescaled by ``sg(μ_λ / (L_i + c))`` with μ_λ the mean λ-weighted loss of the r = t samples
  (all-reduced across ranks under DDP), as the reference (``trainer_wan_anyflow_pretrain.py:310-320``).
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
    if x.ndim == like.ndim:  # already broadcastable (per-frame times of the chunked path: (B, 1, F, 1, 1))
        return x.to(like.dtype)
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _frames(x_BK: torch.Tensor, chunks: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Per-chunk values (B, K) → (B, 1, F, 1, 1), chunk k's value on its ``chunks[k]`` latent frames."""
    rep = torch.as_tensor(list(chunks), device=x_BK.device)
    return x_BK.repeat_interleave(rep, dim=1)[:, None, :, None, None].to(like.dtype)


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
    t: torch.Tensor  # shifted, (B,) or per chunk (B, K)
    r: torch.Tensor  # shifted, like t, r ≤ t
    s: torch.Tensor  # unshifted draw of t, like t (λ is evaluated at the shifted t)
    kind: torch.Tensor  # (B,) KIND_*


def sample_times(batch_size: int, shift: float, split: Sequence[float], generator: Optional[torch.Generator],
                 paradigm: str = "flowmap", global_offset: int = 0, global_batch: Optional[int] = None,
                 uniforms: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Times:
    """(t, r) for one (local) batch whose samples have global indices ``global_offset + i`` (from ``generator``, or
    from two given (B,) uniform draws). Given (B, K) uniforms (one pair per chunk of a causal student), t, r and s
    are (B, K); the kind stays per sample (an r = t sample has r = t on every chunk, r = 0 likewise)."""
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
    kd = kind.reshape(-1, *([1] * (s_t.ndim - 1)))
    s_r = torch.where(kd == KIND_DIFFUSION, s_t, torch.where(kd == KIND_CONSISTENCY, torch.zeros_like(s_r), s_r))
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
    """sg(μ_{r=t} / (L_i + c)) for r ≠ t samples, 1 for r = t samples (and for all when no r = t sample exists
    anywhere in the global batch). ``per_sample`` is the λ-weighted loss L_i = λ_i·ℓ_i, so μ is the mean λ-weighted
    loss of the r = t samples (reference ``trainer_wan_anyflow_pretrain.py:314-319``)."""
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


def draw(x0: torch.Tensor, generator: Optional[torch.Generator], sample_seeds: Optional[Sequence[int]] = None,
         n_chunks: int = 1):
    """The per-step randomness: two uniforms for (t, r), one for text dropout, the noise ε. With ``sample_seeds``
    every sample draws from its own seed, so a sample's draws do not depend on which rank or batch holds it (a
    2-rank DDP step then equals the 1-process step on the global batch). ``n_chunks`` K > 1 (causal student): the
    (t, r) uniforms are (B, K) — column 0 is the per-sample draw, columns 1.. are drawn after ε from the same
    stream, so every other draw is the one the per-sample objective makes."""
    b = x0.shape[0]
    extra = 2 * (n_chunks - 1)
    if sample_seeds is None:
        ua, ub = torch.rand(b, generator=generator), torch.rand(b, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        ud = torch.rand(b, generator=generator)
        if extra:
            more = torch.rand(b, extra, generator=generator)
            ua, ub = torch.cat([ua[:, None], more[:, 0::2]], 1), torch.cat([ub[:, None], more[:, 1::2]], 1)
        return ua, ub, ud, eps
    if len(sample_seeds) != b:
        raise ValueError(f"sample_seeds: {len(sample_seeds)} seeds for a batch of {b}")
    rows = []
    for seed in sample_seeds:
        g = torch.Generator().manual_seed(int(seed))
        rows.append((torch.rand(3, generator=g), torch.randn(x0.shape[1:], generator=g, dtype=x0.dtype),
                     torch.rand(extra, generator=g) if extra else None))
    u3 = torch.stack([r[0] for r in rows])
    eps = torch.stack([r[1] for r in rows])
    if not extra:
        return u3[:, 0], u3[:, 1], u3[:, 2], eps
    more = torch.stack([r[2] for r in rows])
    return (torch.cat([u3[:, :1], more[:, 0::2]], 1), torch.cat([u3[:, 1:2], more[:, 1::2]], 1), u3[:, 2], eps)


def stage1_terms(u: TextVelocityFn, x0: torch.Tensor, text: torch.Tensor, negative: torch.Tensor, s1,
                 paradigm: str, shift: float, generator: Optional[torch.Generator], global_offset: int = 0,
                 global_batch: Optional[int] = None, sample_seeds: Optional[Sequence[int]] = None,
                 u_nograd: Optional[TextVelocityFn] = None,
                 v_teacher: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 chunks: Optional[Sequence[int]] = None, clean: Optional[torch.Tensor] = None,
                 guidance_min_t: float = 0.0) -> Stage1Out:
    """The stage-1 loss of velocity ``u`` on clean latents ``x0`` with text ``text``; ``s1`` is ``cfg.stage1``.
    ``u_nograd`` (default ``u``) serves the no-grad evaluations (dF/dt, the unconditional branch) — under DDP the
    unwrapped module, so only the graded call goes through the wrapper. ``v_teacher(z, t, text)`` (no grad), when
    given, replaces ``v = ε − x0`` by the teacher's velocity — E[ε − x0 | z_t] on teacher-synthesised data — in both
    the r = t target and the dF/dt tangent. ``s1.guidance_target`` picks the guided rows' target: "reference" (the
    NVlabs/AnyFlow objective: tangent v, fused mean u_∅(t, r)) or "meanflow" (tangent v_w = w·v + (1 − w)·v_∅,
    target v + ((1 − w)/w)·(v_∅ − u_∅) − (t − r)·dF/dt/w, v_∅ = u_∅(t, t): zero at the exact guided flow map;
    tests/test_guided_closed_form.py). Both are the same on r = t rows and on unguided (w = 1) rows.
    ``guidance_min_t`` (``model.guidance_min_t``): the guidance interval — w is the scale in force at the row's (or
    chunk's) own t (:func:`anyflow.objectives.dmd.guidance_at`), 1 at t ≤ it; with "meanflow" the target then is
    the mean velocity of the ODE whose field is guided only above the boundary (the MeanFlow identity holds for any
    time-dependent field; a jump from t above to r below it crosses the boundary exactly; tested in closed form).

    Causal student (AnyFlow-FAR): ``chunks`` (the latent frames of each chunk, summing to F) gives every chunk its
    own (t, r) — t, r are (B, K), z_t is built per chunk, and dF/dt is taken along (v, 1 on every chunk's t), which
    is each chunk's own derivative when chunk k's output depends on no other chunk's (z, t) (teacher forcing).
    ``clean`` (B, ...) is passed with the rows of every call as a fifth argument ``u(z, t, r, text, clean)`` (FAR:
    the clean context x0 of teacher forcing). Weights: λ per chunk (at the chunk's own shifted t), the adaptive
    weight per sample on the sample's λ-weighted loss ``Σ_k frac_k·λ_k·ℓ_k`` (μ_λ over r = t samples) as in the
    bidirectional objective, to which this reduces exactly when all chunks share (t, r) (tested).
    ``parts['per_chunk']`` (B, K): each chunk's MSE (detached)."""
    b = x0.shape[0]
    u_ng = u_nograd or u
    k = 1 if chunks is None else len(chunks)
    if chunks is not None and (sum(chunks) != x0.shape[2] or min(chunks) < 1):
        raise ValueError(f"student.chunk_partition: {tuple(chunks)} must be positive and sum to the {x0.shape[2]} "
                         "latent frames")
    if chunks is not None and v_teacher is not None:
        raise ValueError("stage1.velocity_target: 'teacher' is not supported for a chunked (FAR) student — the "
                         "bidirectional teacher has no per-chunk times; use 'data'")
    if clean is not None and clean.shape[0] != b:
        raise ValueError(f"stage1_terms: clean has {clean.shape[0]} rows, x0 has {b}")
    ctx = (lambda i: ()) if clean is None else (lambda i: (clean if i is None else clean[i],))
    ua, ub, udrop, eps = draw(x0, generator, sample_seeds, k)
    times = sample_times(b, shift, s1.time_split, None, paradigm, global_offset, global_batch, uniforms=(ua, ub))
    t, r = times.t.to(x0.dtype), times.r.to(x0.dtype)
    tb = _b(t, x0) if chunks is None else _frames(t, chunks, x0)  # broadcast over x0
    rb = _b(r, x0) if chunks is None else _frames(r, chunks, x0)
    z = (1.0 - tb) * x0 + tb * eps
    drop = udrop < s1.text_dropout
    neg = negative.to(text.dtype).expand(b, -1, -1)
    text = torch.where(_b(drop, text).bool(), neg, text)
    if v_teacher is None:
        v = eps - x0
    else:
        with torch.no_grad():
            v = v_teacher(z, t, text).detach()
    from anyflow.objectives.dmd import guidance_at

    w_t = guidance_at(times.t, float(s1.guidance_scale), guidance_min_t)  # (B,) or (B, K): the scale at each t
    w = torch.where(drop if w_t.ndim == 1 else drop[:, None], torch.ones_like(w_t), w_t).to(x0.dtype)
    wb = _b(w, x0) if chunks is None else _frames(w, chunks, x0)  # broadcast over x0
    guided = w != 1 if w.ndim == 1 else (w != 1).any(1)  # rows with at least one guided chunk
    moving = times.kind != KIND_DIFFUSION  # only r ≠ t samples need dF/dt
    mode = getattr(s1, "guidance_target", "reference")
    if mode not in ("reference", "meanflow"):
        raise ValueError(f"stage1.guidance_target: unknown {mode!r} (reference | meanflow)")

    if mode == "meanflow":
        # MeanFlow's CFG recipe in fused form: the guided tangent v_w = w·v + (1 − w)·v_∅ for dF/dt, and the target
        # v + ((1 − w)/w)·(v_∅ − u_∅) − (t − r)·(D_{v_w} u_c)/w, whose zero is the exact CFG-guided mean velocity U_w
        # on r ≠ t rows too (v_∅ = u_∅(z, t, t) the student's own instantaneous unconditional velocity, no grad;
        # on r = t rows v_∅ = u_∅ and this is the reference target v)
        u_unc, v_unc = torch.zeros_like(z), torch.zeros_like(z)
        if bool(guided.any()):
            with torch.no_grad():
                gi = guided.nonzero().squeeze(1)
                # .to(dtype): under bf16 autocast (stage1.mixed_precision) the network returns bf16, the buffers
                # are fp32, and index_put refuses to mix them
                u_unc[gi] = u_ng(z[gi], t[gi], r[gi], neg[gi], *ctx(gi)).to(u_unc.dtype)
                v_unc[gi] = u_unc[gi]
                gm = (guided & moving).nonzero().squeeze(1)
                if gm.numel():
                    v_unc[gm] = u_ng(z[gm], t[gm], t[gm], neg[gm], *ctx(gm)).to(v_unc.dtype)
        v_w = wb * v + (1.0 - wb) * v_unc
        target = v + (1.0 - wb) / wb * (v_unc - u_unc)
    else:
        v_w, target = v, v.clone()
    if bool(moving.any()):
        idx = moving.nonzero().squeeze(1)
        zm, tm, rm, cm = z[idx], t[idx], r[idx], text[idx]
        dfdt = total_derivative(lambda zz, tt: u_ng(zz, tt, rm, cm, *ctx(idx)), zm, tm, v_w[idx], s1.derivative,
                                s1.fd_eps)
        target[idx] = meanflow_target(dfdt / wb[idx], target[idx], tb[idx] if chunks else tm,
                                      rb[idx] if chunks else rm).to(target.dtype)

    pred_c = u(z, t, r, text, *ctx(None))
    if bool(guided.any()):
        if mode == "reference":  # the reference fuses the mean u_∅(t, r) and takes dF/dt along v
            with torch.no_grad():
                u_unc = torch.zeros_like(pred_c)
                gi = guided.nonzero().squeeze(1)
                u_unc[gi] = u_ng(z[gi], t[gi], r[gi], neg[gi], *ctx(gi)).to(u_unc.dtype)
        pred = fuse_guidance(pred_c, u_unc, wb)
    else:
        pred = pred_c
    parts = {}
    if chunks is None:
        per_sample = (pred - target.detach()).pow(2).flatten(1).mean(1)
        # reference trainer_wan_anyflow_pretrain.py:310-320: λ at the shifted t, then the adaptive weight on the
        # λ-weighted loss: loss_i ← loss_i·sg(mean_{r=t} loss / (loss_i + 1e-5)) for r ≠ t
        weighted = time_weight(_weight_time(times, s1), s1.weighting).to(x0.dtype) * per_sample
        loss = (adaptive_weights(_adaptive_on(weighted, per_sample, s1), times.kind, s1.adaptive_c) * weighted).mean()
    else:
        per_frame = (pred - target.detach()).pow(2).transpose(1, 2).flatten(2).mean(2)  # (B, F)
        per_chunk = torch.stack([c.mean(1) for c in per_frame.split(list(chunks), dim=1)], 1)  # (B, K)
        frac = torch.tensor([c / x0.shape[2] for c in chunks], dtype=x0.dtype)
        per_sample = (per_chunk * frac).sum(1)
        lam = time_weight(_weight_time(times, s1), s1.weighting).to(x0.dtype)  # (B, K), at each chunk's shifted t
        weighted = (lam * per_chunk * frac).sum(1)  # the sample's λ-weighted loss (the bidirectional one if all
        adapt = adaptive_weights(_adaptive_on(weighted, per_sample, s1), times.kind, s1.adaptive_c)  # chunks share
        loss = (adapt * weighted).mean()  # (t, r))
        parts["per_chunk"] = per_chunk.detach()
    parts = {"loss": float(loss.detach()), **parts}
    for kd, name in ((KIND_DIFFUSION, "mse_r_eq_t"), (KIND_CONSISTENCY, "mse_r_eq_0"), (KIND_FREE, "mse_free")):
        sel = times.kind == kd
        if bool(sel.any()):
            parts[name] = float(per_sample[sel].detach().mean())
    return Stage1Out(loss, parts)


def _weight_time(times: Times, s1) -> torch.Tensor:
    """Where λ is evaluated: the shifted t (``stage1.weight_time: shifted``, the reference) or the unshifted draw
    (``unshifted``: this project's code before issue [I], kept for the README's ablation)."""
    return times.t if getattr(s1, "weight_time", "shifted") == "shifted" else times.s


def _adaptive_on(weighted: torch.Tensor, per_sample: torch.Tensor, s1) -> torch.Tensor:
    """What the adaptive weight normalises: the λ-weighted loss (``stage1.adaptive_on: weighted``, the reference)
    or the bare MSE (``unweighted``: the earlier code, for the ablation)."""
    return weighted if getattr(s1, "adaptive_on", "weighted") == "weighted" else per_sample


def model_text_velocity(model) -> TextVelocityFn:
    from anyflow.models.student import student_velocity

    return lambda z, t, r, text: student_velocity(model, z, t, r, text)


def stage1_loss(model, cfg, batch, negative: torch.Tensor, generator: torch.Generator, global_offset: int = 0,
                global_batch: Optional[int] = None) -> torch.Tensor:
    """The full stage-1 loss of ``model``'s active adapter on a :class:`~anyflow.data.shards.Batch` (a FAR student:
    per-chunk (t, r) with clean-context teacher forcing, :func:`anyflow.models.far.far_stage1_velocity`)."""
    from anyflow.models.far import far_stage1_velocity, is_far
    from anyflow.models.student import STUDENT, teacher_velocity

    if is_far(model):
        u, chunks = far_stage1_velocity(model)
        return stage1_terms(u, batch.latents, batch.prompt_embeds, negative, cfg.stage1, cfg.student.paradigm,
                            cfg.model.flow_shift, generator, global_offset, global_batch, chunks=chunks,
                            clean=batch.latents, guidance_min_t=cfg.model.guidance_min_t).loss
    v_teacher = teacher_velocity(model, STUDENT) if cfg.stage1.velocity_target == "teacher" else None
    return stage1_terms(model_text_velocity(model), batch.latents, batch.prompt_embeds, negative, cfg.stage1,
                        cfg.student.paradigm, cfg.model.flow_shift, generator, global_offset, global_batch,
                        v_teacher=v_teacher, guidance_min_t=cfg.model.guidance_min_t).loss
