"""The forward flow-map trainer (stage 1, and domain continued training) on 🤗 accelerate.

* One LoRA adapter (``student``) trains; the base stays frozen. AdamW + linear warm-up, grad-norm clipping, EMA of
  the adapter weights, bf16/fp16 autocast (``mixed_precision``; bf16 also on CPUs, fp16 on GPUs only), optional
  gradient checkpointing.
* Multi-process ready: under ``accelerate launch``/torchrun the model is wrapped in DDP (gloo on CPU, NCCL on GPU).
  Every rank draws the same *global* batch from ``data_fn(step_generator(seed, step))`` and keeps its slice; each
  sample's noise and times come from its own seed ``(seed, step, global index)`` and the (t, r) split is by global
  index, so N ranks with local batch B/N take exactly the step one process takes with batch B (tested at 2 ranks).
* Checkpoints every ``ckpt_every`` steps (atomic, main process); a restarted run resumes from the last one and —
  because all randomness is a function of (seed, step) — ends with exactly the adapter an uninterrupted run ends
  with (tested).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from anyflow.config import Config, Optim
from anyflow.models.far import far_stage1_velocity, is_far
from anyflow.models.student import STUDENT, adapter_parameters, set_trainable, student_velocity, teacher_velocity
from anyflow.objectives.flowmap import stage1_terms
from anyflow.train.common import (Ema, check_run_key, copy_params_, load_checkpoint, make_optimizer, run_key,
                                  save_checkpoint, step_generator)

log = logging.getLogger(__name__)

# the loss plot's columns: no timings (plots are DVC outputs, the same bytes on every run; seconds are in metrics)
LOSS_COLUMNS = ["step", "loss", "mse_r_eq_t", "mse_r_eq_0", "mse_free", "grad_norm", "lr"]


def slice_batch(batch, start: int, stop: int):
    """Rows ``start:stop`` of a :class:`~anyflow.data.shards.Batch`-like dataclass (tensors and lists)."""
    kw = {}
    for f in batch.__dataclass_fields__:
        value = getattr(batch, f)
        kw[f] = value[start:stop] if isinstance(value, (torch.Tensor, list, tuple)) else value
    return replace(batch, **kw)


def sample_seeds(seed: int, step: int, indices) -> list[int]:
    import numpy as np

    return [int(np.random.SeedSequence([seed, step, int(i), 7]).generate_state(1, dtype=np.uint64)[0] >> 1)
            for i in indices]


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


class FlowMapTrainer:
    """Train adapter ``adapter`` of ``model`` with the stage-1 loss (settings from ``cfg.stage1`` and
    ``cfg.student.paradigm``).

    ``data_fn(generator) -> Batch`` draws the *global* batch (``batch_size`` rows; identical on every rank for the
    same generator). ``optim`` gives lr/betas/warm-up/clip/EMA (``cfg.stage1.optim`` or ``cfg.domain.optim``).
    """

    def __init__(self, model, cfg: Config, data_fn: Callable, negative: torch.Tensor, optim: Optim,
                 ckpt_dir: Optional[Path], ckpt_every: int, seed: int, batch_size: Optional[int] = None,
                 adapter: str = STUDENT, log_every: int = 10, desc: str = "stage1", accelerator=None,
                 velocity_target: Optional[str] = None):
        from accelerate import Accelerator

        s1 = cfg.stage1
        if accelerator is None:
            # bf16 autocast runs on CPUs too (torch.autocast("cpu"), through accelerate): the wan profiles' bf16
            # path is exercised by `make wan-smoke` on a CPU; fp16 autocast is a GPU feature
            mp = s1.mixed_precision if torch.cuda.is_available() or s1.mixed_precision != "fp16" else "no"
            if mp != s1.mixed_precision:
                log.info("stage1.mixed_precision=%s ignored on CPU (fp32)", s1.mixed_precision)
            accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
        self.acc = accelerator
        self.cfg, self.data_fn, self.optim, self.seed, self.desc = cfg, data_fn, optim, seed, desc
        self.adapter, self.log_every, self.ckpt_every = adapter, log_every, ckpt_every
        self.velocity_target = velocity_target or s1.velocity_target
        if self.velocity_target not in ("data", "teacher"):
            raise ValueError(f"stage1.velocity_target: unknown {self.velocity_target!r} (data | teacher)")
        if self.velocity_target == "teacher" and is_far(model):
            raise ValueError("stage1.velocity_target: 'teacher' is not supported for student.architecture 'far' "
                             "(the bidirectional teacher has no per-chunk times); use 'data'")
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.global_batch = batch_size or s1.batch_size
        world = self.acc.num_processes
        if self.global_batch % world:
            raise ValueError(f"batch_size: {self.global_batch} is not divisible by the {world} processes")
        self.local_batch = self.global_batch // world
        model.set_adapter(adapter)
        set_trainable(model, adapter)
        if s1.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        log.info("%s: mixed precision %s on %s, gradient checkpointing %s", desc, self.acc.mixed_precision,
                 self.acc.device, "on" if s1.gradient_checkpointing else "off")
        self.params = adapter_parameters(model, adapter)
        self.run_key = (run_key(cfg, self.params, data_fn, optim, seed, self.global_batch, self.velocity_target,
                                adapter, desc) if self.ckpt_dir else None)
        self.opt, self.sched = make_optimizer(list(self.params.values()), optim)
        self.ema = Ema(self.params, optim.ema_decay, optim.ema_warmup_steps)
        self.model = self.acc.prepare(model) if world > 1 else model.to(self.acc.device)
        self.negative = negative.to(self.acc.device)
        self.state = TrainState()

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        cfg, acc = self.cfg, self.acc
        g = step_generator(self.seed, self.state.step)
        batch = self.data_fn(g)
        if batch.latents.shape[0] != self.global_batch:
            raise ValueError(f"data_fn: returned {batch.latents.shape[0]} rows, batch_size is {self.global_batch}")
        start = acc.process_index * self.local_batch
        local = slice_batch(batch, start, start + self.local_batch)
        x0 = local.latents.to(acc.device)
        text = local.prompt_embeds.to(acc.device)
        wrapped, bare = self.model, acc.unwrap_model(self.model)
        seeds = sample_seeds(self.seed, self.state.step, range(start, start + self.local_batch))
        with acc.autocast():
            if is_far(bare):  # causal student: per-chunk (t, r), clean-context teacher forcing
                u, chunks = far_stage1_velocity(wrapped, bare)
                out = stage1_terms(u, x0, text, self.negative, cfg.stage1, cfg.student.paradigm,
                                   cfg.model.flow_shift, None, start, self.global_batch, seeds,
                                   far_stage1_velocity(bare)[0], chunks=chunks, clean=x0,
                                   guidance_min_t=cfg.model.guidance_min_t)
            else:
                out = stage1_terms(lambda z, t, r, c: student_velocity(wrapped, z, t, r, c), x0, text,
                                   self.negative, cfg.stage1, cfg.student.paradigm, cfg.model.flow_shift, None,
                                   start, self.global_batch, seeds,
                                   lambda z, t, r, c: student_velocity(bare, z, t, r, c),
                                   teacher_velocity(bare, self.adapter) if self.velocity_target == "teacher"
                                   else None, guidance_min_t=cfg.model.guidance_min_t)
        self.opt.zero_grad(set_to_none=True)
        acc.backward(out.loss)
        parts = dict(out.parts)
        per_chunk = parts.pop("per_chunk", None)
        if per_chunk is not None:  # FAR: each chunk's MSE (local batch mean) as plain floats
            parts.update({f"mse_chunk{k}": float(per_chunk[:, k].mean()) for k in range(per_chunk.shape[1])})
        if self.optim.grad_clip > 0:
            parts["grad_norm"] = float(acc.clip_grad_norm_(list(self.params.values()), self.optim.grad_clip))
        parts["lr"] = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.ema.update(self.params)
        if acc.num_processes > 1:  # the logged loss is the global-batch loss
            parts["loss"] = float(acc.reduce(out.loss.detach(), reduction="mean"))
        return parts

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_path(self) -> Optional[Path]:
        return self.ckpt_dir / "last.pt" if self.ckpt_dir else None

    def state_dict(self) -> dict:
        return {"step": self.state.step, "history": self.state.history,
                "params": {n: p.detach().cpu().clone() for n, p in self.params.items()},
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "ema": self.ema.state_dict(),
                "seed": self.seed, "global_batch": self.global_batch, "run_key": self.run_key}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("seed", "global_batch"):
            if sd.get(key) != getattr(self, key):
                raise ValueError(f"{self.ckpt_path}: checkpoint was written with {key}={sd.get(key)} "
                                 f"(now {getattr(self, key)}); delete it or restore the setting")
        check_run_key(sd, self.run_key, self.ckpt_path)
        copy_params_(self.params, sd["params"], f"adapter {self.adapter!r}")
        self.opt.load_state_dict(sd["opt"])
        self.sched.load_state_dict(sd["sched"])
        self.ema.load_state_dict(sd["ema"])
        self.state = TrainState(step=sd["step"], history=list(sd["history"]))

    def save_checkpoint(self) -> None:
        if self.ckpt_path is not None and self.acc.is_main_process:
            save_checkpoint(self.ckpt_path, self.state_dict())
        self.acc.wait_for_everyone()

    def maybe_resume(self) -> bool:
        sd = load_checkpoint(self.ckpt_path) if self.ckpt_path is not None else None
        if sd is None:
            return False
        self.load_state_dict(sd)
        log.info("resumed %s from %s at step %d", self.desc, self.ckpt_path, self.state.step)
        return True

    def clear_checkpoint(self) -> None:
        if self.ckpt_path is not None and self.acc.is_main_process and self.ckpt_path.exists():
            self.ckpt_path.unlink()

    # ------------------------------------------------------------------ the loop
    def train(self, max_steps: int, progress: bool = True, stop_after: Optional[int] = None) -> list[dict]:
        """Run to ``max_steps`` (from a resumed step if any); ``stop_after`` simulates a crash after that many."""
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=self.state.step, desc=self.desc, dynamic_ncols=True,
                   disable=not progress or not self.acc.is_local_main_process)
        done = 0
        while self.state.step < max_steps:
            t0 = time.perf_counter()
            row = {"step": self.state.step + 1, **self.step()}
            row["seconds"] = time.perf_counter() - t0
            self.state.step += 1
            self.state.history.append(row)
            bar.update(1)
            if self.state.step % max(self.log_every, 1) == 0:
                bar.set_postfix(loss=f"{row['loss']:.4f}", r_eq_t=f"{row.get('mse_r_eq_t', math.nan):.4f}")
            if self.ckpt_every and self.state.step % self.ckpt_every == 0 and self.state.step < max_steps:
                self.save_checkpoint()
            done += 1
            if stop_after is not None and done >= stop_after:
                break
        bar.close()
        return self.state.history

    def ema_state(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().cpu().clone() for n, v in self.ema.shadow.items()}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}
