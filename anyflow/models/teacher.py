"""The teacher API every stage codes against: a plain diffusers ``WanPipeline`` directory (toy or Wan2.1).

Conventions (DESIGN §2): t in [0, 1], t = 1 pure noise; ``z_t = (1 − t)·x0 + t·ε``; velocity ``v = ε − x0``;
the Wan transformer takes (B, C, F, H, W) latents and timestep ``1000·t`` where t is already shifted,
``shift(s) = k·s / (1 + (k − 1)·s)``. Latents handled here are in the transformer's *normalised* space:
``z = (vae_latent − latents_mean) / latents_std`` (the same normalisation ``WanPipeline`` undoes before decoding).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)

REQUIRED = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def check_teacher_dir(path: str | Path, field: str = "teacher directory") -> Path:
    """Raise ``FileNotFoundError`` naming ``path`` (and ``field``) unless it is a complete WanPipeline directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{field} {path}: not found (expected a WanPipeline diffusers directory; "
                                "nothing is downloaded)")
    missing = [name for name in REQUIRED if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"{field} {path}: incomplete WanPipeline directory, missing {', '.join(missing)}")
    return path


def load_teacher(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a ``WanPipeline`` offline (``local_files_only``); clear error naming ``path`` when missing/incomplete."""
    from diffusers import WanPipeline

    path = check_teacher_dir(path)
    pipe = WanPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return pipe


def shift_time(s: torch.Tensor | float, k: float):
    """Wan time shift ``shift(s) = k·s / (1 + (k − 1)·s)`` (identity for k = 1; maps 0→0 and 1→1)."""
    return k * s / (1 + (k - 1) * s)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], max_len: int) -> torch.Tensor:
    """Text embeddings (B, L=max_len, D) float32, padding positions zeroed (as ``WanPipeline._get_t5_prompt_embeds``)."""
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                         add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    cut = [p for p in prompts if len(pipe.tokenizer(p, add_special_tokens=True).input_ids) > max_len]
    if cut:  # as Wan's pipeline, truncate — but say so: the words past the window never reach the model
        log.warning("%d prompt(s) longer than model.max_text_len=%d tokens are truncated, e.g. %r", len(cut), max_len,
                    cut[0])
    device = next(pipe.text_encoder.parameters()).device
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    hidden = pipe.text_encoder(ids, mask).last_hidden_state
    return (hidden * mask[..., None]).float()


def negative_embeds(pipe, text: str, max_len: int) -> torch.Tensor:
    """The negative / empty-prompt embedding (1, L, D) used for classifier-free guidance."""
    return encode_prompts(pipe, [text], max_len)


def teacher_velocity(transformer, z_BCFHW: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor
                     ) -> torch.Tensor:
    """Velocity ``v(z_t, t) ≈ ε − x0``; ``t`` (B,) in [0, 1] already shifted; model timestep ``1000·t``."""
    dtype = next(transformer.parameters()).dtype
    out = transformer(hidden_states=z_BCFHW.to(dtype), timestep=(1000.0 * t).to(dtype),
                      encoder_hidden_states=prompt_embeds.to(dtype), return_dict=False)[0]
    return out.float()


def ode_schedule(steps: int, shift: float) -> torch.Tensor:
    """Shifted times ``shift(1 − i/steps)``, i = 0..steps: from 1 (noise) to 0 (data)."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


@torch.no_grad()
def teacher_ode_sample(transformer, noise_BCFHW: torch.Tensor, prompt_embeds: torch.Tensor,
                       negative_embeds: torch.Tensor, steps: int, guidance_scale: float, shift: float,
                       progress: bool = False, guidance_min_t: float = 0.0) -> torch.Tensor:
    """Euler on the PF-ODE ``dz/dt = v`` from t = 1 to 0 over the shifted schedule, with CFG ``u + w·(c − u)``.

    ``z_{t_{i+1}} = z_{t_i} + (t_{i+1} − t_i)·v̂``. Returns x0 in the transformer's normalised latent space.
    ``negative_embeds`` (1, L, D) is broadcast over the batch; a step whose scale is 1 — ``guidance_scale`` 1, or a
    step at ``t_i ≤ guidance_min_t`` (the guidance interval, :func:`anyflow.objectives.dmd.guidance_at`) — takes the
    conditional velocity and skips the unconditional pass.
    """
    from tqdm.auto import tqdm

    from anyflow.objectives.dmd import guidance_at

    z = noise_BCFHW.float().clone()
    b = z.shape[0]
    ts = ode_schedule(steps, shift)
    ws = guidance_at(ts[:-1].double(), guidance_scale, guidance_min_t).tolist()
    neg = negative_embeds.expand(b, *negative_embeds.shape[1:])
    for i in tqdm(range(steps), disable=not progress, desc="teacher ODE", leave=False):
        t = ts[i].expand(b)
        if ws[i] == 1.0:
            v = teacher_velocity(transformer, z, t, prompt_embeds)
        else:
            both = teacher_velocity(transformer, torch.cat([z, z]), torch.cat([t, t]),
                                    torch.cat([prompt_embeds, neg]))
            c, u = both.chunk(2)
            v = u + ws[i] * (c - u)
        z = z + (ts[i + 1] - ts[i]) * v
    return z


def teacher_nfe(steps: int, guidance_scale: float, shift: float, guidance_min_t: float = 0.0) -> int:
    """Network evaluations of :func:`teacher_ode_sample`: 2 per guided step, 1 per step at scale 1."""
    from anyflow.objectives.dmd import guidance_at

    ws = guidance_at(ode_schedule(steps, shift)[:-1].double(), guidance_scale, guidance_min_t)
    return int(steps + (ws != 1).sum())


def latent_shape(pipe, cfg) -> tuple[int, int, int, int]:
    """(C, F', H', W') of the teacher's latents for ``cfg.video``: Wan VAE ``F' = 1 + (F − 1)/t``, ``H' = H/s``."""
    vae = pipe.vae
    t = 2 ** sum(bool(x) for x in vae.config.temperal_downsample)
    s = 2 ** len(vae.config.temperal_downsample)
    v = cfg.video
    return (vae.config.z_dim, 1 + (v.num_frames - 1) // t, v.height // s, v.width // s)


def vae_scale_factors(vae_config) -> tuple[int, int]:
    """(temporal, spatial) downsampling of a Wan VAE from its strides: ``2^(temporal downsamples)`` and
    ``2^(len(temperal_downsample))`` (× ``patch_size`` for a patchifying VAE, Wan2.2) — Wan2.1: (4, 8), toy: (2, 4)."""
    strides = list(vae_config["temperal_downsample"])
    patch = vae_config.get("patch_size") or 1
    return 2 ** sum(bool(x) for x in strides), 2 ** len(strides) * int(patch)


def declare_vae_scale_factors(vae) -> tuple[int, int]:
    """Write the VAE's true strides into its config as ``scale_factor_temporal`` / ``scale_factor_spatial``: stock
    ``WanPipeline`` / ``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` size their latents from these two keys, whose
    ``AutoencoderKLWan`` defaults (4, 8) are Wan2.1's — undeclared, a toy VAE's 9×32×32 call becomes 5×16×16."""
    t, s = vae_scale_factors(vae.config)
    if (vae.config.get("scale_factor_temporal"), vae.config.get("scale_factor_spatial")) != (t, s):
        vae.register_to_config(scale_factor_temporal=t, scale_factor_spatial=s)
        vae.spatial_compression_ratio = s  # what __init__ derives from scale_factor_spatial (tiling)
    return t, s


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(1, c, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_video(pipe, video_BCFHW: torch.Tensor) -> torch.Tensor:
    """Video (B, 3, F, H, W) in [−1, 1] → normalised latents ``(mode(q(z|x)) − mean) / std``."""
    vae = pipe.vae
    dtype = next(vae.parameters()).dtype
    z = vae.encode(video_BCFHW.to(dtype)).latent_dist.mode().float()
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def decode_latents(pipe, latents_BCFHW: torch.Tensor) -> torch.Tensor:
    """Normalised latents → video (B, 3, F, H, W) in [−1, 1]: ``vae.decode(z·std + mean)``, clamped."""
    vae = pipe.vae
    z = latents_BCFHW.float()
    mean, std = _latent_stats(vae, z)
    dtype = next(vae.parameters()).dtype
    video = vae.decode((z * std + mean).to(dtype), return_dict=False)[0]
    return video.float().clamp(-1, 1)
