"""Backward simulation: roll the student from noise to a clean sample *with gradients* (DESIGN §3 "Stage 2").

Conventions (DESIGN §2): t ∈ [0, 1], t = 1 is pure noise, ``z_t = (1 − t)·x0 + t·ε``, flow-map step
``z_r = z_t − (t − r)·u(z_t, t, r)``. The N-step sampling grid is the shifted uniform grid
``τ_i = shift(1 − i/N)``, i = 0..N (τ_0 = 1, τ_N = 0), ``shift(s) = k·s / (1 + (k − 1)·s)``.

Two simulators over a velocity callable ``u(z, t, r)`` (t, r of shape (B,)) — pure functions, no model code:

* :func:`flowmap_backward_simulation` (AnyFlow, paper §3.3 / Fig. 4): the N-step Euler trajectory is decomposed
  into three flow-map jumps ``τ_0 → τ_k``, ``τ_k → τ_{k+1}``, ``τ_{k+1} → 0`` with gradients through all three.
  Cost: exactly three forward (+ backward) passes whatever N and k — flat in N.
* :func:`consistency_backward_simulation` (rCM / Self-Forcing style): N sequential x0-predict / re-noise steps
  ``x̂0 = z − τ_i·u(z, τ_i, 0)``, ``z ← (1 − τ_{i+1})·x̂0 + τ_{i+1}·ε_i``, exiting at step k with gradients through
  the exit step only (truncated gradient, as those methods do). Cost: k + 1 forward passes, linear in N.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift(s) = k·s / (1 + (k − 1)·s)`` (Wan / SD3 resolution shift; k = 1 is the identity)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sampling_grid(num_steps: int, shift: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The shifted N-step grid ``τ_i = shift(1 − i/N)``, i = 0..N; τ_0 = 1 (noise), τ_N = 0 (data). Shape (N + 1,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1 (got {num_steps})")
    s = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return time_shift(s, shift).to(dtype)


def draw_rollout(num_steps_choices: Sequence[int], generator: torch.Generator) -> tuple[int, int]:
    """Draw the step budget N uniformly from ``num_steps_choices`` and the exit step k uniformly from [0, N)."""
    if not num_steps_choices:
        raise ValueError("stage2.num_steps_choices: must not be empty")
    i = int(torch.randint(len(num_steps_choices), (1,), generator=generator))
    n = int(num_steps_choices[i])
    k = int(torch.randint(n, (1,), generator=generator))
    return n, k


def _bcast(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)


def flowmap_jump(u: VelocityFn, z: torch.Tensor, t: float | torch.Tensor, r: float | torch.Tensor) -> torch.Tensor:
    """One flow-map step ``z_r = z_t − (t − r)·u(z_t, t, r)`` for the whole batch (scalar or (B,) times)."""
    b = z.shape[0]
    t_B = torch.as_tensor(t, dtype=torch.float32, device=z.device).expand(b).clone()
    r_B = torch.as_tensor(r, dtype=torch.float32, device=z.device).expand(b).clone()
    return z - _bcast(t_B - r_B, z) * u(z, t_B, r_B)


def flowmap_backward_simulation(u: VelocityFn, noise: torch.Tensor, num_steps: int, k: int,
                                shift: float) -> torch.Tensor:
    """Flow-map backward simulation: ``x̂0 = f(f(f(ε, τ_0, τ_k), τ_k, τ_{k+1}), τ_{k+1}, 0)``.

    With the exact flow map this equals the endpoint of the N-step trajectory on the shifted grid (the flow map
    composes), and it visits the student's own N-step state ``z_{τ_k}`` and step ``τ_k → τ_{k+1}``. Gradients flow
    through all three jumps; a zero-length jump (k = 0 or k + 1 = N) is still evaluated so the cost is always
    three passes.
    """
    if not 0 <= k < num_steps:
        raise ValueError(f"k: must be in [0, {num_steps}) (got {k})")
    tau = sampling_grid(num_steps, shift).tolist()
    z = flowmap_jump(u, noise, tau[0], tau[k])
    z = flowmap_jump(u, z, tau[k], tau[k + 1])
    return flowmap_jump(u, z, tau[k + 1], 0.0)


def consistency_backward_simulation(u: VelocityFn, noise: torch.Tensor, num_steps: int, k: int, shift: float,
                                    generator: torch.Generator, grad_all_steps: bool = False) -> torch.Tensor:
    """Consistency backward simulation: N-step x0-predict / re-noise sampling, exiting at step k.

    Step i: ``x̂0 = z − τ_i·u(z, τ_i, 0)``; if i = k return x̂0; else ``z ← (1 − τ_{i+1})·x̂0 + τ_{i+1}·ε_i`` with
    fresh ``ε_i`` from ``generator``. Only the exit step carries gradients unless ``grad_all_steps``.
    """
    if not 0 <= k < num_steps:
        raise ValueError(f"k: must be in [0, {num_steps}) (got {k})")
    tau = sampling_grid(num_steps, shift).tolist()
    z = noise
    for i in range(k + 1):
        with torch.set_grad_enabled(torch.is_grad_enabled() and (grad_all_steps or i == k)):
            x0 = flowmap_jump(u, z, tau[i], 0.0)
        if i == k:
            return x0
        eps = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
        z = (1.0 - tau[i + 1]) * x0 + tau[i + 1] * eps
    raise AssertionError("unreachable")


def euler_sample(u: VelocityFn, noise: torch.Tensor, num_steps: int, shift: float) -> torch.Tensor:
    """Plain N-step flow-map / Euler sampling on the shifted grid: ``z ← z − (τ_i − τ_{i+1})·u(z, τ_i, τ_{i+1})``.

    With ``u`` ignoring r (an instantaneous velocity) this is the Euler ODE solver.
    """
    tau = sampling_grid(num_steps, shift).tolist()
    z = noise
    for i in range(num_steps):
        z = flowmap_jump(u, z, tau[i], tau[i + 1])
    return z


def chunkwise_flowmap_backward_simulation(u_of: Callable[[int, torch.Tensor], VelocityFn], noise: torch.Tensor,
                                          chunks: Sequence[int], num_steps: int, k: int | Sequence[int],
                                          shift: float, grad_context: bool = False) -> torch.Tensor:
    """Causal (AnyFlow-FAR) flow-map backward simulation, chunk by chunk as generation runs: chunk j's sample is
    :func:`flowmap_backward_simulation` of ``u_of(j, prefix)`` — its velocity given the clean chunks < j already
    simulated (``prefix`` (B, C, F_<j, H, W); detached unless ``grad_context``, as Self-Forcing-style rollouts
    do) — from chunk j's slice of ``noise`` (B, C, F, H, W). ``k``: one exit step for all chunks or one per chunk.
    Chunk j never depends on the noise of later chunks. Cost: 3 passes per chunk."""
    if sum(chunks) != noise.shape[2] or min(chunks) < 1:
        raise ValueError(f"student.chunk_partition: {tuple(chunks)} must be positive and sum to the "
                         f"{noise.shape[2]} latent frames")
    ks = [k] * len(chunks) if isinstance(k, int) else list(k)
    if len(ks) != len(chunks):
        raise ValueError(f"k: one exit step per chunk ({len(chunks)}), got {len(ks)}")
    out, lo = [], 0
    for j, (n_j, k_j) in enumerate(zip(chunks, ks)):
        prefix = noise[:, :, :0] if not out else torch.cat(out, dim=2)
        u = u_of(j, prefix if grad_context else prefix.detach())
        out.append(flowmap_backward_simulation(u, noise[:, :, lo:lo + n_j], num_steps, k_j, shift))
        lo += n_j
    return torch.cat(out, dim=2)
