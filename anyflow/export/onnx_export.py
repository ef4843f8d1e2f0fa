"""ONNX export of the three inference components, each checked against torch (DESIGN §6).

Graphs (all float32, opset ``cfg.export.opset``, the dynamo exporter):

* ``transformer.onnx`` — the merged flow-map student ``u(z_t, t, r, c)``: inputs ``latents`` (B, F, C, H, W)
  (AnyFlow layout), ``t`` and ``r`` (B, F) per-frame *model* timesteps on the 0..1000 scale (``1000·shift(τ)``),
  ``text_embeds`` (B, L, D); output ``u`` (B, F, C, H, W). Batch and frame count are dynamic. Guidance is fused
  into the student during training, so one call per sampling step. The complex-valued RoPE is swapped for the
  real cos/sin form (:mod:`anyflow.export.rotary`) while tracing.
* ``text_encoder.onnx`` — ``input_ids``, ``attention_mask`` (B, L) int64 → ``prompt_embeds`` (B, L, D), already
  zeroed past each prompt's length exactly as ``AnyFlowPipeline._get_t5_prompt_embeds`` does. Dynamic batch.
  UMT5 is traced with eager attention (transformers' SDPA path reshapes a non-contiguous view that torch.export
  rejects).
* ``vae_decoder_first.onnx`` + ``vae_decoder_step.onnx`` — the VAE decoder as a stream, one latent frame per call
  (Wan layout, normalised latents; the ``latents / std + mean`` de-normalisation and the final clamp included).
  ``AutoencoderKLWan.decode`` walks the latent frames in a Python loop with a causal-conv feature cache; exporting
  that loop unrolled fixed the graph to one frame count and made it grow with it (546 s to export at Wan's 21
  latent frames on 2 CPU cores). Here the cache is the graph's state instead: ``first`` decodes latent frame 0
  (``latents`` (1, C, 1, h, w) → ``video`` (1, 3, 1, H, W) and ``cache_*``), ``step`` decodes any later frame
  (``latents`` + ``cache_*`` → ``video`` (1, 3, T, H, W), T = the VAE's temporal factor, and ``next_cache_*``).
  A cache slot that the first frame leaves empty (or marks ``"Rep"``) starts as zeros, which is what diffusers'
  causal padding computes, so :func:`stream_decode` equals ``vae.decode`` exactly, for any frame count; batch 1
  (the runtime loops over the batch).

:func:`parity` runs a graph in ONNX Runtime against the torch module on the same inputs and returns max abs/rel
error; :func:`check_onnx` runs ``onnx.checker`` on the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from anyflow.export.rotary import real_rotary

log = logging.getLogger(__name__)

MAX_BATCH = 64
MAX_FRAMES = 64


# ------------------------------------------------------------------------------------------------ wrappers
class FlowMapGraph(nn.Module):
    """``(latents_BFCHW, t_BF, r_BF, text_BLD) → u_BFCHW``: the positional signature exported to ONNX."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, t, r, text_embeds):
        return self.transformer(hidden_states=latents, timestep=t, r_timestep=r, encoder_hidden_states=text_embeds,
                                return_dict=False)[0]


class TextEncoderGraph(nn.Module):
    """``(input_ids, attention_mask) → last_hidden_state · mask`` (the pipeline's zero padding past the prompt)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask):
        h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h * attention_mask[..., None].to(h.dtype)


class VaeDecoderGraph(nn.Module):
    """``z_norm (B, C, F, h, w) → video (B, 3, F_px, H, W)``: ``vae.decode(z_norm / (1/std) + mean)`` as in
    ``AnyFlowPipeline.__call__``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        c = vae.config.z_dim
        for key in ("latents_mean", "latents_std"):
            if len(getattr(vae.config, key)) != c:
                raise ValueError(f"vae/config.json: {key} has {len(getattr(vae.config, key))} entries, z_dim is {c}")
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1),
                             persistent=False)

    def forward(self, latents):
        return self.vae.decode(latents / self.inv_std + self.mean, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------ export
def _export(module: nn.Module, args: tuple, path: Path, input_names: Sequence[str], output_names: Sequence[str],
            dynamic_shapes, opset: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=opset, input_names=list(input_names),
                                 output_names=list(output_names), dynamic_shapes=dynamic_shapes, verbose=False)
        _drop_source_paths(prog.model)
        prog.save(str(path), external_data=_needs_external(module))
    return path


def _drop_source_paths(model) -> None:
    """Remove the dynamo exporter's per-node Python stack traces (``pkg.torch.onnx.stack_trace``: absolute paths of
    this checkout and its virtualenv, and line numbers) from an ``onnx_ir`` model, in the main graph, its subgraphs
    and its functions. With them a release's bytes — and its DVC hash — depended on where the repository was cloned
    and on the line numbers of the code the graph traced through. The graph itself (nodes, initialisers) is
    untouched; the other metadata (namespace, class hierarchy, the FX node) holds no path."""
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in graph.all_nodes():
            node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def _needs_external(module: nn.Module) -> bool:
    """Graphs over ~1.8 GB must keep weights in an external data file (protobuf's 2 GB limit)."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) > 1.8e9


def export_transformer(transformer: nn.Module, path: Path, example: Mapping[str, torch.Tensor], opset: int) -> Path:
    """Export the (merged) ``AnyFlowTransformer3DModel`` with real-valued rotary; dynamic batch and frames."""
    b = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    f = torch.export.Dim("frames", min=1, max=MAX_FRAMES)
    dyn = {"latents": {0: b, 1: f}, "t": {0: b, 1: f}, "r": {0: b, 1: f}, "text_embeds": {0: b}}
    args = (example["latents"], example["t"], example["r"], example["text_embeds"])
    with real_rotary(transformer):
        return _export(FlowMapGraph(transformer), args, path, ["latents", "t", "r", "text_embeds"], ["u"], dyn, opset)


def export_text_encoder(text_encoder: nn.Module, path: Path, example: Mapping[str, torch.Tensor], opset: int) -> Path:
    """Export the text encoder (eager attention while tracing, restored afterwards); dynamic batch."""
    b = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    previous = getattr(text_encoder.config, "_attn_implementation", None)
    if hasattr(text_encoder, "set_attn_implementation"):
        text_encoder.set_attn_implementation("eager")
    try:
        return _export(TextEncoderGraph(text_encoder), (example["input_ids"], example["attention_mask"]), path,
                       ["input_ids", "attention_mask"], ["prompt_embeds"],
                       {"input_ids": {0: b}, "attention_mask": {0: b}}, opset)
    finally:
        if previous and hasattr(text_encoder, "set_attn_implementation"):
            text_encoder.set_attn_implementation(previous)


def decoder_cache_shapes(vae: nn.Module, latent_hw: Sequence[int]) -> list:
    """The decoder's causal-conv cache per slot in steady state (after two latent frames, batch 1): its shape, or
    None for a slot that never holds a tensor."""
    if getattr(vae.config, "patch_size", None) is not None:
        raise NotImplementedError("the streaming VAE decoder covers Wan2.1's VAE (patch_size None), not Wan2.2's")
    n = vae._cached_conv_counts["decoder"]
    with torch.no_grad():
        x = vae.post_quant_conv(torch.zeros(1, vae.config.z_dim, 2, *latent_hw))
        feat = [None] * n
        vae.decoder(x[:, :, :1], feat_cache=feat, feat_idx=[0], first_chunk=True)
        vae.decoder(x[:, :, 1:], feat_cache=feat, feat_idx=[0])
    return [tuple(f.shape) if torch.is_tensor(f) else None for f in feat]


def steady_caches(feat: Sequence, shapes: Sequence, like: torch.Tensor) -> list[torch.Tensor]:
    """The causal-conv caches after the first frame, in their steady-state shapes: a slot left empty (or marked
    ``"Rep"`` by an upsampler that skipped frame 0) is zeros, a slot holding one frame gets a zero frame in front —
    both exactly what diffusers' causal zero padding computes — so one step graph serves every later frame."""
    caches = []
    for f, shape in zip(feat, shapes):
        if shape is None:
            continue
        if not torch.is_tensor(f):
            f = like.new_zeros(shape)
        elif f.shape[2] < shape[2]:
            f = torch.cat([f.new_zeros((*f.shape[:2], shape[2] - f.shape[2], *f.shape[3:])), f], 2)
        caches.append(f)
    return caches


def cache_names(shapes: Sequence) -> list[str]:
    return [f"cache_{k:02d}" for k, s in enumerate(shapes) if s is not None]


class VaeDecoderFirst(VaeDecoderGraph):
    """Latent frame 0 (1, C, 1, h, w) → (video (1, 3, 1, H, W), the steady-state caches): see the module doc."""

    def __init__(self, vae: nn.Module, shapes: Sequence):
        super().__init__(vae)
        self.shapes = list(shapes)

    def forward(self, latents):
        x = self.vae.post_quant_conv(latents / self.inv_std + self.mean)
        feat = [None] * len(self.shapes)
        video = self.vae.decoder(x, feat_cache=feat, feat_idx=[0], first_chunk=True)
        return (video.clamp(-1.0, 1.0), *steady_caches(feat, self.shapes, x))


class VaeDecoderStep(VaeDecoderFirst):
    """One later latent frame (1, C, 1, h, w) and the caches → (video (1, 3, T, H, W), the next caches)."""

    def forward(self, latents, *caches):
        it = iter(caches)
        feat = [None if shape is None else next(it) for shape in self.shapes]
        x = self.vae.post_quant_conv(latents / self.inv_std + self.mean)
        video = self.vae.decoder(x, feat_cache=feat, feat_idx=[0])
        return (video.clamp(-1.0, 1.0), *[f for f, shape in zip(feat, self.shapes) if shape is not None])


def stream_decode(first: Callable, step: Callable, names: Sequence[str], latents: torch.Tensor) -> torch.Tensor:
    """Decode (1, C, F, h, w) one latent frame at a time: ``first(latents=…)`` and ``step(latents=…, **caches)``
    each return ``[video, *caches]`` (torch modules, ONNX Runtime sessions or TensorRT engines alike)."""
    out = first(latents=latents[:, :, :1])
    videos, caches = [out[0]], list(out[1:])
    for i in range(1, latents.shape[2]):
        out = step(latents=latents[:, :, i:i + 1], **dict(zip(names, caches)))
        videos.append(out[0])
        caches = list(out[1:])
    return torch.cat([torch.as_tensor(v) for v in videos], 2)


def export_vae_decoder(vae: nn.Module, onnx_dir: Path, example: Mapping[str, torch.Tensor], opset: int
                       ) -> tuple[Path, Path]:
    """Export the streaming VAE decoder (``vae_decoder_first.onnx``, ``vae_decoder_step.onnx``) for the example's
    latent height and width (any frame count, batch 1; see the module doc)."""
    latents = example["latents"][:1]
    shapes = decoder_cache_shapes(vae, latents.shape[3:])
    names = cache_names(shapes)
    first_graph, step_graph = VaeDecoderFirst(vae, shapes).eval(), VaeDecoderStep(vae, shapes).eval()
    first = _export(first_graph, (latents[:, :, :1],), Path(onnx_dir) / "vae_decoder_first.onnx", ["latents"],
                    ["video", *names], None, opset)
    with torch.no_grad():
        caches = first_graph(latents[:, :, :1])[1:]
    step = _export(step_graph, (latents[:, :, 1:2] if latents.shape[2] > 1 else latents, *caches),
                   Path(onnx_dir) / "vae_decoder_step.onnx", ["latents", *names], ["video", *[f"next_{n}" for n in names]],
                   None, opset)
    return first, step


def ort_runner(sess) -> Callable:
    """``runner(name=tensor, ...) → [torch outputs]`` over an ONNX Runtime session (for :func:`stream_decode`)."""
    return lambda **feed: [torch.from_numpy(a) for a in sess.run(None, {k: v.detach().cpu().float().numpy()
                                                                          for k, v in feed.items()})]


def decoder_parity(onnx_dir: Path, vae: nn.Module, latents: torch.Tensor, providers=("CPUExecutionProvider",)
                   ) -> "Parity":
    """The two streaming graphs in ONNX Runtime, frame by frame, against ``vae.decode`` (de-normalised, clamped)."""
    first, step = session(Path(onnx_dir) / "vae_decoder_first.onnx", providers), session(
        Path(onnx_dir) / "vae_decoder_step.onnx", providers)
    names = [i.name for i in step.get_inputs()][1:]
    ours = stream_decode(ort_runner(first), ort_runner(step), names, latents[:1])
    with torch.no_grad():
        ref = VaeDecoderGraph(vae)(latents[:1])
    return compare(ours.numpy(), ref.numpy())


# ------------------------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class Parity:
    """ONNX Runtime vs torch on the same inputs: ``max|a − b|`` and ``max|a − b| / max|b|``."""

    max_abs: float
    max_rel: float
    ref_scale: float

    def ok(self, atol: float, rtol: float) -> bool:
        return self.max_abs <= atol + rtol * self.ref_scale

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "ref_scale": self.ref_scale}


def check_onnx(path: Path) -> None:
    """``onnx.checker.check_model`` on the file (by path, so external weights are fine); raises naming the file."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as err:
        raise ValueError(f"{path}: onnx.checker failed: {err}") from None


def session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
    """An ONNX Runtime session on ``threads`` intra-op threads; 0: as many as the CPUs this process may run on
    (``os.sched_getaffinity``: a stage pinned by ``anyflow repro``, a container's cpuset), ORT's default where that
    is unknown. Two threads time-sliced on one pinned core only slow each other."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not threads and hasattr(os, "sched_getaffinity"):
        threads = len(os.sched_getaffinity(0))
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def compare(ours: np.ndarray, ref: np.ndarray) -> Parity:
    diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
    scale = float(np.max(np.abs(ref)))
    return Parity(max_abs=diff, max_rel=diff / max(scale, 1e-12), ref_scale=scale)


def parity(path: Path, torch_fn: Callable[..., torch.Tensor], inputs: Mapping[str, torch.Tensor],
           sess=None) -> Parity:
    """Run ``path`` in ONNX Runtime and ``torch_fn(**inputs)`` in torch; return the error."""
    sess = sess or session(path)
    names = [i.name for i in sess.get_inputs()]
    feed = {n: inputs[n].detach().cpu().numpy() for n in names}
    ours = sess.run(None, feed)[0]
    with torch.no_grad():
        ref = torch_fn(*[inputs[n] for n in names]).detach().cpu().numpy()
    return compare(ours, ref)


# ------------------------------------------------------------------------------------------------ FAR: VAE encoder
# (appended below the bidirectional graphs' code; the exported graphs no longer carry source lines or paths,
# :func:`_drop_source_paths`)
class VaeEncoderGraph(nn.Module):
    """``video (B, 3, F_px, H, W) in [−1, 1] → (mode(q(z|x)) − mean) / std`` (B, C, F, h, w), as
    :func:`anyflow.models.teacher.encode_video` (the mode is the mean half of the posterior's moments). The
    reference of the streaming encoder graphs (:func:`export_vae_encoder`)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        c = vae.config.z_dim
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1), persistent=False)

    def forward(self, video):
        z = self.vae.encode(video, return_dict=False)[0].mode()
        return (z.float() - self.mean) / self.std


# The encoder as a stream, like the decoder (FAR I2V/V2V context): ``vae_encoder_first.onnx`` encodes pixel frame 0
# (video (1, 3, 1, H, W) → latents (1, C, 1, h, w) and ``cache_*``), ``vae_encoder_step.onnx`` each later chunk of
# ENCODER_CHUNK pixel frames (the chunk AutoencoderKLWan._encode walks) with the caches (→ latents (1, C, 4 / T, h, w)
# and ``next_cache_*``); any pixel frame count, batch 1.
ENCODER_CHUNK = 4


def encoder_cache_shapes(vae: nn.Module, video_hw: Sequence[int]) -> list:
    """The encoder's causal-conv cache per slot after frame 0 and one chunk (batch 1); None for an unused slot."""
    if getattr(vae.config, "patch_size", None) is not None:
        raise NotImplementedError("the streaming VAE encoder covers Wan2.1's VAE (patch_size None), not Wan2.2's")
    n = vae._cached_conv_counts["encoder"]
    with torch.no_grad():
        feat = [None] * n
        vae.encoder(torch.zeros(1, 3, 1, *video_hw), feat_cache=feat, feat_idx=[0])
        vae.encoder(torch.zeros(1, 3, ENCODER_CHUNK, *video_hw), feat_cache=feat, feat_idx=[0])
    return [tuple(f.shape) if torch.is_tensor(f) else None for f in feat]


class VaeEncoderFirst(VaeEncoderGraph):
    """Pixel frame 0 (1, 3, 1, H, W) → (normalised latents (1, C, 1, h, w), the steady-state caches)."""

    def __init__(self, vae: nn.Module, shapes: Sequence):
        super().__init__(vae)
        self.shapes = list(shapes)

    def latents(self, h):
        z = self.vae.quant_conv(h)[:, :self.vae.config.z_dim]  # the posterior's mean half: its mode
        return (z.float() - self.mean) / self.std

    def forward(self, video):
        feat = [None] * len(self.shapes)
        h = self.vae.encoder(video, feat_cache=feat, feat_idx=[0])
        return (self.latents(h), *steady_caches(feat, self.shapes, video))


class VaeEncoderStep(VaeEncoderFirst):
    """A chunk of ENCODER_CHUNK later pixel frames and the caches → (its latents, the next caches)."""

    def forward(self, video, *caches):
        it = iter(caches)
        feat = [None if shape is None else next(it) for shape in self.shapes]
        h = self.vae.encoder(video, feat_cache=feat, feat_idx=[0])
        return (self.latents(h), *[f for f, shape in zip(feat, self.shapes) if shape is not None])


def stream_encode(first: Callable, step: Callable, names: Sequence[str], video: torch.Tensor) -> torch.Tensor:
    """Encode (1, 3, F_px, H, W) chunk by chunk with ``first(video=…)`` / ``step(video=…, **caches)``: frame 0, then
    every whole chunk of ENCODER_CHUNK frames — the frames ``AutoencoderKLWan._encode`` reads (it leaves a partial
    last chunk out, and so does this)."""
    n = video.shape[2]
    out = first(video=video[:, :, :1])
    latents, caches = [out[0]], list(out[1:])
    for i in range(1, 1 + ENCODER_CHUNK * ((n - 1) // ENCODER_CHUNK), ENCODER_CHUNK):
        out = step(video=video[:, :, i:i + ENCODER_CHUNK], **dict(zip(names, caches)))
        latents.append(out[0])
        caches = list(out[1:])
    return torch.cat([torch.as_tensor(z) for z in latents], 2)


def export_vae_encoder(vae: nn.Module, onnx_dir: Path, example: Mapping[str, torch.Tensor], opset: int
                       ) -> tuple[Path, Path]:
    """Export the streaming VAE encoder (``vae_encoder_first.onnx``, ``vae_encoder_step.onnx``) for the example's
    height and width (any pixel frame count, batch 1)."""
    video = example["video"][:1]
    shapes = encoder_cache_shapes(vae, video.shape[3:])
    names = cache_names(shapes)
    first_graph, step_graph = VaeEncoderFirst(vae, shapes).eval(), VaeEncoderStep(vae, shapes).eval()
    first = _export(first_graph, (video[:, :, :1],), Path(onnx_dir) / "vae_encoder_first.onnx", ["video"],
                    ["latents", *names], None, opset)
    with torch.no_grad():
        caches = first_graph(video[:, :, :1])[1:]
    chunk = torch.rand((1, 3, ENCODER_CHUNK, *video.shape[3:]), generator=torch.Generator().manual_seed(3)) * 2 - 1
    step = _export(step_graph, (chunk, *caches), Path(onnx_dir) / "vae_encoder_step.onnx", ["video", *names],
                   ["latents", *[f"next_{n}" for n in names]], None, opset)
    return first, step


def encoder_parity(onnx_dir: Path, vae: nn.Module, video: torch.Tensor, sessions=None) -> Parity:
    """The two streaming encoder graphs in ONNX Runtime, chunk by chunk, against :class:`VaeEncoderGraph`."""
    first, step = sessions or (session(Path(onnx_dir) / "vae_encoder_first.onnx"),
                               session(Path(onnx_dir) / "vae_encoder_step.onnx"))
    names = [i.name for i in step.get_inputs()][1:]
    ours = stream_encode(ort_runner(first), ort_runner(step), names, video[:1])
    with torch.no_grad():
        ref = VaeEncoderGraph(vae)(video[:1])
    return compare(ours.numpy(), ref.numpy())
