"""Causal (AnyFlow-FAR) releases in the runtime: chunk-by-chunk generation with a KV cache, N steps per chunk;
text-to-video, image-to-video (a given first frame) and video-to-video (a given context clip).

The transformer of a FAR release is driven through a :class:`ChunkStep` — one chunk's velocity given the clean
chunks before it (in its KV cache) — so the sampler :func:`far_sample` is the same whatever executes the model:
:class:`TorchFarStep` (eager, the diffusers ``AnyFlowFARTransformer3DModel`` of ``pipeline/transformer``) or the
ONNX Runtime step ``anyflow.export.far_onnx.chunk_step(root, providers, threads)`` on the release's per-chunk graphs
``onnx/far/`` (:func:`far_onnx_chunk_step`); TensorRT refuses a FAR release with a clear message.
Conditioning frames are VAE-encoded by the backend (``encode_video``) and must end on a chunk boundary: with the
causal Wan VAE, pixel frame 0 alone is latent frame 0 (I2V = chunk 0 of ``[1, 2, 2]``), and each later latent frame
covers ``temporal_factor`` pixel frames (:func:`context_latent_frames`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch

from anyflow.export.runtime import Generation, ReleaseInfo, load_tokenizer, to_frames, tokenize


class ChunkStep(Protocol):
    """The pluggable part of causal (AnyFlow-FAR) sampling: one chunk's velocity with the KV cache of the clean
    chunks before it. :func:`far_sample` drives it; :class:`TorchFarStep` is the eager one, an ONNX chunk step
    (``anyflow.export.far_onnx.chunk_step(root, providers, threads)``) slots in the same way.

    ``reset(text, partition, h, w)`` starts a video (empty cache); ``velocity(k, z, t, r)`` is u of chunk k
    (z (B, C, F_k, h, w), t and r (B,) in [0, 1], shifted); ``commit(k, clean)`` writes the clean chunks 0..k
    (B, C, F_0+…+F_k, h, w) into the cache (t = r = 0)."""

    def reset(self, text: torch.Tensor, partition: Sequence[int], h: int, w: int) -> None: ...

    def velocity(self, k: int, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor: ...

    def commit(self, k: int, clean: torch.Tensor) -> None: ...


class TorchFarStep:
    """:class:`ChunkStep` on an ``AnyFlowFARTransformer3DModel`` through :mod:`anyflow.models.far`'s KV cache (the
    cache write and read of :func:`anyflow.models.far.far_generate`, so both give the same latents)."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.model, self.device = model, torch.device(device)

    def reset(self, text, partition, h, w):
        from anyflow.models.far import _kv_cache

        self.text, self.partition = text.to(self.device), list(partition)
        self.cache = _kv_cache(self.model, text.shape[0], self.partition, h, w, self.device, text.dtype)
        self.flag = {"num_cached_chunks": 0, "is_cache_step": False}

    @torch.no_grad()
    def velocity(self, k, z, t, r):
        from anyflow.models.far import _cached_velocity

        u = _cached_velocity(self.model, self.text, self.partition[:k + 1], self.cache, self.flag)
        return u(z.to(self.device), t.to(self.device), r.to(self.device)).float().cpu()

    @torch.no_grad()
    def commit(self, k, clean):
        b, hi = clean.shape[0], clean.shape[2]
        zeros = torch.zeros(b, hi, dtype=clean.dtype, device=self.device)
        mask = self.model.build_attention_mask(chunk_partition=self.partition[:k + 1], height=clean.shape[3],
                                               width=clean.shape[4], device=self.device, mode="cache")
        self.model(hidden_states=clean.to(self.device).permute(0, 2, 1, 3, 4), timestep=zeros, r_timestep=zeros,
                   encoder_hidden_states=self.text, chunk_partition=self.partition[:k + 1], attention_mask=mask,
                   kv_cache=self.cache, kv_cache_flag={**self.flag, "is_cache_step": True}, return_dict=False)
        self.flag["num_cached_chunks"] += 1


def extend_partition(partition: Sequence[int], num_chunks: Optional[int]) -> list[int]:
    """The release's chunk partition cut or extended to ``num_chunks`` chunks (extension repeats the chunks after
    the first, as the gate's drift check does); None: unchanged."""
    partition = list(partition)
    if num_chunks is None:
        return partition
    if num_chunks < 1:
        raise ValueError(f"--length-chunks: must be >= 1 (got {num_chunks})")
    tail = partition[1:] or partition
    out = partition[:num_chunks]
    while len(out) < num_chunks:
        out.append(tail[(len(out) - 1) % len(tail)])
    return out


def pixel_frames(latent_frames: int, temporal_factor: int) -> int:
    """Pixel frames of ``latent_frames`` latent frames (causal Wan VAE: frame 0 alone, then ``factor`` per latent)."""
    return 1 + temporal_factor * (latent_frames - 1)


def context_latent_frames(num_pixel_frames: int, partition: Sequence[int], temporal_factor: int) -> int:
    """The largest chunk boundary (latent frames) whose pixel frames fit in a clip of ``num_pixel_frames`` and that
    leaves at least one chunk to generate; 0 when not even the first chunk fits."""
    bounds = [sum(partition[:k]) for k in range(1, len(partition))]
    fit = [b for b in bounds if pixel_frames(b, temporal_factor) <= num_pixel_frames]
    return max(fit, default=0)


@torch.no_grad()
def far_sample(step: ChunkStep, noise: torch.Tensor, text: torch.Tensor, num_steps: int, shift: float,
               partition: Sequence[int], context: Optional[torch.Tensor] = None,
               progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Chunk-by-chunk N-step flow-map sampling (:func:`anyflow.models.far.far_generate`'s loop on a
    :class:`ChunkStep`): chunks inside ``context`` (B, C, Fc, h, w), Fc a chunk boundary, are kept and only cached;
    every other chunk runs N steps attending to the clean chunks before it. noise (B, C, F, h, w) → same shape."""
    from anyflow.sampling import flowmap_sample

    b, _, f, h, w = noise.shape
    partition = list(partition)
    bounds = [sum(partition[:k]) for k in range(len(partition) + 1)]
    if bounds[-1] != f:
        raise ValueError(f"chunk_partition {partition} sums to {bounds[-1]}, noise has {f} latent frames")
    out = noise.clone()
    n_ctx = 0
    if context is not None:
        if context.shape[2] not in bounds[1:-1] or context.shape[:2] != noise.shape[:2] or \
                context.shape[3:] != noise.shape[3:]:
            raise ValueError(f"context latents {tuple(context.shape)} must match noise {tuple(noise.shape)} and "
                             f"end on a chunk boundary of {partition} before the last")
        out[:, :, :context.shape[2]] = context
        n_ctx = bounds.index(context.shape[2])
    step.reset(text, partition, h, w)
    for k in range(len(partition)):
        lo, hi = bounds[k], bounds[k + 1]
        if k >= n_ctx:
            out[:, :, lo:hi] = flowmap_sample(lambda z, t, r: step.velocity(k, z, t, r), noise[:, :, lo:hi],
                                              num_steps, shift)
            if progress:
                progress(k)
        if k < len(partition) - 1:
            step.commit(k, out[:, :, :hi])
    return out


def generate_far(backend, info: ReleaseInfo, prompts: Sequence[str], num_steps: int, seed: int, tokenizer=None,
                 show_progress: bool = False, context_video: Optional[torch.Tensor] = None,
                 num_chunks: Optional[int] = None) -> Generation:
    """A FAR release: text encode → [VAE-encode ``context_video`` (B or 1, 3, F_px, H, W) in [−1, 1] whose latent
    length ends on a chunk boundary: I2V one frame, V2V a clip] → chunk by chunk, N flow-map steps per chunk, with
    the backend's :class:`ChunkStep` → VAE decode of every chunk (the context chunks too: the video opens with the
    given frames, through the VAE). Noise is drawn as for a bidirectional release ((B, C, F, h, w), ``seed``)."""
    from tqdm.auto import tqdm

    tokenizer = tokenizer or load_tokenizer(info.root)
    partition = extend_partition(info.chunk_partition, num_chunks)
    c, _, h, w = info.latent_shape
    b = len(prompts)
    timings = {}
    t0 = time.perf_counter()
    ids, mask = tokenize(tokenizer, prompts, info.max_text_len)
    text = backend.encode(ids, mask)
    context = None
    if context_video is not None:
        context = backend.encode_video(context_video)
        if context.shape[0] == 1 and b > 1:
            context = context.expand(b, *context.shape[1:])
    timings["encode"] = time.perf_counter() - t0
    noise = torch.randn((b, c, sum(partition), h, w), generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float32)
    n_ctx = sum(1 for k in range(len(partition)) if context is not None and sum(partition[:k + 1]) <= context.shape[2])
    bar = tqdm(total=len(partition) - n_ctx, desc=f"{backend.name} {num_steps} steps/chunk",
               disable=not show_progress)
    t0 = time.perf_counter()
    z = far_sample(backend.chunk_step(), noise, text, num_steps, info.flow_shift, partition, context,
                   progress=lambda k: bar.update())
    bar.close()
    timings["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    video = backend.decode(z)
    timings["decode"] = time.perf_counter() - t0
    timings["total"] = sum(timings.values())
    return Generation(z.permute(0, 2, 1, 3, 4), video, to_frames(video), timings)


def far_onnx_chunk_step(root: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
    """The ONNX Runtime :class:`ChunkStep` of a FAR release: ``anyflow.export.far_onnx.chunk_step`` on its per-chunk
    graphs (``onnx/far/``, the KV cache as tensors); a missing or corrupt graph is an error naming the file."""
    from anyflow.export import far_onnx

    return far_onnx.chunk_step(Path(root), providers, threads)
