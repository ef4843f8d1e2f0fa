"""Any-step sampling of a student (DESIGN §2–3), on diffusers' ``FlowMapEulerDiscreteScheduler``.

* :func:`flowmap_sample` — the AnyFlow sampler: N steps on the shifted grid ``τ_i = shift(1 − i/N)``, each one
  flow-map jump ``z ← z − (τ_i − τ_{i+1})·u(z, τ_i, τ_{i+1})``; one transformer call per step because guidance
  is fused into the student (stage 1). The grid and the update are the scheduler's own (``set_timesteps`` /
  ``step``), exactly as ``AnyFlowPipeline`` drives them, so a release sampled through the pipeline and a student
  sampled here agree (tested).
* :func:`consistency_sample` — the consistency baseline (``paradigm: consistency``, rCM / Self-Forcing style):
  predict x0 with ``u(z, τ_i, 0)``, re-noise to τ_{i+1} with fresh noise. Its quality does not keep rising with N,
  which is the comparison the paper's Fig. 1 makes.
* :func:`sample` — dispatch on ``student.paradigm``; :func:`sample_student` — a student model's N-step samples
  (a causal FAR student chunk by chunk with the KV cache, N steps per chunk: :func:`anyflow.models.far.far_generate`).

Velocity callables take (z (B, C, F, H, W), t (B,), r (B,)) in [0, 1]; :func:`model_velocity` builds one from a
student model and text embeddings.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def scheduler(shift: float):
    from diffusers import FlowMapEulerDiscreteScheduler

    return FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def schedule(num_steps: int, shift: float) -> torch.Tensor:
    """The N-step grid τ_0 = 1 > … > τ_N = 0 (N + 1 values), from the scheduler."""
    if num_steps < 1:
        raise ValueError(f"steps: must be >= 1 (got {num_steps})")
    s = scheduler(shift)
    s.set_timesteps(num_steps)
    return s.sigmas.to(torch.float64).clone()


def model_velocity(model, prompt_embeds: torch.Tensor) -> VelocityFn:
    from anyflow.models.student import student_velocity

    return lambda z, t, r: student_velocity(model, z, t, r, prompt_embeds)


def _progress(it, progress: bool, desc: str):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


@torch.no_grad()
def flowmap_sample(u: VelocityFn, noise: torch.Tensor, num_steps: int, shift: float,
                   progress: bool = False) -> torch.Tensor:
    """N-step flow-map sampling from ``noise`` (t = 1) to t = 0, one ``u`` call per step."""
    s = scheduler(shift)
    s.set_timesteps(num_steps)
    z = noise
    b = z.shape[0]
    for i, t in enumerate(_progress(s.timesteps, progress, f"sample N={num_steps}")):
        t_B = (s.sigmas[i] * torch.ones(b)).to(torch.float32)
        r_B = (s.sigmas[i + 1] * torch.ones(b)).to(torch.float32)
        v = u(z, t_B, r_B)
        z = s.step(v, t, z, return_dict=False)[0].to(noise.dtype)
    return z


@torch.no_grad()
def consistency_sample(u: VelocityFn, noise: torch.Tensor, num_steps: int, shift: float,
                       generator: Optional[torch.Generator] = None, progress: bool = False) -> torch.Tensor:
    """x0-predict-and-re-noise: ``x̂0 = z − τ_i·u(z, τ_i, 0)``, ``z ← (1 − τ_{i+1})·x̂0 + τ_{i+1}·ε_i``."""
    tau = schedule(num_steps, shift).tolist()
    z = noise
    b = z.shape[0]
    x0 = z
    for i in _progress(range(num_steps), progress, f"consistency N={num_steps}"):
        t_B = torch.full((b,), tau[i], dtype=torch.float32)
        x0 = z - tau[i] * u(z, t_B, torch.zeros(b))
        if i + 1 < num_steps:
            eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
            z = (1.0 - tau[i + 1]) * x0 + tau[i + 1] * eps
    return x0


def sample(paradigm: str, u: VelocityFn, noise: torch.Tensor, num_steps: int, shift: float,
           generator: Optional[torch.Generator] = None, progress: bool = False) -> torch.Tensor:
    if paradigm == "flowmap":
        return flowmap_sample(u, noise, num_steps, shift, progress)
    if paradigm == "consistency":
        return consistency_sample(u, noise, num_steps, shift, generator, progress)
    raise ValueError(f"student.paradigm: unknown {paradigm!r} (flowmap | consistency)")


def sample_student(model, paradigm: str, noise: torch.Tensor, prompt_embeds: torch.Tensor, num_steps: int,
                   shift: float, generator: Optional[torch.Generator] = None,
                   chunk_partition=None) -> torch.Tensor:
    """N-step samples of a student from ``noise``: bidirectional through :func:`sample`, a FAR student chunk by chunk
    with the KV cache (:func:`anyflow.models.far.far_generate`, N steps per chunk; ``chunk_partition`` overrides
    the model's, e.g. for videos longer than training)."""
    from anyflow.models.far import far_generate, is_far

    if is_far(model):
        return far_generate(model, noise, prompt_embeds, num_steps, shift, chunk_partition=chunk_partition,
                            paradigm=paradigm, generator=generator)
    return sample(paradigm, model_velocity(model, prompt_embeds), noise, num_steps, shift, generator)
