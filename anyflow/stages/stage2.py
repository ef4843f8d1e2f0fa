"""``anyflow stage2``: on-policy flow-map distillation (DESIGN §3 "Stage 2"), the DVC stage ``stage2``.

Reads ``artifacts/teacher`` (the Wan teacher), ``artifacts/data`` (teacher latent shards) and
``artifacts/stage1/ema_adapter.safetensors``; writes ``artifacts/stage2/{adapter,ema_adapter}.safetensors``,
``metrics/stage2.json`` and ``plots/stage2_loss.csv``. Checkpoints go to ``checkpoints/stage2/last.pt`` (outside
the DVC outs) so a killed run resumes exactly where it stopped.

Evaluation (``metrics/stage2.json: eval``): stage-1 vs stage-2 EMA students sampled at N ∈ {1, 2, 4, 8, 16} from
the shards' own noises and prompts, compared with the teacher's ODE samples of the same noises at the guidance the
student is meant to reproduce — ``stage1.guidance_scale``, the w it fuses (``u + w·(c − u)``; by default also the
real score's ``stage2.real_guidance_scale`` and the gate's ``gate.teacher_guidance_scale``), named in the metrics as
``reference_guidance_scale`` — by

* ``latent_fd`` — Fréchet distance between Gaussian fits of per-sample latent statistics (per-channel mean, std
  and mean |frame difference|; 3·C features) of the student samples and of all teacher shard latents;
* ``channel_fd`` — Fréchet distance of the per-position channel vectors (C-dimensional, pooled over F, H, W);
* ``paired_mse`` — mean squared error to the teacher sample from the same noise (trajectory fidelity).

``--set student.architecture=far`` distils the causal student (AnyFlow-FAR) with the same trainer and losses
(:func:`anyflow.train.stage2.far_rollout`): the FAR student (its own ``AnyFlowFARTransformer3DModel``, adapter
``student`` ← ``artifacts/far_stage1/ema_adapter.safetensors``) is rolled out chunk by chunk; the teacher (real
score, CFG) and ``fake_score`` live on a bidirectional base model and score the whole generated video; the
stage-1 term is FAR stage 1's objective (per-chunk (t, r), clean-context teacher forcing). Outputs
``artifacts/far_stage2`` (metadata ``architecture: far`` + ``chunk_partition``), ``metrics/far_stage2.json``,
``plots/far_stage2_loss.csv``, ``checkpoints/far_stage2``; the evaluation samples chunk by chunk with the KV cache,
N steps per chunk (:func:`anyflow.models.far.far_generate`).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from anyflow.config import Config
from anyflow.eval.latent_stats import distribution_metrics
from anyflow.stages.common import StagePaths, eval_reference, teacher_transformer, use_threads
from anyflow.utils.io import write_json

log = logging.getLogger(__name__)

EVAL_STEPS = (1, 2, 4, 8, 16)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-steps", type=int, default=None, help="override stage2.max_steps")
    p.add_argument("--eval-samples", type=int, default=64, help="samples per student and N for the evaluation")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--no-progress", action="store_true")


@dataclass(frozen=True)
class Stage2Outputs:
    adapter: Path
    ema_adapter: Path
    metrics: Path
    loss_csv: Path


# --------------------------------------------------------------------------------------------- model assembly
def build_model(cfg: Config, teacher, stage1_adapter: Path):
    """One base AnyFlow model: adapter ``student`` ← stage-1 EMA weights, adapter ``fake_score`` (fresh LoRA,
    i.e. the teacher at init); adapters disabled = the teacher. LoRA inits are drawn from a forked RNG seeded with
    ``stage2.seed`` (peft draws LoRA A from the global RNG: unseeded, two runs of the stage differed)."""
    import torch

    from anyflow.models.student import add_lora, load_adapter, student_from_teacher
    from anyflow.train.stage2 import FAKE, STUDENT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.stage2.seed)
        model = student_from_teacher(teacher, cfg.student)
        add_lora(model, cfg.student, STUDENT)
        add_lora(model, cfg.student, FAKE)
    load_adapter(model, stage1_adapter, STUDENT)
    return model


def output_name(architecture: str = "bidirectional") -> str:
    """``stage2``, or ``far_stage2`` for the causal student (outputs of its own beside the bidirectional ones)."""
    return "stage2" if architecture == "bidirectional" else f"{architecture}_stage2"


def build_far_models(cfg: Config, teacher, stage1_adapter: Path):
    """``(scores, student)``: the bidirectional base model with adapter ``fake_score`` (adapters disabled = the
    teacher) and the FAR student with adapter ``student`` ← the FAR stage-1 EMA weights (``stage1_adapter``, whose
    metadata must say ``architecture: far`` and this ``student.chunk_partition``). LoRA inits are drawn from a
    forked RNG seeded with ``stage2.seed`` (peft draws LoRA A from the global RNG)."""
    from dataclasses import replace

    import torch

    from anyflow.models.student import adapter_metadata, add_lora, load_adapter, student_from_teacher
    from anyflow.train.stage2 import FAKE, STUDENT

    meta = adapter_metadata(stage1_adapter)
    chunks = ",".join(str(c) for c in cfg.student.chunk_partition)
    if meta.get("architecture") != "far" or meta.get("chunk_partition", chunks) != chunks:
        raise ValueError(f"{stage1_adapter}: not a FAR stage-1 adapter for student.chunk_partition {chunks} "
                         f"(metadata architecture={meta.get('architecture')!r}, "
                         f"chunk_partition={meta.get('chunk_partition')!r}); run the far_stage1 stage")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.stage2.seed)
        scores = student_from_teacher(teacher, replace(cfg.student, architecture="bidirectional"))
        add_lora(scores, cfg.student, FAKE)
        student = student_from_teacher(teacher, cfg.student)
        add_lora(student, cfg.student, STUDENT)
    load_adapter(student, stage1_adapter, STUDENT)
    return scores, student


def teacher_identity_error(model, teacher, latent_shape: tuple, text_shape: tuple, seed: int = 0) -> float:
    """max |AnyFlow(adapters off)(z, t, r=t) − Wan teacher(z, t)| on random inputs — 0 up to float rounding,
    because ``delta_embedder`` is a copy of ``time_embedder``."""
    import torch

    from anyflow.train.stage2 import velocity

    g = torch.Generator().manual_seed(seed)
    z, text = torch.randn(2, *latent_shape, generator=g), torch.randn(2, *text_shape, generator=g)
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ref = teacher(z, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
        return float((velocity(model, None, text, None)(z, t, t) - ref).abs().max())


def storage_bytes(*modules) -> int:
    """Bytes of the distinct tensor storages (parameters + buffers) held by ``modules``."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_comparison(model, teacher) -> dict:
    """One base + two adapters vs three copies (teacher, student model, fake-score model): weight bytes, and
    the measured resident-memory growth of materialising the two extra copies."""
    import gc

    from anyflow.train.stage2 import FAKE, STUDENT

    single = storage_bytes(model)
    gc.collect()
    rss0 = _rss_bytes()
    copies = [copy.deepcopy(model), copy.deepcopy(model)]
    for c, drop in zip(copies, (FAKE, STUDENT)):
        c.delete_adapters(drop)
    rss1 = _rss_bytes()
    three = storage_bytes(teacher) + storage_bytes(copies[0]) + storage_bytes(copies[1])
    del copies
    gc.collect()
    return {"single_base_weight_bytes": single, "three_copies_weight_bytes": three,
            "weight_saving_ratio": three / single, "rss_growth_two_extra_copies_bytes": rss1 - rss0}


# --------------------------------------------------------------------------------------------- evaluation
def sample_student(model, adapter_state: dict, noise, prompt_embeds, num_steps: int, shift: float,
                   batch_size: int = 16):
    """N-step flow-map sampling (``z ← z − (τi − τi+1)·u(z, τi, τi+1)``) with the ``student`` adapter set to
    ``adapter_state`` (restored afterwards); a FAR student chunk by chunk with the KV cache, N steps per chunk."""
    from anyflow.models.far import far_generate, is_far
    from anyflow.objectives.simulation import euler_sample
    from anyflow.train.stage2 import STUDENT, adapter_params, use_adapter, velocity

    import torch

    params = adapter_params(model, STUDENT)
    with torch.no_grad():
        saved = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(adapter_state[n])
        use_adapter(model, STUDENT, None)
        out = []
        for i in range(0, noise.shape[0], batch_size):
            if is_far(model):
                out.append(far_generate(model, noise[i:i + batch_size], prompt_embeds[i:i + batch_size], num_steps,
                                        shift))
                continue
            u = velocity(model, STUDENT, prompt_embeds[i:i + batch_size], None)
            out.append(euler_sample(u, noise[i:i + batch_size], num_steps, shift))
        for n, p in params.items():
            p.copy_(saved[n])
    return torch.cat(out)


def evaluate(model, states: dict[str, dict], data, num_samples: int, shift: float, reference=None) -> dict:
    """Each adapter state sampled at every N from the shards' first noises, against ``reference`` (the teacher's
    samples of the same noises; default the shard latents)."""
    m = min(num_samples, data.latents.shape[0])
    ref = data.latents[:m] if reference is None else reference[:m]
    res = {}
    for name, state in states.items():
        res[name] = {}
        for n in EVAL_STEPS:
            x = sample_student(model, state, data.noise[:m], data.prompt_embeds[:m], n, shift)
            res[name][f"N{n}"] = distribution_metrics(x, ref, ref)
    res["improved"] = {f"N{n}": {k: res["stage2"][f"N{n}"][k] < res["stage1"][f"N{n}"][k]
                                 for k in res["stage2"][f"N{n}"]} for n in EVAL_STEPS}
    return res


# --------------------------------------------------------------------------------------------- the stage
def run(cfg: Config, max_steps: int | None = None, eval_samples: int = 64, fresh: bool = False,
        progress: bool = True) -> Stage2Outputs:
    from anyflow.data.shards import ShardSet
    from anyflow.models.student import save_adapter, state_to_peft_keys
    from anyflow.stages.stage1 import EVAL_REFERENCE, output_name as stage1_name
    from anyflow.train.stage2 import STUDENT, Stage2Trainer, adapter_params, far_rollout, write_loss_csv

    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*(peft_config|was active which is now deleted).*")
    use_threads(cfg.stage2.threads)  # part of the result (dvc.yaml meta.threads gives it as many --jobs slots)
    paths = StagePaths.of(cfg)
    t_start = time.perf_counter()
    arch = cfg.student.architecture
    name = output_name(arch)
    stage1_adapter = paths.root / stage1_name("flowmap", arch) / "ema_adapter.safetensors"
    teacher = teacher_transformer(cfg, paths)
    if arch == "bidirectional":
        model = student = build_model(cfg, teacher, stage1_adapter)
        rollout = None
        memory = memory_comparison(model, teacher)
    else:  # FAR: scores on the bidirectional base model, the student on a model of its own
        model, student = build_far_models(cfg, teacher, stage1_adapter)
        rollout = far_rollout(student, cfg.model.flow_shift)
        memory = {"scores_weight_bytes": storage_bytes(model), "student_weight_bytes": storage_bytes(student)}
    shards = ShardSet(paths.shards)
    data = shards.load_all()
    teacher_err = teacher_identity_error(model, teacher, tuple(data.latents.shape[1:]),
                                         tuple(data.prompt_embeds.shape[1:]))
    if teacher_err > 1e-4:
        raise RuntimeError(f"adapters-disabled student differs from the teacher by {teacher_err:.2e} at r = t")
    negative = shards.negative_embeds()
    stage1_state = {n: p.detach().clone() for n, p in adapter_params(student, STUDENT).items()}

    def data_fn(generator: torch.Generator):
        idx = torch.randint(data.latents.shape[0], (cfg.stage2.batch_size,), generator=generator)
        return SimpleNamespace(latents=data.latents[idx], prompt_embeds=data.prompt_embeds[idx], index=idx,
                               noise=data.noise[idx])

    ckpt_dir = paths.ckpt(name)
    if fresh and (ckpt_dir / "last.pt").exists():
        (ckpt_dir / "last.pt").unlink()
    trainer = Stage2Trainer(model, cfg, data_fn, negative, stage1_fn=stage1_fn_for(student, cfg, negative),
                            ckpt_dir=ckpt_dir, rollout=rollout)
    resumed = trainer.maybe_resume()
    steps = max_steps if max_steps is not None else cfg.stage2.max_steps
    t_train = time.perf_counter()
    trainer.train(steps, progress=progress)
    train_seconds = time.perf_counter() - t_train

    out_dir = paths.root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_path, ema_path = out_dir / "adapter.safetensors", out_dir / "ema_adapter.safetensors"
    meta = {"steps": trainer.state.step, "paradigm": "flowmap", "lora_rank": cfg.student.lora_rank}
    if arch != "bidirectional":  # as far_stage1's: the gate builds the architecture from the metadata
        meta.update(architecture=arch, chunk_partition=",".join(str(c) for c in cfg.student.chunk_partition))
    save_adapter(student, adapter_path, STUDENT, metadata=meta)
    save_adapter(student, ema_path, STUDENT, state=state_to_peft_keys(student, trainer.ema_state()), metadata=meta)

    t_eval = time.perf_counter()
    m = min(eval_samples, data.latents.shape[0])
    w_ref = cfg.stage1.guidance_scale  # the scale the student reproduces (fused in stage 1, pulled to in stage 2)
    evaluation = {}
    if m:
        reference = eval_reference(cfg, teacher, data, negative, m, w_ref,  # stage 1 sampled it already
                                   store=stage1_adapter.parent / EVAL_REFERENCE)
        evaluation = evaluate(student, {"stage1": stage1_state, "stage2": trainer.ema_state()}, data, m,
                              cfg.model.flow_shift, reference=reference)
    eval_seconds = time.perf_counter() - t_eval

    hist = trainer.state.history
    tail = hist[-max(1, len(hist) // 10):]
    loss_csv = paths.plots / f"{name}_loss.csv"
    write_loss_csv(loss_csv, hist)
    metrics = {
        "steps": trainer.state.step,
        "resumed": resumed,
        "architecture": arch,
        "final": {k: sum(r.get(k, 0.0) for r in tail) / len(tail) for k in ("loss", "dmd", "stage1", "fake")},
        "seconds": {"train": train_seconds, "eval": eval_seconds, "total": time.perf_counter() - t_start,
                    "per_step": train_seconds / max(1, len(hist))},
        "memory": memory,
        "teacher_identity_max_abs_error": teacher_err,
        "eval": evaluation,
        "reference_guidance_scale": w_ref,
        "real_guidance_scale": cfg.stage2.real_guidance_scale,
        "eval_metrics_note": "reference: the teacher's 50-step samples of the same noises at CFG u + w·(c − u), "
                             f"w = {w_ref:g} (stage1.guidance_scale: the guidance fused into the student, which it "
                             "is meant to reproduce; the real score's w = "
                             f"{cfg.stage2.real_guidance_scale:g}). latent_fd: Fréchet "
                             "distance of per-sample latent statistics; channel_fd: of per-position channel vectors; "
                             "paired_mse: vs the teacher sample from the same noise. Lower is better."
                             + (" FAR: N steps per chunk, chunk by chunk with the KV cache (far_generate); real "
                                "and fake scores bidirectional on the whole video." if arch != "bidirectional"
                                else ""),
    }
    metrics_path = write_json(paths.metric(name), metrics)
    if (ckpt_dir / "last.pt").exists():
        (ckpt_dir / "last.pt").unlink()  # finished: a later run starts from the outputs, not a stale checkpoint
    return Stage2Outputs(adapter_path, ema_path, metrics_path, loss_csv)


def stage1_fn_for(model, cfg: Config, negative: torch.Tensor):
    """The full stage-1 loss of the active ``student`` adapter on a batch (weight ``stage2.stage1_weight``)."""
    if cfg.stage2.stage1_weight <= 0:
        return None
    from anyflow.objectives.flowmap import stage1_loss
    from anyflow.train.stage2 import STUDENT, use_adapter

    def fn(batch, generator):  # noqa: ANN001
        use_adapter(model, STUDENT, STUDENT)
        return stage1_loss(model, cfg, batch, negative, generator)

    return fn


def main(cfg: Config, args) -> int:
    out = run(cfg, max_steps=getattr(args, "max_steps", None), eval_samples=getattr(args, "eval_samples", 64),
              fresh=getattr(args, "fresh", False), progress=not getattr(args, "no_progress", False))
    from anyflow.utils.io import read_json

    ev = read_json(out.metrics)["eval"]
    print("N    " + "  ".join(f"{s}:{k:<10}" for s in ("stage1", "stage2") for k in ("latent_fd", "paired_mse")))
    for n in EVAL_STEPS:
        r1, r2 = ev["stage1"][f"N{n}"], ev["stage2"][f"N{n}"]
        print(f"{n:<4} " + "  ".join(f"{r[k]:<17.5f}" for r in (r1, r2) for k in ("latent_fd", "paired_mse")))
    return 0
