"""Helpers shared by the stage entry points: resolved paths and metric files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from anyflow.config import Config

ADAPTER_FILE = "ema_adapter.safetensors"  # what gate and export read from a training stage


@dataclass(frozen=True)
class StagePaths:
    """Where each stage reads and writes (relative to the working directory)."""

    root: Path
    metrics: Path
    plots: Path
    checkpoints: Path

    @classmethod
    def of(cls, cfg: Config) -> "StagePaths":
        p = cfg.paths
        return cls(Path(p.root), Path(p.metrics), Path(p.plots), Path(p.checkpoints))

    @property
    def teacher(self) -> Path:  # a WanPipeline directory (toy) or a pointer file to the local Wan2.1 dir
        return self.root / "teacher"

    @property
    def shards(self) -> Path:
        return self.root / "data"

    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def stage2(self) -> Path:
        return self.root / "stage2"

    @property
    def gate(self) -> Path:
        return self.root / "gate"

    @property
    def release(self) -> Path:
        return self.root / "release"

    def metric(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"

    def ckpt(self, stage: str) -> Path:
        return self.checkpoints / stage


def teacher_transformer(cfg: Config, paths: Optional[StagePaths] = None):
    """The teacher's ``WanTransformer3DModel`` (toy: ``artifacts/teacher``; local: ``model.pretrained_dir``)."""
    from diffusers import WanTransformer3DModel

    paths = paths or StagePaths.of(cfg)
    root = Path(cfg.model.pretrained_dir) if cfg.model.source == "local" else paths.teacher
    if not (root / "transformer").is_dir():
        raise FileNotFoundError(f"{root / 'transformer'}: teacher transformer not found (run `anyflow teacher`)")
    return WanTransformer3DModel.from_pretrained(root, subfolder="transformer").eval()


def resolve_adapter(paths: StagePaths, choice: str) -> Path:
    """A student adapter file: ``auto`` → the stage-2 EMA adapter if it exists, else stage 1's; ``stage2``,
    ``stage1`` or ``stage1_consistency`` → that stage's EMA adapter; anything else is a path."""
    options = {"stage2": paths.stage2 / ADAPTER_FILE, "stage1": paths.stage1 / ADAPTER_FILE,
               "stage1_consistency": paths.root / "stage1_consistency" / ADAPTER_FILE}
    if choice == "auto":
        for key in ("stage2", "stage1"):
            if options[key].is_file():
                return options[key]
        raise FileNotFoundError(f"{options['stage2']} / {options['stage1']}: no student adapter (run stage1)")
    path = options.get(choice, Path(choice))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: student adapter not found ({choice!r})")
    return path


def teacher_dir(cfg: Config, paths: StagePaths, override: Optional[str] = None) -> Path:
    """The teacher ``WanPipeline`` directory: ``override``, the local Wan2.1 dir, or the toy teacher's."""
    root = Path(override) if override else (
        Path(cfg.model.pretrained_dir) if cfg.model.source == "local" else paths.teacher)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root}/model_index.json: teacher WanPipeline directory not found "
                                f"(run `anyflow teacher`)")
    return root


def eval_reference(cfg: Config, teacher, data, negative, m: int, guidance_scale: float, batch: int = 16,
                   store: Optional[Path] = None, write: bool = False):
    """The teacher's samples the students are compared with: its ``synthesize.steps``-step ODE solution from the
    shards' first ``m`` noises at CFG ``guidance_scale`` — the shard latents themselves when the data were
    synthesised at that scale, otherwise sampled here (the toy data are unguided while guidance is fused into the
    student at w = 5, so the student must be compared with the CFG-5 teacher, not with its own unguided data).

    ``store``: a safetensors file of these samples. Read when its metadata (m, w, steps, shift and the sha256 of the
    teacher's weights, noises, prompt and negative embeddings they were sampled from) match — stage 1 writes it
    beside its adapters (``write``) and stage 2, which depends on stage 1's outputs, reads it instead of sampling the
    same 64 × 50 × 2 teacher evaluations again (16 s of the toy's critical path); anything else is sampled afresh."""
    import hashlib

    import torch

    from anyflow.models.teacher import teacher_ode_sample

    if guidance_scale == cfg.synthesize.guidance_scale:
        return data.latents[:m]
    inputs = hashlib.sha256()  # what the samples are a function of: the teacher's weights and the model inputs
    state = teacher.state_dict()
    for t in [state[k] for k in sorted(state)] + [data.noise[:m], data.prompt_embeds[:m], negative]:
        inputs.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    key = {"num_samples": str(m), "guidance_scale": repr(float(guidance_scale)), "steps": str(cfg.synthesize.steps),
           "flow_shift": repr(float(cfg.model.flow_shift)), "inputs_sha256": inputs.hexdigest()}
    if cfg.model.guidance_min_t > 0:  # only then, so stores written before the interval existed stay valid
        key["guidance_min_t"] = repr(float(cfg.model.guidance_min_t))
    if store is not None and Path(store).is_file():
        from safetensors import safe_open

        with safe_open(str(store), "pt") as f:
            if f.metadata() == key:
                return f.get_tensor("latents")
    ref = torch.cat([teacher_ode_sample(teacher, data.noise[i:min(m, i + batch)],
                                        data.prompt_embeds[i:min(m, i + batch)], negative, cfg.synthesize.steps,
                                        guidance_scale, cfg.model.flow_shift,
                                        guidance_min_t=cfg.model.guidance_min_t) for i in range(0, m, batch)])
    if store is not None and write:
        from anyflow.utils.io import write_safetensors

        write_safetensors(store, {"latents": ref}, metadata=key)
    return ref


def use_threads(n: int) -> int:
    """Set torch's CPU intra-op threads to ``n`` (a stage's ``threads`` param); returns the previous count.

    The count is part of a stage's result, not a tuning knob: more threads split float sums (GEMM blocks,
    reductions) differently, so the same inputs give other bytes. It is therefore a params.yaml field, never the
    machine's core count, and ``anyflow repro`` gives the stage as many of its ``--jobs`` slots (dvc.yaml
    ``meta.threads``): two 2-thread stages side by side on 2 cores ran up to 5x slower than one after the other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before
