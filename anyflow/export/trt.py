"""TensorRT engines from the release's ONNX graphs (``tensorrt`` Python API, TensorRT ≥ 10) and a small runner.

Kept free of module-level ``tensorrt``/CUDA imports: :func:`require_tensorrt` explains what is missing, so hosts
without a GPU or without TensorRT get one clear message (``deploy/tensorrt_build.py`` exits non-zero with it).

Optimisation profiles: the transformer gets one profile over batch ∈ [1, max_batch] and latent frames ∈
[1, max_frames] (optimum at the release's own shape); the text encoder over batch; the VAE decoder graph is static
(batch 1, fixed frame count; see :mod:`anyflow.export.onnx_export`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

log = logging.getLogger(__name__)


class TensorRTUnavailable(RuntimeError):
    """No CUDA device or no ``tensorrt`` package on this host."""


def require_tensorrt():
    """Import tensorrt and check for a CUDA device; raise :class:`TensorRTUnavailable` saying which is missing."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU on this host: TensorRT engines can only be built and run on a GPU "
                                  "machine (use --backend onnxruntime or torch here)")
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("the `tensorrt` Python package is not installed (pip install tensorrt; it needs "
                                  "an NVIDIA driver and CUDA)") from None
    return trt


@dataclass(frozen=True)
class ShapeProfile:
    """min / opt / max shape of one input for a TensorRT optimisation profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def transformer_profiles(latent_BFCHW: Sequence[int], text_BLD: Sequence[int], max_batch: int,
                         max_frames: int) -> dict[str, ShapeProfile]:
    """Batch in [1, max_batch] and frame count in [1, max_frames]; optimum at the exported example shape."""
    b, f, c, h, w = latent_BFCHW
    _, l, d = text_BLD
    return {
        "latents": ShapeProfile((1, 1, c, h, w), (b, f, c, h, w), (max_batch, max_frames, c, h, w)),
        "t": ShapeProfile((1, 1), (b, f), (max_batch, max_frames)),
        "r": ShapeProfile((1, 1), (b, f), (max_batch, max_frames)),
        "text_embeds": ShapeProfile((1, l, d), (b, l, d), (max_batch, l, d)),
    }


def text_encoder_profiles(ids_BL: Sequence[int], max_batch: int) -> dict[str, ShapeProfile]:
    b, l = ids_BL
    p = ShapeProfile((1, l), (b, l), (max_batch, l))
    return {"input_ids": p, "attention_mask": p}


def build_engine(onnx_path: Path, engine_path: Path, precision: str = "fp16",
                 profiles: Mapping[str, ShapeProfile] | None = None, workspace_gb: float = 8.0) -> Path:
    """Parse ``onnx_path`` into a TensorRT network, build with ``precision`` (fp32/fp16/bf16) and ``profiles``,
    write the serialized engine atomically to ``engine_path``."""
    from anyflow.utils.io import atomic_write_bytes

    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision != "fp32":
        raise ValueError(f"--precision: {precision!r} is not one of fp32, fp16, bf16")
    if profiles:
        profile = builder.create_optimization_profile()
        for name, p in profiles.items():
            profile.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    return atomic_write_bytes(engine_path, bytes(serialized))


class TrtRunner:
    """Run one engine on torch CUDA tensors: ``runner(name=tensor, ...) → first output`` (on CPU, float32);
    :meth:`run_all` returns every output."""

    def __init__(self, engine_path: Path):
        trt = require_tensorrt()
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: cannot deserialize the engine (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _torch_dtype(self, name: str) -> torch.dtype:
        import numpy as np

        return torch.from_numpy(np.zeros(1, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.run_all(**inputs)[0]

    def run_all(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output, in the engine's order (the streaming VAE decoder returns its next caches too)."""
        stream = torch.cuda.current_stream()
        keep = []
        for name in self.inputs:
            x = inputs[name].to("cuda", self._torch_dtype(name)).contiguous()
            keep.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            y = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._torch_dtype(name), device="cuda")
            outs.append(y)
            self.context.set_tensor_address(name, y.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [y.float().cpu() for y in outs]
