"""``anyflow stage1``: forward flow-map training of the any-step student (DESIGN §3 "Stage 1"), DVC stage ``stage1``.

Reads ``artifacts/teacher`` and ``artifacts/data`` (teacher latent shards); writes
``artifacts/stage1/{adapter,ema_adapter}.safetensors`` (peft LoRA state dicts of adapter ``student``),
``metrics/stage1.json`` and ``plots/stage1_loss.csv``. Checkpoints go to ``checkpoints/stage1/last.pt`` (outside
the DVC outs) so a killed run resumes exactly where it stopped; ``--fresh`` ignores it.

Scale-out: ``accelerate launch --num_processes N [--cpu] -m anyflow.cli stage1`` (or torchrun) runs DDP with the
global batch ``stage1.batch_size`` split across ranks; only rank 0 writes outputs.

Evaluation (``metrics/stage1.json: eval``): the student before training (LoRA at zero = the teacher's
instantaneous field used as a flow map, i.e. the teacher's N-step Euler solver without CFG) and the EMA student,
sampled at N ∈ {1, 2, 4, 8, 16} from the shards' own noises and prompts, against the teacher's 50-step samples of
the same noises at the guidance fused into the student (``stage1.guidance_scale``; the shard latents themselves when
they were synthesised at that scale) (``anyflow.eval.latent_stats``: ``paired_mse``, ``latent_fd``, ``channel_fd``; lower is better).

``--set student.architecture=far`` trains the causal student (AnyFlow-FAR: per-chunk (t, r), clean-context
teacher forcing, :func:`anyflow.models.far.far_stage1_velocity`) into ``artifacts/far_stage1`` (metrics
``far_stage1.json``, plot ``far_stage1_loss.csv``, checkpoints ``checkpoints/far_stage1``); its evaluation samples
chunk by chunk with the KV cache, N steps per chunk (:func:`anyflow.sampling.sample_student`).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from anyflow.config import Config
from anyflow.stages.common import StagePaths, eval_reference, teacher_transformer
from anyflow.utils.io import write_json

log = logging.getLogger(__name__)

EVAL_STEPS = (1, 2, 4, 8, 16)
EVAL_REFERENCE = "eval_reference.safetensors"  # the teacher's samples the evaluation compares with


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-steps", type=int, default=None, help="override stage1.max_steps")
    p.add_argument("--eval-samples", type=int, default=64, help="samples per student and N for the evaluation")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--paradigm", choices=("flowmap", "consistency"), default=None,
                   help="override student.paradigm; 'consistency' trains the baseline into artifacts/"
                        "stage1_consistency (metrics/stage1_consistency.json) for the gate's comparison")
    p.add_argument("--no-progress", action="store_true")


@dataclass(frozen=True)
class Stage1Outputs:
    adapter: Optional[Path]
    ema_adapter: Optional[Path]
    metrics: Optional[Path]
    steps: int


def teacher_identity_error(model, teacher, data, n: int = 2) -> float:
    """max |student(z, t, r = t) − teacher(z, t)| on shard latents — 0 up to rounding at LoRA init. A FAR student
    equals the teacher only where it sees nothing else: its first chunk, alone."""
    import torch

    from anyflow.models.far import far_velocity, is_far
    from anyflow.models.student import student_velocity

    z, text = data.noise[:n], data.prompt_embeds[:n]
    t = torch.linspace(0.9, 0.2, z.shape[0])
    with torch.no_grad():
        if is_far(model):
            z = z[:, :, :model.config.chunk_partition[0]]
            ref = teacher(z, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
            return float((far_velocity(model, z, t, t, text, [z.shape[2]]) - ref).abs().max())
        ref = teacher(z, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
        return float((student_velocity(model, z, t, t, text) - ref).abs().max())


def evaluate(model, cfg: Config, states: dict, data, num_samples: int, steps=EVAL_STEPS, batch: int = 16,
             reference=None) -> dict:
    """Sample adapter ``student`` set to each state at every N; distances to the teacher's samples of the same
    noises (``reference``, default the shard latents)."""
    import torch

    from anyflow.eval.latent_stats import distribution_metrics
    from anyflow.models.student import adapter_parameters
    from anyflow.sampling import sample_student

    params = adapter_parameters(model)
    m = min(num_samples, data.latents.shape[0])
    ref = data.latents[:m] if reference is None else reference[:m]
    saved = {n: p.detach().clone() for n, p in params.items()}
    out: dict = {}
    with torch.no_grad():
        for name, state in states.items():
            for n, p in params.items():
                p.copy_(state[n])
            out[name] = {}
            for num in steps:
                xs = []
                for i in range(0, m, batch):
                    g = torch.Generator().manual_seed(cfg.stage1.seed + i)
                    xs.append(sample_student(model, cfg.student.paradigm, data.noise[i:min(m, i + batch)],
                                             data.prompt_embeds[i:min(m, i + batch)], num, cfg.model.flow_shift, g))
                out[name][f"N{num}"] = distribution_metrics(torch.cat(xs), ref, ref)
        for n, p in params.items():
            p.copy_(saved[n])
    return out


def output_name(paradigm: str, architecture: str = "bidirectional") -> str:
    """``stage1`` for the any-step student, ``stage1_consistency`` for the consistency baseline; a causal student
    (``student.architecture: far``) gets the prefix ``far_`` (``far_stage1``: artifacts, metrics, plots and
    checkpoints of its own beside the bidirectional ones, reading the same teacher and data)."""
    name = "stage1" if paradigm == "flowmap" else f"stage1_{paradigm}"
    return name if architecture == "bidirectional" else f"{architecture}_{name}"


def run(cfg: Config, max_steps: Optional[int] = None, eval_samples: int = 64, fresh: bool = False,
        progress: bool = True, stop_after: Optional[int] = None) -> Stage1Outputs:
    """Train (resuming from the checkpoint unless ``fresh``), save adapters, evaluate. ``stop_after`` stops after
    that many steps without writing outputs, as a crash would (for tests). Outputs are named by
    :func:`output_name` of ``cfg.student.paradigm``."""
    import torch

    from anyflow.data.shards import Batch, ShardSet
    from anyflow.models.student import (STUDENT, add_lora, adapter_parameters, save_adapter, state_to_peft_keys,
                                        student_from_teacher)
    from anyflow.train.common import write_loss_csv
    from anyflow.train.stage1 import LOSS_COLUMNS, FlowMapTrainer

    s1 = cfg.stage1
    paths = StagePaths.of(cfg)
    t_start = time.perf_counter()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # the toy model is too small for intra-op threads to pay (measured: 1 thread is
        #                           faster and steadier than 2 on the 2-core CI machine); scale out with ranks
    teacher = teacher_transformer(cfg, paths)
    model = student_from_teacher(teacher, cfg.student)
    with torch.random.fork_rng(devices=[]):  # peft draws LoRA A from the global RNG: seed it, or two runs differ
        torch.manual_seed(s1.seed)
        add_lora(model, cfg.student, STUDENT)
    shards = ShardSet(paths.shards)
    data = shards.load_all()
    negative = shards.negative_embeds()
    teacher_err = teacher_identity_error(model, teacher, data)
    if cfg.student.delta_init == "copy" and teacher_err > 1e-4:
        raise RuntimeError(f"student at r = t differs from the teacher by {teacher_err:.2e} before training")
    init_state = {n: p.detach().clone() for n, p in adapter_parameters(model, STUDENT).items()}

    def data_fn(generator: torch.Generator):
        idx = torch.randint(data.latents.shape[0], (s1.batch_size,), generator=generator)
        return Batch(latents=data.latents[idx], noise=data.noise[idx], prompt_embeds=data.prompt_embeds[idx],
                     prompts=[data.prompts[int(i)] for i in idx], index=idx)

    name = output_name(cfg.student.paradigm, cfg.student.architecture)
    ckpt_dir = paths.ckpt(name)
    if fresh and (ckpt_dir / "last.pt").exists():
        (ckpt_dir / "last.pt").unlink()
    trainer = FlowMapTrainer(model, cfg, data_fn, negative, s1.optim, ckpt_dir, s1.ckpt_every, s1.seed,
                             log_every=s1.log_every, desc=name)
    resumed = trainer.maybe_resume()
    steps = max_steps if max_steps is not None else s1.max_steps
    t_train = time.perf_counter()
    trainer.train(steps, progress=progress, stop_after=stop_after)
    train_seconds = time.perf_counter() - t_train
    if trainer.state.step < steps:  # interrupted on purpose: keep the checkpoint, write nothing
        trainer.save_checkpoint()
        return Stage1Outputs(None, None, None, trainer.state.step)
    if not trainer.acc.is_main_process:
        return Stage1Outputs(None, None, None, trainer.state.step)

    out_dir = paths.root / name
    adapter_path, ema_path = out_dir / "adapter.safetensors", out_dir / "ema_adapter.safetensors"
    meta = {"steps": trainer.state.step, "paradigm": cfg.student.paradigm, "lora_rank": cfg.student.lora_rank,
            "architecture": cfg.student.architecture}
    if cfg.student.architecture == "far":
        meta["chunk_partition"] = ",".join(str(c) for c in cfg.student.chunk_partition)
        meta["full_chunk_limit"] = cfg.student.full_chunk_limit
    ema = trainer.ema_state()
    save_adapter(model, adapter_path, STUDENT, metadata=meta)
    save_adapter(model, ema_path, STUDENT, state=state_to_peft_keys(model, ema), metadata=meta)

    t_eval = time.perf_counter()
    evaluation = {}
    if eval_samples:
        m = min(eval_samples, data.latents.shape[0])
        reference = eval_reference(cfg, teacher, data, negative, m, s1.guidance_scale,
                                   store=out_dir / EVAL_REFERENCE, write=True)  # stage 2 reads it
        evaluation = evaluate(model, cfg, {"init": init_state, "ema": ema}, data, m, reference=reference)
    eval_seconds = time.perf_counter() - t_eval
    hist = trainer.state.history
    tail = hist[-max(1, len(hist) // 10):]
    chunk_cols = sorted({k for row in hist for k in row if k.startswith("mse_chunk")})
    write_loss_csv(paths.plots / f"{name}_loss.csv", hist, LOSS_COLUMNS + chunk_cols)
    metrics = {
        "steps": trainer.state.step,
        "resumed": resumed,
        "paradigm": cfg.student.paradigm,
        "derivative": s1.derivative,
        "architecture": cfg.student.architecture,
        "final": {k: sum(r.get(k, 0.0) for r in tail) / len(tail) for k in ("loss", "mse_r_eq_t", "mse_r_eq_0",
                                                                            "mse_free", *chunk_cols)},
        "seconds": {"train": train_seconds, "eval": eval_seconds, "total": time.perf_counter() - t_start,
                    "per_step": train_seconds / max(1, len(hist))},
        "teacher_identity_max_abs_error": teacher_err,
        "eval": evaluation,
        "eval_metrics_note": "init = LoRA at zero (teacher field without CFG as a flow map); ema = trained EMA "
                             "student. Reference: the teacher's 50-step samples of the same noises at CFG "
                             f"{s1.guidance_scale:g} (the fused guidance). paired_mse vs the sample of the same "
                             "noise; latent_fd / channel_fd: Fréchet distances of latent statistics over the "
                             "evaluated set. Lower is better." + (" FAR: N steps per chunk, chunk by chunk with "
                                                                  "the KV cache (far_generate)."
                                                                  if cfg.student.architecture == "far" else ""),
    }
    metrics_path = write_json(paths.metric(name), metrics)
    trainer.clear_checkpoint()  # finished: a later run starts from the outputs, not a stale checkpoint
    return Stage1Outputs(adapter_path, ema_path, metrics_path, trainer.state.step)


def main(cfg: Config, args) -> int:
    if args.paradigm:
        from dataclasses import replace

        cfg = replace(cfg, student=replace(cfg.student, paradigm=args.paradigm))
    out = run(cfg, max_steps=args.max_steps, eval_samples=args.eval_samples, fresh=args.fresh,
              progress=not args.no_progress)
    if out.metrics is None:
        return 0
    from anyflow.utils.io import read_json

    ev = read_json(out.metrics)["eval"]
    if ev:
        print("N    init:paired_mse  ema:paired_mse  init:latent_fd  ema:latent_fd")
        for n in EVAL_STEPS:
            a, b = ev["init"][f"N{n}"], ev["ema"][f"N{n}"]
            print(f"{n:<4} {a['paired_mse']:<16.5f} {b['paired_mse']:<15.5f} {a['latent_fd']:<15.5f} "
                  f"{b['latent_fd']:.5f}")
    return 0
