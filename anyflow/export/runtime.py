"""Any-step generation from an exported release on three backends: torch, ONNX Runtime, TensorRT (DESIGN §6).

A release (``anyflow export``) holds ``pipeline/`` (a diffusers ``AnyFlowPipeline`` directory), ``onnx/*.onnx`` and
optionally ``tensorrt/*.engine`` (``deploy/tensorrt_build.py``). Every backend answers the same three calls:

* ``encode(input_ids, attention_mask) → prompt_embeds`` (B, L, D), zero past each prompt;
* ``flow_map(latents_BFCHW, t_BF, r_BF, prompt_embeds) → u`` — the merged, guidance-fused student; t and r are
  model timesteps ``1000·shift(τ)``;
* ``decode(z_BCFHW) → video`` (B, 3, F, H, W) in [−1, 1].

:func:`sample` is the flow-map sampler of ``AnyFlowPipeline`` (``FlowMapEulerDiscreteScheduler``, N steps, one
transformer call per step): ``τ_i = shift(1 − i/N)``, ``z_{τ_{i+1}} = z_{τ_i} − (τ_i − τ_{i+1})·u(z, τ_i, τ_{i+1})``.
Noise is drawn in the pipeline's layout (B, C, F, h, w) from an explicit generator, so the torch backend and
``AnyFlowPipeline`` agree for the same seed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from anyflow.export.far_runtime import ChunkStep

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ONNX_FILES = {"transformer": "onnx/transformer.onnx", "text_encoder": "onnx/text_encoder.onnx",
              "vae_decoder_first": "onnx/vae_decoder_first.onnx", "vae_decoder_step": "onnx/vae_decoder_step.onnx"}
# FAR releases: the streaming VAE encoder for I2V/V2V contexts of any length (anyflow.export.onnx_export)
VAE_ENCODER_FILES = {"vae_encoder_first": "onnx/vae_encoder_first.onnx",
                     "vae_encoder_step": "onnx/vae_encoder_step.onnx"}
ENGINE_FILES = {"transformer": "tensorrt/transformer.engine", "text_encoder": "tensorrt/text_encoder.engine",
                "vae_decoder_first": "tensorrt/vae_decoder_first.engine",
                "vae_decoder_step": "tensorrt/vae_decoder_step.engine"}


class Backend(Protocol):
    name: str

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def flow_map(self, latents: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z_BCFHW: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ReleaseInfo:
    """What sampling needs to know about a release (from ``manifest.json``'s ``runtime`` block)."""

    root: Path
    flow_shift: float
    max_text_len: int
    latent_shape: tuple[int, int, int, int]  # (C, F, h, w), Wan layout without batch
    fps: int
    architecture: str = "bidirectional"  # far: causal AnyFlow-FAR, chunk by chunk (far_generate_release)
    chunk_partition: tuple[int, ...] = ()  # FAR: latent frames per chunk (sums to F)
    temporal_factor: int = 0  # FAR: pixel frames per latent frame after the first (Wan VAE: 1 + factor·(F − 1))
    height: int = 0
    width: int = 0

    @classmethod
    def read(cls, root: str | Path) -> "ReleaseInfo":
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a release (run `anyflow export`, or `anyflow pull`)")
        rt = json.loads(path.read_text()).get("runtime")
        if not rt:
            raise ValueError(f"{path}: missing 'runtime' block (exported by an older anyflow?)")
        video = rt.get("video") or {}
        arch = rt.get("architecture", "bidirectional")
        if arch not in ("bidirectional", "far"):
            raise ValueError(f"{path}: runtime.architecture {arch!r} is not bidirectional | far")
        partition = tuple(int(c) for c in rt.get("chunk_partition") or ())
        if arch == "far" and (not partition or sum(partition) != int(rt["latent_shape"][1])):
            raise ValueError(f"{path}: runtime.chunk_partition {list(partition)} must sum to the latent frame count "
                             f"{rt['latent_shape'][1]} of a FAR release")
        return cls(root, float(rt["flow_shift"]), int(rt["max_text_len"]), tuple(rt["latent_shape"]), int(rt["fps"]),
                   arch, partition, int(rt.get("temporal_factor", 0)), int(video.get("height", 0)),
                   int(video.get("width", 0)))


# ------------------------------------------------------------------------------------------------ text
def tokenize(tokenizer, prompts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``AnyFlowPipeline._get_t5_prompt_embeds``' tokenisation: cleaned prompt, pad/truncate to ``max_len``."""
    from diffusers.pipelines.anyflow.pipeline_anyflow import prompt_clean

    enc = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_len, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return enc.input_ids.long(), enc.attention_mask.long()


def load_tokenizer(root: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root / "pipeline"), subfolder="tokenizer")


# ------------------------------------------------------------------------------------------------ sampler
def flow_map_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """σ_0 = 1 > … > σ_N = 0 with ``σ_i = shift(1 − i/N)`` (float64), from ``FlowMapEulerDiscreteScheduler``."""
    from diffusers import FlowMapEulerDiscreteScheduler

    if num_steps < 1:
        raise ValueError(f"--steps: must be >= 1 (got {num_steps})")
    sched = FlowMapEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps, device="cpu")
    return sched.sigmas.clone()


def initial_noise(batch: int, latent_shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """ε ~ N(0, I) drawn as (B, C, F, h, w) like ``AnyFlowPipeline.prepare_latents``, returned as (B, F, C, h, w)."""
    return torch.randn((batch, *latent_shape), generator=generator, dtype=torch.float32).permute(0, 2, 1, 3, 4)


def sample(flow_map: Callable, noise_BFCHW: torch.Tensor, text: torch.Tensor, num_steps: int, shift: float,
           progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """N flow-map steps ``z ← z − (σ_i − σ_{i+1})·u(z, 1000σ_i, 1000σ_{i+1})``; returns z at σ = 0 (B, F, C, h, w)."""
    sigmas = flow_map_schedule(num_steps, shift)
    z = noise_BFCHW
    b, f = z.shape[:2]
    for i in range(num_steps):
        s_t, s_r = sigmas[i], sigmas[i + 1]
        t = torch.full((b, f), float(s_t * 1000), dtype=torch.float32)
        r = torch.full((b, f), float(s_r * 1000), dtype=torch.float32)
        u = flow_map(z, t, r, text)
        z = (z - (s_t - s_r) * u).to(torch.float32)  # float64 step size, as the scheduler does
        if progress:
            progress(i)
    return z


def to_frames(video_BCFHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] video (B, 3, F, H, W) → uint8 frames (B, F, H, W, 3), as ``VideoProcessor.postprocess_video``."""
    v = (video_BCFHW.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)
    return (v * 255).round().to(torch.uint8).numpy()


@dataclass
class Generation:
    latents: torch.Tensor  # (B, F, C, h, w) at σ = 0
    video: torch.Tensor  # (B, 3, F, H, W) in [-1, 1]
    frames: np.ndarray  # uint8 (B, F, H, W, 3)
    seconds: dict


def generate(backend: Backend, info: ReleaseInfo, prompts: Sequence[str], num_steps: int, seed: int,
             tokenizer=None, show_progress: bool = False) -> Generation:
    """text encode → N flow-map steps (one transformer call each) → VAE decode. A FAR release goes chunk by chunk
    (:func:`generate_far`, N steps per chunk, text-to-video)."""
    from tqdm.auto import tqdm

    if info.architecture == "far":
        from anyflow.export.far_runtime import generate_far

        return generate_far(backend, info, prompts, num_steps, seed, tokenizer=tokenizer, show_progress=show_progress)
    tokenizer = tokenizer or load_tokenizer(info.root)
    timings = {}
    t0 = time.perf_counter()
    ids, mask = tokenize(tokenizer, prompts, info.max_text_len)
    text = backend.encode(ids, mask)
    timings["encode"] = time.perf_counter() - t0
    noise = initial_noise(len(prompts), info.latent_shape, torch.Generator().manual_seed(seed))
    bar = tqdm(total=num_steps, desc=f"{backend.name} {num_steps}-step", disable=not show_progress)
    t0 = time.perf_counter()
    z = sample(backend.flow_map, noise, text, num_steps, info.flow_shift, progress=lambda i: bar.update())
    bar.close()
    timings["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    video = backend.decode(z.permute(0, 2, 1, 3, 4).contiguous())
    timings["decode"] = time.perf_counter() - t0
    timings["total"] = sum(timings.values())
    return Generation(z, video, to_frames(video), timings)


# ------------------------------------------------------------------------------------------------ backends
class TorchBackend:
    """Eager torch on an ``AnyFlowPipeline`` (a release's ``pipeline/`` dir, or in memory at export time), through
    the same wrappers that were exported."""

    name = "torch"

    def __init__(self, pipe, device: str = "cpu"):
        from anyflow.export.onnx_export import FlowMapGraph, TextEncoderGraph, VaeDecoderGraph

        self.device = torch.device(device)
        self.text = TextEncoderGraph(pipe.text_encoder).to(self.device).eval()
        self.transformer = FlowMapGraph(pipe.transformer).to(self.device).eval()
        self.vae = VaeDecoderGraph(pipe.vae).to(self.device).eval()
        self.pipeline = pipe

    @classmethod
    def from_release(cls, root: str | Path, device: str = "cpu") -> "TorchBackend":
        from diffusers import AnyFlowFARPipeline, AnyFlowPipeline

        path = Path(root) / "pipeline"
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: diffusers directory missing from the release")
        if ReleaseInfo.read(root).architecture != "far":
            return cls(AnyFlowPipeline.from_pretrained(str(path)), device)
        from anyflow.models.far import set_far_attention

        pipe = AnyFlowFARPipeline.from_pretrained(str(path))
        set_far_attention(pipe.transformer, "auto")  # the KV-cache read through plain SDPA (anyflow.models.far)
        return cls(pipe, device)

    def chunk_step(self) -> "ChunkStep":
        """The causal chunk step of a FAR release (:class:`anyflow.export.far_runtime.TorchFarStep`)."""
        from anyflow.export.far_runtime import TorchFarStep
        from anyflow.models.far import is_far

        if not is_far(self.pipeline.transformer):
            raise ValueError("chunk_step: this release's transformer is bidirectional, not AnyFlow-FAR")
        return TorchFarStep(self.pipeline.transformer.to(self.device), self.device)

    @torch.no_grad()
    def encode_video(self, video_BCFHW: torch.Tensor) -> torch.Tensor:
        """Video (B, 3, F_px, H, W) in [−1, 1] → normalised latents ``(mode(q(z|x)) − mean) / std`` (B, C, F, h, w),
        as the training data was encoded (:func:`anyflow.models.teacher.encode_video`)."""
        from anyflow.models.teacher import encode_video

        return encode_video(self.pipeline, video_BCFHW.to(self.device)).float().cpu()

    @torch.no_grad()
    def encode(self, input_ids, attention_mask):
        return self.text(input_ids.to(self.device), attention_mask.to(self.device)).float().cpu()

    @torch.no_grad()
    def flow_map(self, latents, t, r, text):
        d = self.device
        return self.transformer(latents.to(d), t.to(d), r.to(d), text.to(d)).float().cpu()

    @torch.no_grad()
    def decode(self, z_BCFHW):
        return self.vae(z_BCFHW.to(self.device)).float().cpu()


class OnnxBackend:
    """ONNX Runtime sessions on ``onnx/*.onnx`` (CPU by default; CUDA provider if asked and available)."""

    name = "onnxruntime"

    def __init__(self, root: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                 far_step: Optional["ChunkStep"] = None):
        from anyflow.export.onnx_export import session

        root = Path(root)
        self.root, self.providers, self.threads = root, tuple(providers), threads
        self.sessions = {}
        self.far_step = far_step  # a FAR release: the chunk step replaces onnx/transformer.onnx (far_onnx_chunk_step)
        for key, rel in ONNX_FILES.items():
            if far_step is not None and key == "transformer":
                continue
            if not (root / rel).is_file():
                raise FileNotFoundError(f"{root / rel}: ONNX graph missing from the release")
            self.sessions[key] = session(root / rel, providers, threads)

    def _run(self, key: str, **feed) -> torch.Tensor:
        return torch.from_numpy(self.sessions[key].run(None, {k: v.numpy() for k, v in feed.items()})[0])

    def encode(self, input_ids, attention_mask):
        return self._run("text_encoder", input_ids=input_ids, attention_mask=attention_mask)

    def flow_map(self, latents, t, r, text):
        return self._run("transformer", latents=latents.float().contiguous(), t=t.float(), r=r.float(),
                         text_embeds=text.float().contiguous())

    def chunk_step(self) -> "ChunkStep":
        if self.far_step is None:
            raise ValueError("chunk_step: not a FAR release (OnnxBackend built without far_step)")
        return self.far_step

    def encode_video(self, video_BCFHW):
        """Video (B, 3, F_px, H, W) in [−1, 1] → normalised latents through the streaming encoder graphs
        (``onnx/vae_encoder_{first,step}.onnx``, a FAR release's I2V/V2V context; any length, batch 1: loop over
        the batch); a release without them names the file."""
        from anyflow.export.onnx_export import ort_runner, session, stream_encode

        if "vae_encoder_step" not in self.sessions:
            for key, rel in VAE_ENCODER_FILES.items():
                if not (self.root / rel).is_file():
                    raise NotImplementedError(f"{self.root / rel}: no VAE encoder graph in this release (exported "
                                              "with export.components without vae_decoder?); use --backend torch")
                self.sessions[key] = session(self.root / rel, self.providers, self.threads)
        first, step = self.sessions["vae_encoder_first"], self.sessions["vae_encoder_step"]
        names = [i.name for i in step.get_inputs()][1:]
        return torch.cat([stream_encode(ort_runner(first), ort_runner(step), names, v[None].float().contiguous())
                          for v in video_BCFHW])

    def decode(self, z_BCFHW):
        # the streaming decoder (onnx_export.stream_decode): one latent frame per call, any frame count, batch 1
        from anyflow.export.onnx_export import ort_runner, stream_decode

        first, step = self.sessions["vae_decoder_first"], self.sessions["vae_decoder_step"]
        names = [i.name for i in step.get_inputs()][1:]
        return torch.cat([stream_decode(ort_runner(first), ort_runner(step), names, z[None].float().contiguous())
                          for z in z_BCFHW])


class TensorRTBackend:
    """TensorRT engines (``tensorrt/*.engine``) on a CUDA device via the tensorrt Python runtime."""

    name = "tensorrt"

    def __init__(self, root: Path):
        from anyflow.export.trt import TrtRunner, require_tensorrt

        require_tensorrt()
        root = Path(root)
        self.runners = {}
        for key, rel in ENGINE_FILES.items():
            if not (root / rel).is_file():
                raise FileNotFoundError(f"{root / rel}: engine missing (build it: python deploy/tensorrt_build.py "
                                        f"--release {root})")
            self.runners[key] = TrtRunner(root / rel)

    def encode(self, input_ids, attention_mask):
        return self.runners["text_encoder"](input_ids=input_ids, attention_mask=attention_mask)

    def flow_map(self, latents, t, r, text):
        return self.runners["transformer"](latents=latents.float(), t=t.float(), r=r.float(), text_embeds=text.float())

    def decode(self, z_BCFHW):
        from anyflow.export.onnx_export import stream_decode

        first, step = self.runners["vae_decoder_first"], self.runners["vae_decoder_step"]
        names = [n for n in step.inputs if n != "latents"]
        return torch.cat([stream_decode(first.run_all, step.run_all, names, z[None].float()) for z in z_BCFHW])


def make_backend(name: str, root: str | Path, threads: int = 0) -> Backend:
    root = Path(root)
    if name != "torch" and (root / "manifest.json").is_file() and ReleaseInfo.read(root).architecture == "far":
        if name == "tensorrt":
            raise NotImplementedError(f"{root}: a FAR (causal) release has no TensorRT engines; use --backend torch")
        from anyflow.export.far_runtime import far_onnx_chunk_step

        return OnnxBackend(root, threads=threads, far_step=far_onnx_chunk_step(root, threads=threads))
    if name == "torch":
        return TorchBackend.from_release(root)
    if name == "onnxruntime":
        return OnnxBackend(root, threads=threads)
    if name == "tensorrt":
        return TensorRTBackend(root)
    raise ValueError(f"--backend: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
