"""Self-distillation from the frozen base student for domain continued training ([G]).

The stage-1 flow-map objective alone re-learns the r ≠ t jumps from the MeanFlow target, which undoes what stage 2's
DMD gave the student at 1–2 NFE. Here the base student's adapter is loaded a second time into the same model as a
frozen peft adapter (:data:`FROZEN`) and rows of the batch chosen by ``domain.distill_rows`` regress the trained
adapter's ``u(z, t, r)`` onto ``sg(u_base(z, t, r))`` instead:

* ``base``: every base-domain row (``domain.base_mix``), at its (t, r) — the base domain keeps the base's flow map
  at every jump; domain rows keep the stage-1 objective (flow matching at r = t and the MeanFlow jumps);
* ``jumps``: additionally the domain rows whose (t, r) is a jump (r ≠ t by ``stage1.time_split``); the domain is
  then learnt through the instantaneous velocity (r = t, data target) only.

Row kinds follow ``stage1.time_split`` over the global batch index exactly as in stage 1; each row's (t, r, ε, text
dropout) comes from its own seed (:func:`anyflow.objectives.flowmap.draw`), so resumes are exact. The loss is
``(n_fm / B)·L_stage1(rows not distilled) + distill_weight·(n_d / B)·mean_i ‖u(z_i, t_i, r_i) − sg(u_base)‖²``; with
the student still equal to the base the distillation term and its gradient are exactly 0. Single process,
bidirectional student only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from anyflow.models.student import STUDENT, add_lora, load_adapter, set_trainable, student_velocity
from anyflow.objectives.flowmap import (KIND_CONSISTENCY, KIND_DIFFUSION, _b, draw, split_kinds, stage1_terms)
from anyflow.objectives.simulation import time_shift
from anyflow.train.common import step_generator
from anyflow.train.stage1 import FlowMapTrainer, sample_seeds, slice_batch

FROZEN = "frozen_base"  # not "base": peft's "base_layer" modules must not match the ".<name>." parameter tag
MODES = ("base", "jumps")


def add_frozen_base(model, scfg, path) -> None:
    """Load adapter file ``path`` as the frozen adapter :data:`FROZEN`; ``student`` stays active and the only
    trainable weights."""
    add_lora(model, scfg, FROZEN)
    load_adapter(model, path, FROZEN)
    use(model, STUDENT)


def use(model, adapter: str, trainable: str = STUDENT) -> None:
    model.set_adapter(adapter)
    set_trainable(model, trainable)  # peft's set_adapter makes the active adapter trainable: pin it back


def frozen_velocity(model) -> Callable:
    """``u_base(z, t, r, text)`` of the frozen adapter, without grad; ``student`` is active again afterwards."""

    def u(z, t, r, text):
        use(model, FROZEN)
        try:
            with torch.no_grad():
                return student_velocity(model, z, t, r, text)
        finally:
            use(model, STUDENT)

    return u


def row_times(ua: torch.Tensor, ub: torch.Tensor, kind: torch.Tensor, shift: float) -> tuple[torch.Tensor, ...]:
    """(t, r) as :func:`anyflow.objectives.flowmap.sample_times` gives them for rows of the given kinds."""
    s_t, s_r = torch.maximum(ua, ub), torch.minimum(ua, ub)
    s_r = torch.where(kind == KIND_DIFFUSION, s_t, torch.where(kind == KIND_CONSISTENCY, torch.zeros_like(s_r), s_r))
    return time_shift(s_t, shift), time_shift(s_r, shift)


def distill_terms(u: Callable, u_base: Callable, x0: torch.Tensor, text: torch.Tensor, negative: torch.Tensor,
                  kind: torch.Tensor, seeds, text_dropout: float, shift: float) -> torch.Tensor:
    """Per-row ``mean ‖u(z, t, r, c) − sg(u_base(z, t, r, c))‖²`` with z = (1 − t)·x0 + t·ε, (t, r, ε, dropout
    of c to ``negative``) drawn from each row's seed as stage 1 draws them."""
    ua, ub, udrop, eps = draw(x0, None, seeds)
    t, r = (x.to(x0.dtype) for x in row_times(ua, ub, kind, shift))
    z = (1.0 - _b(t, x0)) * x0 + _b(t, x0) * eps
    drop = udrop < text_dropout
    text = torch.where(_b(drop, text).bool(), negative.to(text.dtype).expand(x0.shape[0], -1, -1), text)
    target = u_base(z, t, r, text).detach()
    return (u(z, t, r, text) - target).pow(2).flatten(1).mean(1)


class SelfDistillTrainer(FlowMapTrainer):
    """:class:`FlowMapTrainer` whose step distils rows picked by ``mode`` from the frozen base adapter (already
    loaded as :data:`FROZEN`); ``is_base(batch) -> bool (B,)`` marks the base-domain rows of a batch."""

    def __init__(self, model, *args, is_base: Callable, mode: str = "base", weight: float = 1.0, **kw):
        super().__init__(model, *args, **kw)
        if mode not in MODES:
            raise ValueError(f"domain.distill_rows: unknown {mode!r} ({' | '.join(MODES)})")
        from anyflow.models.far import is_far

        if is_far(model):
            raise ValueError("domain.distill_weight > 0: self-distillation supports the bidirectional student only "
                             "(the causal FAR student needs per-chunk times)")
        if self.acc.num_processes > 1:
            raise ValueError("domain.distill_weight > 0: self-distillation runs in one process only")
        if self.velocity_target != "data":
            raise ValueError("self-distillation: velocity_target must be 'data'")
        self.is_base, self.mode, self.weight = is_base, mode, float(weight)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "distill": [self.mode, self.weight]}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("distill") != [self.mode, self.weight]:
            raise ValueError(f"{self.ckpt_path}: checkpoint was written with distillation {sd.get('distill')} (now "
                             f"{[self.mode, self.weight]}); delete it or restore domain.distill_*")
        super().load_state_dict(sd)

    def step(self) -> dict:
        cfg, s1 = self.cfg, self.cfg.stage1
        batch = self.data_fn(step_generator(self.seed, self.state.step))
        b = batch.latents.shape[0]
        if b != self.global_batch:
            raise ValueError(f"data_fn: returned {b} rows, batch_size is {self.global_batch}")
        local = slice_batch(batch, 0, b)
        x0, text = local.latents.to(self.acc.device), local.prompt_embeds.to(self.acc.device)
        seeds = sample_seeds(self.seed, self.state.step, range(b))
        kind = split_kinds(torch.arange(b), b, s1.time_split)
        distil = torch.as_tensor(self.is_base(local), dtype=torch.bool)
        if self.mode == "jumps":
            distil = distil | (kind != KIND_DIFFUSION)
        u = lambda z, t, r, c: student_velocity(self.model, z, t, r, c)  # noqa: E731
        parts, loss = {}, x0.new_zeros(())
        fm = (~distil).nonzero().squeeze(1)
        if len(fm):
            s1_rows = s1 if self.mode == "base" else dataclasses.replace(s1, time_split=(1.0, 0.0, 0.0))
            out = stage1_terms(u, x0[fm], text[fm], self.negative, s1_rows, cfg.student.paradigm,
                               cfg.model.flow_shift, None, 0, len(fm), [seeds[int(i)] for i in fm],
                               guidance_min_t=cfg.model.guidance_min_t)
            loss = loss + len(fm) / b * out.loss
            parts.update({k: v for k, v in out.parts.items() if k != "loss"})
        di = distil.nonzero().squeeze(1)
        if len(di):
            per_row = distill_terms(u, frozen_velocity(self.model), x0[di], text[di], self.negative, kind[di],
                                    [seeds[int(i)] for i in di], s1.text_dropout, cfg.model.flow_shift)
            loss = loss + self.weight * len(di) / b * per_row.mean()
            parts["distill"] = float(per_row.detach().mean())
        parts["loss"] = float(loss.detach())
        self.opt.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        if self.optim.grad_clip > 0:
            parts["grad_norm"] = float(self.acc.clip_grad_norm_(list(self.params.values()), self.optim.grad_clip))
        parts["lr"] = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.ema.update(self.params)
        return parts

