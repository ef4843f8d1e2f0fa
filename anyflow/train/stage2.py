"""Stage 2: on-policy flow-map distillation — flow-map backward simulation + DMD (DESIGN §3 "Stage 2").

One base :class:`~diffusers.AnyFlowTransformer3DModel` carries two peft LoRA adapters:

* ``student`` — the any-step flow map ``u_θ(z, t, r)``, initialised from the stage-1 EMA adapter, trained here;
* ``fake_score`` — tracks the student's output distribution (DMD's fake score), used at r = t;

and with adapters disabled it *is* the frozen teacher at r = t (``delta_embedder`` is a copy of
``time_embedder``, so ``(1 − g)·emb(t) + g·emb'(t) = emb(t)``). One model instead of three copies.

The student's side is a :class:`Rollout`: the module carrying adapter ``student`` and its backward simulation.
Bidirectional (:func:`bidirectional_rollout`, the default): the same base model, :func:`flowmap_backward_simulation`.
Causal AnyFlow-FAR (:func:`far_rollout`): its own ``AnyFlowFARTransformer3DModel`` with the ``student`` LoRA, rolled
out chunk by chunk (:func:`anyflow.models.far.far_backward_simulation`, one exit step k for every chunk); the
teacher (real score) and ``fake_score`` stay on the bidirectional model and score the whole generated video, as in
the paper. The losses and the trainer below are the same for both.

Generator and fake-score steps alternate 1:1 (``stage2.fake_steps_per_generator_step``):

* generator: N ~ choices, k ~ U[0, N); ``x̂ = f(f(f(ε, τ0, τk), τk, τk+1), τk+1, 0)`` with the student (grad through
  all three jumps); DMD loss (plain MSE) of x̂ re-noised at ``t' = clamp(shift(U))`` with real = teacher + CFG
  ``u + w·(c − u)`` (w = ``stage2.real_guidance_scale``, by default stage 1's fused w; negative = empty-prompt
  embedding), fake = ``fake_score``; plus ``stage2.stage1_weight`` × the full stage-1 loss on a batch of teacher
  latents. Only ``student`` is updated.
* fake score: a detached student rollout, flow matching at t from the same distribution the DMD step queries it at
  (:func:`~anyflow.objectives.dmd.dmd_time`). Only ``fake_score`` is updated.

Conventions (DESIGN §2): t ∈ [0, 1], t = 1 noise, ``z_t = (1 − t)·x0 + t·ε``, ``v = ε − x0``,
flow-map step ``z_r = z_t − (t − r)·u``; latents are in Wan layout (B, C, F, H, W) here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from anyflow.config import Config
from anyflow.objectives.dmd import (dmd_time, fake_score_loss, fake_score_time, generator_dmd_loss, guidance_at,
                                    guided_velocity)
from anyflow.objectives.simulation import VelocityFn, draw_rollout, flowmap_backward_simulation
from anyflow.train.common import Ema, check_run_key, load_checkpoint, make_optimizer, run_key, save_checkpoint
from anyflow.train.common import write_loss_csv as _write_csv

log = logging.getLogger(__name__)

STUDENT = "student"
FAKE = "fake_score"
TEACHER = None  # adapters disabled


# --------------------------------------------------------------------------------------------- adapters on one base
def adapter_params(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of one named adapter (``...lora_A.<adapter>.weight`` etc.)."""
    from anyflow.models.student import adapter_parameters

    return adapter_parameters(model, adapter)


def use_adapter(model: torch.nn.Module, adapter: Optional[str], trainable: Optional[str]) -> None:
    """Route the forward pass through ``adapter`` (None = adapters disabled = the frozen teacher) with only
    ``trainable``'s LoRA parameters requiring grad (the base weights never do): :func:`anyflow.models.student.route`."""
    from anyflow.models.student import route

    route(model, adapter, trainable)


def velocity(model, adapter: Optional[str], prompt_embeds: torch.Tensor, trainable: Optional[str]) -> VelocityFn:
    """``u(z, t, r)`` of one adapter (or the teacher) on a fixed text conditioning, Wan layout."""
    from anyflow.models.student import student_velocity

    def u(z_BCFHW: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        use_adapter(model, adapter, trainable)
        return student_velocity(model, z_BCFHW, t, r, prompt_embeds)

    return u


def score(model, adapter: Optional[str], prompt_embeds: torch.Tensor, trainable: Optional[str]):
    """``v(z, t) = u(z, t, t)``: an adapter's (or the teacher's) instantaneous velocity."""
    u = velocity(model, adapter, prompt_embeds, trainable)
    return lambda z, t: u(z, t, t)


def teacher_cfg_score(model, cond: torch.Tensor, uncond: torch.Tensor, scale: float, trainable: Optional[str],
                      guidance_min_t: float = 0.0):
    """Real score: frozen teacher with CFG ``v_u + w·(v_c − v_u)`` (one batched call over [cond; uncond]); under a
    guidance interval (``model.guidance_min_t``) each sample takes the scale in force at its own t
    (:func:`~anyflow.objectives.dmd.guidance_at`: w = 1, the conditional score, at t ≤ the boundary)."""
    u = velocity(model, TEACHER, torch.cat([cond, uncond]), trainable)

    def v(z, t):
        vc, vu = u(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t])).chunk(2)
        if guidance_min_t <= 0:
            return guided_velocity(vc, vu, scale)
        return guided_velocity(vc, vu, guidance_at(t, scale, guidance_min_t))

    return v


# --------------------------------------------------------------------------------------------- the student's rollout
Simulate = Callable[[torch.Tensor, torch.Tensor, int, int, Optional[str]], torch.Tensor]


@dataclass(frozen=True)
class Rollout:
    """The student: ``model`` carries adapter ``student``; ``simulate(noise, prompt_embeds, n, k, trainable)`` is
    its flow-map backward simulation x̂ (N = n, exit step k) with only ``trainable``'s LoRA requiring grad."""

    model: torch.nn.Module
    simulate: Simulate


def bidirectional_rollout(model, shift: float) -> Rollout:
    """:func:`flowmap_backward_simulation` of adapter ``student`` on the (bidirectional) base model."""

    def simulate(noise, prompt_embeds, n, k, trainable):
        return flowmap_backward_simulation(velocity(model, STUDENT, prompt_embeds, trainable), noise, n, k, shift)

    return Rollout(model, simulate)


def far_rollout(model, shift: float, grad_context: bool = False) -> Rollout:
    """AnyFlow-FAR: :func:`anyflow.models.far.far_backward_simulation` (chunk by chunk, each chunk's three jumps
    conditioned on the clean simulated earlier chunks, detached unless ``grad_context``) of adapter ``student``."""
    from anyflow.models.far import far_backward_simulation

    def simulate(noise, prompt_embeds, n, k, trainable):
        use_adapter(model, STUDENT, trainable)
        return far_backward_simulation(model, noise, prompt_embeds, n, k, shift, grad_context=grad_context)

    return Rollout(model, simulate)


# --------------------------------------------------------------------------------------------- the two steps
@dataclass
class StepOut:
    loss: float
    parts: dict[str, float] = field(default_factory=dict)


def generator_loss(model, cfg: Config, batch, negative: torch.Tensor, generator: torch.Generator,
                   stage1_loss_fn: Optional[Callable[[], torch.Tensor]] = None,
                   rollout: Optional[Rollout] = None) -> tuple[torch.Tensor, dict]:
    """DMD on a flow-map backward simulation + ``stage1_weight`` × stage-1 loss. Gradients reach only ``student``.
    ``model`` carries the scores (teacher = adapters disabled, ``fake_score``); ``rollout`` the student (default:
    adapter ``student`` of ``model``, :func:`bidirectional_rollout`)."""
    s2 = cfg.stage2
    rollout = rollout or bidirectional_rollout(model, cfg.model.flow_shift)
    x0 = batch.latents
    cond = batch.prompt_embeds
    b = x0.shape[0]
    n, k = draw_rollout(s2.num_steps_choices, generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_hat = rollout.simulate(noise, cond, n, k, STUDENT)
    t_prime = dmd_time(b, cfg.model.flow_shift, s2.renoise_min, s2.renoise_max, generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    real = teacher_cfg_score(model, cond, negative.expand(b, -1, -1), s2.real_guidance_scale, STUDENT,
                             cfg.model.guidance_min_t)
    fake = score(model, FAKE, cond, STUDENT)
    dmd = generator_dmd_loss(x_hat, real, fake, t_prime, eps)
    use_adapter(rollout.model, STUDENT, STUDENT)
    loss = s2.dmd_weight * dmd.loss
    parts = {"dmd": float(dmd.loss.detach()), "dmd_grad": dmd.grad_norm, "num_steps": n, "k": k}
    if stage1_loss_fn is not None and s2.stage1_weight > 0:
        s1 = stage1_loss_fn()
        loss = loss + s2.stage1_weight * s1
        parts["stage1"] = float(s1.detach())
    return loss, parts


def fake_loss(model, cfg: Config, batch, generator: torch.Generator,
              rollout: Optional[Rollout] = None) -> tuple[torch.Tensor, dict]:
    """Flow matching of ``fake_score`` (on ``model``) on a detached student rollout at t drawn by
    :func:`~anyflow.objectives.dmd.dmd_time` — the distribution :func:`generator_loss` queries it at."""
    s2 = cfg.stage2
    rollout = rollout or bidirectional_rollout(model, cfg.model.flow_shift)
    x0 = batch.latents
    cond = batch.prompt_embeds
    n, k = draw_rollout(s2.num_steps_choices, generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    with torch.no_grad():
        x_hat = rollout.simulate(noise, cond, n, k, FAKE)
    t = fake_score_time(x0.shape[0], cfg.model.flow_shift, s2.renoise_min, s2.renoise_max, generator, s2.fake_times)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    loss = fake_score_loss(score(model, FAKE, cond, FAKE), x_hat, eps, t)
    return loss, {"fake": float(loss.detach())}


@dataclass
class TrainState:
    step: int
    history: list[dict]


class Stage2Trainer:
    """Alternating generator / fake-score optimisation with checkpoints and exact resume.

    ``data_fn(generator) -> batch`` draws a training batch (``latents`` (B, C, F, H, W), ``prompt_embeds``,
    ``index``); ``stage1_fn(batch, generator) -> loss`` is the full stage-1 loss of the active student.
    ``model`` carries ``fake_score`` (and the teacher); ``rollout`` the student (default: adapter ``student`` of
    ``model``; :func:`far_rollout` for a FAR student on a model of its own).
    """

    def __init__(self, model, cfg: Config, data_fn, negative: torch.Tensor, stage1_fn=None,
                 ckpt_dir: Optional[Path] = None, rollout: Optional[Rollout] = None):
        self.model, self.cfg, self.data_fn, self.negative, self.stage1_fn = model, cfg, data_fn, negative, stage1_fn
        self.rollout = rollout or bidirectional_rollout(model, cfg.model.flow_shift)
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        s2 = cfg.stage2
        self.student = adapter_params(self.rollout.model, STUDENT)
        self.fake = adapter_params(model, FAKE)
        if not self.student or not self.fake:
            raise ValueError(f"model: needs LoRA adapters {STUDENT!r} and {FAKE!r} (found "
                             f"{len(self.student)} / {len(self.fake)} parameters)")
        self.opt, self.sched = make_optimizer(list(self.student.values()), s2.optim)
        self.fake_opt, self.fake_sched = make_optimizer(list(self.fake.values()), s2.fake_optim)
        self.ema = Ema(self.student, s2.optim.ema_decay, s2.optim.ema_warmup_steps)
        self.run_key = (run_key(cfg, {**{f"student.{n}": p for n, p in self.student.items()},
                                      **{f"fake.{n}": p for n, p in self.fake.items()}}, data_fn)
                        if self.ckpt_dir else None)
        self.generator = torch.Generator().manual_seed(s2.seed)
        self.state = TrainState(step=0, history=[])

    # one alternation
    def generator_step(self) -> dict:
        o = self.cfg.stage2.optim
        use_adapter(self.rollout.model, STUDENT, STUDENT)
        self.opt.zero_grad(set_to_none=True)
        batch = self.data_fn(self.generator)
        s1 = (lambda: self.stage1_fn(batch, self.generator)) if self.stage1_fn else None
        loss, parts = generator_loss(self.model, self.cfg, batch, self.negative, self.generator, s1, self.rollout)
        loss.backward()
        if o.grad_clip > 0:
            parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(list(self.student.values()), o.grad_clip))
        self.opt.step()
        self.sched.step()
        self.ema.update(self.student)
        parts["loss"] = float(loss.detach())
        return parts

    def fake_step(self) -> dict:
        o = self.cfg.stage2.fake_optim
        use_adapter(self.model, FAKE, FAKE)
        self.fake_opt.zero_grad(set_to_none=True)
        loss, parts = fake_loss(self.model, self.cfg, self.data_fn(self.generator), self.generator, self.rollout)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.fake.values()), o.grad_clip)
        self.fake_opt.step()
        self.fake_sched.step()
        return parts

    # checkpoints
    def state_dict(self) -> dict:
        return {
            "step": self.state.step,
            "history": self.state.history,
            "student": {n: p.detach().clone() for n, p in self.student.items()},
            "fake": {n: p.detach().clone() for n, p in self.fake.items()},
            "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "fake_opt": self.fake_opt.state_dict(), "fake_sched": self.fake_sched.state_dict(),
            "ema": self.ema.state_dict(),
            "generator": self.generator.get_state(),
            "run_key": self.run_key,
        }

    def load_state_dict(self, sd: dict) -> None:
        check_run_key(sd, self.run_key, self.ckpt_path)
        with torch.no_grad():
            for name, params in (("student", self.student), ("fake", self.fake)):
                missing = set(params) ^ set(sd[name])
                if missing:
                    raise ValueError(f"checkpoint: {name} adapter parameters differ ({sorted(missing)[:3]} ...)")
                for n, p in params.items():
                    p.copy_(sd[name][n])
        self.opt.load_state_dict(sd["opt"])
        self.sched.load_state_dict(sd["sched"])
        self.fake_opt.load_state_dict(sd["fake_opt"])
        self.fake_sched.load_state_dict(sd["fake_sched"])
        self.ema.load_state_dict(sd["ema"])
        self.generator.set_state(sd["generator"])
        self.state = TrainState(step=sd["step"], history=list(sd["history"]))

    @property
    def ckpt_path(self) -> Optional[Path]:
        return self.ckpt_dir / "last.pt" if self.ckpt_dir else None

    def save_checkpoint(self) -> None:
        if self.ckpt_path is None:
            return
        save_checkpoint(self.ckpt_path, self.state_dict())

    def maybe_resume(self) -> bool:
        sd = load_checkpoint(self.ckpt_path) if self.ckpt_path is not None else None
        if sd is None:
            return False
        self.load_state_dict(sd)
        log.info("resumed stage 2 from %s at step %d", self.ckpt_path, self.state.step)
        return True

    def train(self, max_steps: int, progress: bool = True, stop_after: Optional[int] = None) -> TrainState:
        """Run to ``max_steps`` (resuming from the checkpoint if present); ``stop_after`` simulates a crash."""
        from tqdm.auto import tqdm

        s2 = self.cfg.stage2
        bar = tqdm(total=max_steps, initial=self.state.step, desc="stage2", disable=not progress, dynamic_ncols=True)
        done = 0
        while self.state.step < max_steps:
            t0 = time.perf_counter()
            row = {"step": self.state.step + 1}
            row.update(self.generator_step())
            for _ in range(s2.fake_steps_per_generator_step):
                row.update(self.fake_step())
            row["seconds"] = time.perf_counter() - t0
            self.state.step += 1
            self.state.history.append(row)
            bar.update(1)
            if self.state.step % max(s2.log_every, 1) == 0:
                bar.set_postfix(dmd=f"{row['dmd']:.4f}", s1=f"{row.get('stage1', math.nan):.4f}",
                                fake=f"{row['fake']:.4f}")
            if s2.ckpt_every and self.state.step % s2.ckpt_every == 0 and self.state.step < max_steps:
                self.save_checkpoint()
            done += 1
            if stop_after is not None and done >= stop_after:
                break
        bar.close()
        return self.state

    def ema_state(self) -> dict[str, torch.Tensor]:
        return dict(self.ema.shadow)


def write_loss_csv(path: Path, history: list[dict]) -> None:
    """plots/stage2_loss.csv: one row per generator step (no timings: a DVC output, the same bytes on every run;
    seconds per step are in the stage's metrics)."""
    _write_csv(path, history, ["step", "loss", "dmd", "stage1", "fake", "dmd_grad", "grad_norm", "num_steps", "k"])
