"""``anyflow teacher``: train the toy Wan teacher (toy) or verify a local Wan2.1 diffusers directory (wan-*).

Outputs: ``artifacts/teacher`` (a complete WanPipeline directory for toy; for ``model.source == "local"`` a
``teacher.json`` pointer recording the local directory and its sha256_tree) and ``metrics/teacher.json``
(stage seconds, VAE reconstruction error, held-out semantic accuracy of 50-step CFG samples).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from anyflow.config import Config
from anyflow.stages.common import StagePaths

log = logging.getLogger(__name__)


def verify_local(cfg: Config) -> dict:
    """wan-* profiles: check ``model.pretrained_dir`` is a complete WanPipeline dir and hash it (never download)."""
    from anyflow.models.teacher import check_teacher_dir
    from anyflow.utils.io import sha256_tree

    if not cfg.model.pretrained_dir:
        raise FileNotFoundError("model.pretrained_dir: not set (a local Wan2.1 diffusers directory is required "
                                f"for profile {cfg.profile!r}; nothing is downloaded)")
    path = check_teacher_dir(cfg.model.pretrained_dir, field="model.pretrained_dir")
    return {"pretrained_dir": str(path.resolve()), "sha256_tree": sha256_tree(path)}


def _score(frames, spec) -> dict:
    """Colour / direction correctness of one decoded clip (uint8 F, H, W, 3) via anyflow.eval.toy_scorers."""
    try:
        from anyflow.eval import toy_scorers
    except ImportError:  # the shared scorers ([D]) not in this build yet: a minimal colour/direction check
        return _fallback_score(frames, spec)
    return toy_scorers.score_clip(frames, spec)


def _fallback_score(frames, spec) -> dict:
    """Colour = nearest palette colour to the mean foreground pixel; direction = sign of the dominant axis of
    the foreground centroid's displacement from the first to the last frame (y grows downwards)."""
    import numpy as np

    from anyflow.data import toy

    x = frames.astype(np.float32)
    fg = np.abs(x - np.array(toy.BACKGROUND, np.float32)).sum(-1) > 90  # (F, H, W)
    if fg[0].sum() == 0 or fg[-1].sum() == 0:
        return {"color": False, "direction": False}
    mean_rgb = x[fg].mean(0)
    color = min(toy.COLORS, key=lambda c: float(((np.array(toy.COLORS[c]) - mean_rgb) ** 2).sum()))
    def centroid(m):
        ys, xs = np.nonzero(m)
        return xs.mean(), ys.mean()
    (x0, y0), (x1, y1) = centroid(fg[0]), centroid(fg[-1])
    dx, dy = x1 - x0, y1 - y0
    direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return {"color": color == spec.color, "direction": direction == spec.direction}


def heldout_accuracy(pipe, cfg: Config, seed: int) -> dict:
    """Teacher samples (cfg.teacher.eval_steps, CFG) on held-out prompts, decoded and scored from pixels."""
    import torch

    from anyflow.data import toy
    from anyflow.models.teacher import (decode_latents, encode_prompts, latent_shape, negative_embeds,
                                        teacher_ode_sample)

    _, held = toy.split(cfg.data.seed, cfg.data.heldout_fraction)
    specs = [held[i % len(held)] for i in range(max(cfg.teacher.eval_prompts, len(held)))]
    emb = encode_prompts(pipe, toy.prompts(specs), cfg.model.max_text_len)
    neg = negative_embeds(pipe, "", cfg.model.max_text_len)
    noise = torch.randn((len(specs), *latent_shape(pipe, cfg)), generator=torch.Generator().manual_seed(seed))
    x0 = teacher_ode_sample(pipe.transformer, noise, emb, neg, cfg.teacher.eval_steps,
                            cfg.teacher.guidance_scale, cfg.model.flow_shift, progress=True)
    frames = toy.to_pixels(decode_latents(pipe, x0))
    scores = [_score(f, s) for f, s in zip(frames, specs)]
    keys = sorted({k for s in scores for k in s if isinstance(s[k], (bool, int, float))})
    out = {f"heldout_{k}": float(sum(float(s[k]) for s in scores) / len(scores)) for k in keys}
    both = [float(bool(s.get("color", 0)) and bool(s.get("direction", 0))) for s in scores]
    out["heldout_semantic_accuracy"] = sum(both) / len(both)
    out["heldout_prompts"] = len(specs)
    return out


def vae_recon_error(pipe, cfg: Config, n: int = 16, seed: int = 7) -> float:
    """Mean |x̂ − x| in [−1, 1] pixel units of encode→decode on fresh held-out clips."""
    import numpy as np

    from anyflow.data import toy
    from anyflow.models.teacher import decode_latents, encode_video

    _, held = toy.split(cfg.data.seed, cfg.data.heldout_fraction)
    v = cfg.video
    frames, _ = toy.sample_batch(held, n, np.random.default_rng(seed), v.num_frames, v.height, v.width)
    x = toy.to_model_space(frames)
    return float((decode_latents(pipe, encode_video(pipe, x)) - x).abs().mean())


def run(cfg: Config, out_dir: Path | None = None, progress: bool = True, evaluate: bool = True) -> dict:
    """Train + save the toy teacher into ``out_dir`` (default artifacts/teacher); returns metrics."""
    from anyflow.models import toy_teacher
    from anyflow.models.teacher import load_teacher

    out_dir = Path(out_dir) if out_dir is not None else StagePaths.of(cfg).teacher
    t0 = time.time()
    teacher, metrics = toy_teacher.train(cfg, progress=progress)
    toy_teacher.save(teacher, out_dir)
    metrics["train_seconds"] = time.time() - t0
    if evaluate:
        pipe = load_teacher(out_dir)
        metrics["vae_recon_l1"] = vae_recon_error(pipe, cfg)
        metrics.update(heldout_accuracy(pipe, cfg, seed=cfg.teacher.seed + 1000))
    metrics["seconds"] = time.time() - t0
    return metrics


def main(cfg: Config, args) -> int:
    from anyflow.utils.io import atomic_dir, write_json

    paths = StagePaths.of(cfg)
    t0 = time.time()
    if cfg.model.source == "local":
        metrics = verify_local(cfg)
        with atomic_dir(paths.teacher) as tmp:
            write_json(tmp / "teacher.json", metrics)
        metrics["seconds"] = time.time() - t0
    else:
        metrics = run(cfg, paths.teacher)
    write_json(paths.metric("teacher"), metrics)
    log.info("teacher: %s", metrics)
    return 0
