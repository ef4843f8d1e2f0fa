"""``anyflow teacher``: train the toy Wan teacher (toy) or verify a local Wan2.1 diffusers directory (wan-*).

Outputs: ``artifacts/teacher`` (a complete WanPipeline directory for toy, with a model card ``README.md`` naming the
stock call; for ``model.source == "local"`` a ``teacher.json`` pointer recording the local directory and its
sha256_tree) and ``metrics/teacher.json`` (stage seconds, VAE reconstruction error, held-out semantic accuracy of
50-step CFG samples).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from anyflow.config import Config
from anyflow.stages.common import StagePaths, use_threads

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


def heldout_accuracy(pipe, cfg: Config, seed: int) -> dict:
    """Teacher samples (cfg.teacher.eval_steps, CFG) on held-out prompts, decoded and scored from pixels by
    :func:`anyflow.eval.toy_scorers.score_clip` (colour, shape, direction; a missing object scores 0)."""
    t0 = time.time()
    import torch

    from anyflow.data import toy
    from anyflow.eval import toy_scorers
    from anyflow.models.teacher import (decode_latents, encode_prompts, latent_shape, negative_embeds,
                                        teacher_ode_sample)

    _, held = toy.split(cfg.data.seed, cfg.data.heldout_fraction)
    specs = [held[i % len(held)] for i in range(max(cfg.teacher.eval_prompts, len(held)))]
    emb = encode_prompts(pipe, toy.prompts(specs), cfg.model.max_text_len)
    neg = negative_embeds(pipe, "", cfg.model.max_text_len)
    noise = torch.randn((len(specs), *latent_shape(pipe, cfg)), generator=torch.Generator().manual_seed(seed))
    x0 = teacher_ode_sample(pipe.transformer, noise, emb, neg, cfg.teacher.eval_steps,
                            cfg.teacher.guidance_scale, cfg.model.flow_shift, progress=True,
                            guidance_min_t=cfg.model.guidance_min_t)
    frames = toy.to_pixels(decode_latents(pipe, x0))
    scores = [toy_scorers.score_clip(f, s) for f, s in zip(frames, specs)]
    out = {f"heldout_{k}": sum(s[k] for s in scores) / len(scores) for k in ("color", "shape", "direction")}
    out["heldout_visible_fraction"] = sum(s["visible_fraction"] for s in scores) / len(scores)
    # semantic accuracy: the prompted colour AND direction (the acceptance criterion)
    out["heldout_semantic_accuracy"] = sum(s["color"] * s["direction"] for s in scores) / len(scores)
    out["heldout_all_accuracy"] = sum(s["color"] * s["shape"] * s["direction"] for s in scores) / len(scores)
    out["heldout_prompts"] = len(specs)
    out["eval_seconds"] = time.time() - t0
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
    from anyflow.export import model_card
    from anyflow.models import toy_teacher
    from anyflow.models.teacher import load_teacher

    import torch

    out_dir = Path(out_dir) if out_dir is not None else StagePaths.of(cfg).teacher
    # teacher.threads (2 on the toy): the stage runs alone (anyflow repro gives it that many --jobs slots: next to
    # another busy process 2 threads made the VAE phase ~5x slower); the count is part of the result
    threads = use_threads(cfg.teacher.threads)
    try:
        t0 = time.time()
        teacher, metrics = toy_teacher.train(cfg, progress=progress)
        card = model_card.teacher_card(cfg, out_dir, teacher.vae, teacher.transformer)
        toy_teacher.save(teacher, out_dir, card=card)
        metrics["train_seconds"] = time.time() - t0
        if evaluate:
            pipe = load_teacher(out_dir)
            metrics["vae_recon_l1"] = vae_recon_error(pipe, cfg)
            metrics.update(heldout_accuracy(pipe, cfg, seed=cfg.teacher.seed + 1000))
        metrics["seconds"] = time.time() - t0
    finally:
        torch.set_num_threads(threads)
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
