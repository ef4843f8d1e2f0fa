"""The toy Wan teacher: a small ``AutoencoderKLWan`` + byte-level tokenizer / tiny UMT5 + small
``WanTransformer3DModel``, trained on the toy shapes domain and saved as a complete ``WanPipeline`` directory.

Training (DESIGN §4):
1. VAE on reconstruction, ``L = mean(w·(|x̂ − x| + (x̂ − x)²)) + β·KL`` (foreground-weighted, posterior mean,
   unclamped decoder output). The VAE starts as a per-frame image autoencoder (:func:`per_frame_init`), is trained
   on single frames (cheap, learns colour and position), then fine-tuned on whole clips (temporal taps).
2. ``latents_mean`` / ``latents_std`` := per-channel statistics of the training latents, so the transformer
   sees ~unit-variance latents (``WanPipeline`` un-normalises with them before decoding).
3. Transformer by flow matching (t = 1 noise): ``z_t = (1 − t)·x0 + t·ε``, target ``v = ε − x0``,
   ``t = shift(σ(n))``, n ~ N(0, 1) (shifted logit-normal), prompt replaced by the empty-prompt embedding with
   probability ``text_dropout`` so classifier-free guidance works. The text encoder stays random and frozen: a
   linear probe on its mean-pooled embeddings of the 36 training prompts classifies colour, shape and direction of
   all 12 held-out prompts correctly, so its words are already separable.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anyflow.config import Config
from anyflow.data import toy
from anyflow.models.teacher import encode_prompts, shift_time
from anyflow.utils.io import atomic_dir

log = logging.getLogger(__name__)


@dataclass
class ToyTeacher:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    transformer: torch.nn.Module
    scheduler: object

    def pipeline(self):
        from diffusers import WanPipeline

        return WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           scheduler=self.scheduler, transformer=self.transformer)


def build(cfg: Config, seed: int = 0) -> ToyTeacher:
    """Random toy components from ``cfg.model`` (geometry 9×32×32 RGB → z×5×8×8 latents)."""
    from diffusers import AutoencoderKLWan, FlowMapEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from anyflow.models.teacher import declare_vae_scale_factors

    m = cfg.model
    torch.manual_seed(seed)  # module initialisers draw from the global RNG; seed it explicitly here only
    vae = AutoencoderKLWan(base_dim=m.vae_base_dim, z_dim=m.vae_z_dim, dim_mult=[1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True], attn_scales=[],
                           latents_mean=[0.0] * m.vae_z_dim, latents_std=[1.0] * m.vae_z_dim)
    declare_vae_scale_factors(vae)  # strides 2 (time) / 4 (space): stock pipelines read them from the config
    per_frame_init(vae)
    tokenizer = ByT5Tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=m.text_d_model, d_kv=m.text_d_model
                                               // m.text_heads, d_ff=2 * m.text_d_model,
                                               num_layers=m.text_layers, num_heads=m.text_heads,
                                               relative_attention_num_buckets=8, dropout_rate=0.0))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=m.num_heads,
                                        attention_head_dim=m.head_dim, in_channels=m.vae_z_dim,
                                        out_channels=m.vae_z_dim, text_dim=m.text_d_model, freq_dim=m.freq_dim,
                                        ffn_dim=m.ffn_dim, num_layers=m.num_layers, cross_attn_norm=True,
                                        eps=1e-6, rope_max_seq_len=64)
    # Euler on shift(1 − i/N), i = 0..N: exactly anyflow's teacher sampler (teacher_ode_sample), so stock WanPipeline
    # on this directory samples what synthesize / the gate sample (FlowMatchEulerDiscreteScheduler's grid differs)
    scheduler = FlowMapEulerDiscreteScheduler(shift=m.flow_shift)
    text_encoder.eval().requires_grad_(False)
    return ToyTeacher(tokenizer, text_encoder, vae, transformer, scheduler)


def _clips(specs, n, rng, cfg: Config) -> tuple[torch.Tensor, list]:
    v = cfg.video
    frames, chosen = toy.sample_batch(specs, n, rng, v.num_frames, v.height, v.width)
    return toy.to_model_space(frames), chosen


def per_frame_init(vae) -> None:
    """Make a fresh Wan VAE a per-frame image autoencoder at initialisation.

    Every causal 3-D conv with a temporal kernel of 3 keeps only its current-frame tap (earlier taps zeroed); the
    encoder's temporal-downsampling ``time_conv`` passes its newest frame through and the decoder's temporal-upsampling
    ``time_conv`` copies the current latent frame into both output frames. Image-mode training (F = 1) then trains
    exactly the network that later sees video, so the cheap image steps transfer; the zeroed taps still receive
    gradients in the video phase and learn the temporal part.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    with torch.no_grad():
        time_convs = set()
        for mod in vae.modules():
            if isinstance(mod, WanResample) and hasattr(mod, "time_conv"):
                tc = mod.time_conv
                time_convs.add(id(tc))
                tc.weight.zero_()
                tc.bias.zero_()
                eye = torch.eye(mod.dim)
                tc.weight[: mod.dim, :, -1, 0, 0] = eye
                if tc.weight.shape[0] == 2 * mod.dim:  # upsample3d: two output frames per latent frame
                    tc.weight[mod.dim:, :, -1, 0, 0] = eye
        for mod in vae.modules():
            if isinstance(mod, WanCausalConv3d) and id(mod) not in time_convs and mod.weight.shape[2] > 1:
                mod.weight[:, :, :-1].zero_()


@contextmanager
def single_frame_convs(vae):
    """Within the block, a causal 3-D conv of the VAE that sees ONE frame and no cache (an image: F = 1, the first
    chunk) convolves with its newest temporal tap only, instead of padding two zero frames in front and convolving
    all three taps. The same function and gradients (the older taps only ever multiply those zeros: their gradient is
    exactly 0 either way) in a third of the FLOPs; the VAE's image phase trains ~2x faster. The convs get their
    stock ``forward`` back on exit (also on error); nothing is saved with the patch."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    patched = []

    def image_forward(mod, stock):
        def forward(x, cache_x=None):
            if cache_x is not None or x.shape[2] != 1:
                return stock(x, cache_x)
            pad = list(mod._padding)
            pad[4] = 0  # the causal zero frames, which only the older taps would see
            return F.conv3d(F.pad(x, pad), mod.weight[:, :, -1:], mod.bias, mod.stride, 0, mod.dilation, mod.groups)
        return forward

    for mod in vae.modules():
        if (isinstance(mod, WanCausalConv3d) and mod.kernel_size[0] == 3 and mod._padding[4] == 2
                and mod.stride[0] == 1 and mod.dilation[0] == 1):
            patched.append(mod)
            mod.forward = image_forward(mod, mod.forward)
    try:
        yield vae
    finally:
        for mod in patched:
            del mod.forward  # the instance attribute: the class's forward again


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan._decode`` without its final clamp to [−1, 1] (training only: the clamp has zero gradient
    wherever the output overshoots, e.g. just below the dark background at −0.8, which stalls learning)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=(i == 0)))
    vae.clear_cache()
    return torch.cat(outs, 2)


def _vae_clips(specs, n, rng, cfg: Config, other_fraction: float) -> torch.Tensor:
    """VAE training clips: shapes clips, each replaced with probability ``other_fraction`` by a clip of the other
    toy domain (driving) — a general-purpose video VAE, as Wan's is, not one that only knows the teacher's domain."""
    x, _ = _clips(specs, n, rng, cfg)
    if other_fraction <= 0:
        return x
    from anyflow.data import driving

    v = cfg.video
    pick = rng.random(n) < other_fraction
    others = driving.all_specs()
    for i in np.nonzero(pick)[0]:
        spec = others[int(rng.integers(0, len(others)))]
        x[i] = toy.to_model_space(driving.render(spec, int(rng.integers(0, 2**31 - 1)), v.num_frames, v.height,
                                                 v.width)[0])[0]
    return x


def train_vae(vae, cfg: Config, specs, steps: int, batch_size: int, lr: float, seed: int,
              progress: bool = True, image_steps: int = 0, image_batch_size: int = 16, kl_weight: float = 1e-6,
              fg_weight: float = 10.0, other_fraction: float = 0.0) -> list[float]:
    """Reconstruction training; returns the loss curve (image phase, then video phase).

    Phase 1 (``image_steps``): single random frames (F = 1) of toy clips, a share ``other_fraction`` of them from
    the driving domain (appearance: lane markings, vehicles); phase 2 (``steps``): whole shapes clips (mixing driving
    clips into phase 2 too cost the teacher its direction accuracy, 0.83 -> 0.29 on held-out prompts: the temporal
    taps then serve the flowing stripes).
    ``L = mean(w·(|x̂ − x| + (x̂ − x)²)) + β·KL`` on the posterior mean (no sampling noise: with β ≈ 0 the noise
    only slows learning) with ``w = 1 + fg_weight`` on foreground pixels (those differing from the toy
    background): the shapes cover ~8 % of the frame, so an unweighted loss first learns a blank clip.
    Measured on 2 CPU cores: an image step at batch 16 costs about a video step at batch 4, and image training
    learns colour and position in a few hundred steps where video-only training had not after 300.
    """
    bg = toy.to_model_space(np.array(toy.BACKGROUND, np.uint8).reshape(1, 1, 1, 3))
    rng = np.random.default_rng([seed, 1])
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    # the video phase fine-tunes what the image phase learnt: a lower peak lr keeps the per-frame colour/position
    phases = [("vae/image", image_steps, image_batch_size, True, lr), ("vae/video", steps, batch_size, False,
                                                                      0.3 * lr)]
    for desc, n, bs, image, peak in phases:
        with single_frame_convs(vae) if image else nullcontext():
            _train_phase(vae, opt, cfg, specs, rng, bg, losses, desc, n, bs, image, peak, progress, other_fraction,
                         kl_weight, fg_weight)
    vae.eval().requires_grad_(False)
    return losses


def _train_phase(vae, opt, cfg, specs, rng, bg, losses, desc, n, bs, image, peak, progress, other_fraction,
                 kl_weight, fg_weight) -> None:
    """One phase of :func:`train_vae` (image or video): ``n`` steps, appending to ``losses``."""
    for step in tqdm(range(n), disable=not progress or n == 0, desc=desc):
        x = _vae_clips(specs, bs, rng, cfg, other_fraction if image else 0.0)
        if image:  # one random frame per clip
            x = x[:, :, int(rng.integers(0, x.shape[2])):][:, :, :1]
        post = vae.encode(x).latent_dist
        rec = decode_unclamped(vae, post.mean)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        w = 1.0 + fg_weight * ((x - bg).abs().sum(1, keepdim=True) > 0.05).float()
        loss = (w * ((rec - x).abs() + (rec - x).pow(2))).mean() + kl_weight * kl
        warm = min(1.0, (step + 1) / 20)
        for g in opt.param_groups:  # warm-up + cosine decay per phase
            g["lr"] = peak * warm * 0.5 * (1 + math.cos(math.pi * step / max(n, 1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))


@torch.no_grad()
def encode_pool(vae, cfg: Config, specs, n: int, seed: int, batch: int = 16) -> tuple[torch.Tensor, list]:
    """Raw (un-normalised) VAE latents (posterior mode) of ``n`` random training clips, and their specs."""
    rng = np.random.default_rng([seed, 2])
    zs, all_specs = [], []
    for i in range(0, n, batch):
        x, chosen = _clips(specs, min(batch, n - i), rng, cfg)
        zs.append(vae.encode(x).latent_dist.mode())
        all_specs += chosen
    return torch.cat(zs), all_specs


def set_latent_stats(vae, z_raw: torch.Tensor) -> None:
    """latents_mean/std := per-channel mean / std over (B, F, H, W) of the training latents."""
    mean = z_raw.mean(dim=(0, 2, 3, 4))
    std = z_raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=[float(x) for x in mean], latents_std=[float(x) for x in std])


def train_transformer(transformer, z0: torch.Tensor, embeds: torch.Tensor, empty: torch.Tensor, steps: int,
                      batch_size: int, lr: float, text_dropout: float, shift: float, seed: int,
                      progress: bool = True, low_time: tuple[float, float] = (0.0, 0.4)) -> list[float]:
    """Flow matching on normalised latents ``z0`` (N, C, F, H, W) with per-sample text ``embeds`` (N, L, D).

    Times: ``shift(σ(n))``, n ~ N(0, 1), except the last ``round(low_time[0]·B)`` rows of each batch at
    t ~ U(0, low_time[1]) (the same random draws either way, so fraction 0 is the earlier teacher bit for bit)."""
    gen = torch.Generator().manual_seed(seed)
    transformer.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, steps // 20)
    losses = []
    for step in tqdm(range(steps), disable=not progress, desc="transformer"):
        idx = torch.randint(0, z0.shape[0], (batch_size,), generator=gen)
        x0, c = z0[idx], embeds[idx].clone()
        drop = torch.rand(batch_size, generator=gen) < text_dropout
        c[drop] = empty[0]
        t = shift_time(torch.sigmoid(torch.randn(batch_size, generator=gen)), shift)
        n_low = round(low_time[0] * batch_size)
        if n_low:
            t = torch.cat([t[:batch_size - n_low], low_time[1] * torch.rand(n_low, generator=gen)])
        eps = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1, 1)
        zt = (1 - tb) * x0 + tb * eps
        pred = transformer(hidden_states=zt, timestep=1000.0 * t, encoder_hidden_states=c, return_dict=False)[0]
        loss = F.mse_loss(pred, eps - x0)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        for g in opt.param_groups:
            g["lr"] = lr * max(scale, 0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    transformer.eval().requires_grad_(False)
    return losses


def train(cfg: Config, progress: bool = True) -> tuple[ToyTeacher, dict]:
    """Build and train the whole toy teacher on the TRAIN split; returns it and training metrics."""
    tc = cfg.teacher
    train_specs, _ = toy.split(cfg.data.seed, cfg.data.heldout_fraction)
    teacher = build(cfg, seed=tc.seed)
    t0 = time.time()
    vae_losses = train_vae(teacher.vae, cfg, train_specs, tc.vae_steps, tc.vae_batch_size, tc.vae_lr, tc.seed,
                           progress, image_steps=tc.vae_image_steps, image_batch_size=tc.vae_image_batch_size,
                           other_fraction=tc.vae_other_fraction)
    vae_seconds = time.time() - t0
    pool = max(16 * len(train_specs), 2 * tc.batch_size)  # 16 clips per training prompt (encode is cheap)
    z_raw, pool_specs = encode_pool(teacher.vae, cfg, train_specs, pool, tc.seed)
    set_latent_stats(teacher.vae, z_raw)
    mean = torch.tensor(teacher.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(teacher.vae.config.latents_std).view(1, -1, 1, 1, 1)
    z0 = (z_raw - mean) / std
    pipe = teacher.pipeline()
    embeds = encode_prompts(pipe, toy.prompts(pool_specs), cfg.model.max_text_len)
    empty = encode_prompts(pipe, [""], cfg.model.max_text_len)
    t0 = time.time()
    fm_losses = train_transformer(teacher.transformer, z0, embeds, empty, tc.steps, tc.batch_size, tc.lr,
                                  tc.text_dropout, cfg.model.flow_shift, tc.seed, progress,
                                  (tc.low_time_fraction, tc.low_time_max))
    fm_seconds = time.time() - t0
    tail = lambda xs: float(np.mean(xs[-max(1, len(xs) // 10):])) if xs else float("nan")  # noqa: E731
    return teacher, {"vae_loss_final": tail(vae_losses), "fm_loss_final": tail(fm_losses),
                     "latent_pool": int(pool), "vae_seconds": vae_seconds, "fm_seconds": fm_seconds}


def save(teacher: ToyTeacher, path: str | Path, card: str | None = None) -> Path:
    """Save a complete WanPipeline directory atomically (``WanPipeline.from_pretrained(path)`` loads it offline),
    with ``card`` as its model card ``README.md`` (:func:`anyflow.export.model_card.teacher_card`)."""
    with atomic_dir(path) as tmp:
        teacher.pipeline().save_pretrained(str(tmp), safe_serialization=True)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(path)
