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
* ``vae_decoder.onnx`` — normalised latents (1, C, F, h, w) (Wan layout, as the transformer produces them after a
  permute) → video (1, 3, F_px, H, W) in [-1, 1], including the ``latents / std + mean`` de-normalisation.
  ``AutoencoderKLWan.decode`` walks the latent frames in a Python loop with a causal-conv feature cache, so the
  export unrolls that loop: the graph is exact (parity ~1e-6) but **fixed to one latent frame count and batch 1**
  (the runtime loops over the batch). A different frame count needs a re-export.

:func:`parity` runs a graph in ONNX Runtime against the torch module on the same inputs and returns max abs/rel
error; :func:`check_onnx` runs ``onnx.checker`` on the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
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
        prog.save(str(path), external_data=_needs_external(module))
    return path


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


def export_vae_decoder(vae: nn.Module, path: Path, example: Mapping[str, torch.Tensor], opset: int) -> Path:
    """Export the VAE decoder for the example's latent shape (batch 1, fixed frame count; see module doc)."""
    latents = example["latents"][:1]
    return _export(VaeDecoderGraph(vae), (latents,), path, ["latents"], ["video"], None, opset)


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
    """An ONNX Runtime session (``threads`` = 0: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
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
# (appended here, below everything the bidirectional graphs trace: the dynamo exporter records source line numbers
# in each node's stack trace, so the bidirectional release stays byte-identical)
class VaeEncoderGraph(nn.Module):
    """``video (B, 3, F_px, H, W) in [−1, 1] → (mode(q(z|x)) − mean) / std`` (B, C, F, h, w), as
    :func:`anyflow.models.teacher.encode_video` (the mode is the mean half of the posterior's moments).

    Exported for FAR releases as ``vae_encoder_f{n}.onnx`` (:func:`export_vae_encoder`): the encoder's causal
    frame loop is unrolled like the decoder's, so one graph per pixel frame count n (I2V/V2V context), batch 1."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        c = vae.config.z_dim
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1), persistent=False)

    def forward(self, video):
        z = self.vae.encode(video, return_dict=False)[0].mode()
        return (z.float() - self.mean) / self.std


def export_vae_encoder(vae: nn.Module, path: Path, example: Mapping[str, torch.Tensor], opset: int) -> Path:
    """Export the VAE encoder for the example's pixel frame count (batch 1, fixed frame count)."""
    return _export(VaeEncoderGraph(vae), (example["video"][:1],), path, ["video"], ["latents"], None, opset)
