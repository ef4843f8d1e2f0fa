"""The FAR (causal) parts of ``anyflow export`` (:mod:`anyflow.stages.export`): the runtime block, the transformer
as per-chunk ONNX graphs with the KV cache as tensors (:func:`anyflow.export.far_onnx.export_far`, into
``onnx/far/``), the streaming VAE encoder (I2V/V2V contexts of any length on ONNX Runtime), and the checks: the
release as saved, reloaded by the torch runtime, against ``far_generate`` on the merged model, and ONNX Runtime
against that torch runtime on the same noise and text (4 steps per chunk).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

FAR_ONNX_NOTE = ("architecture far: no onnx/transformer.onnx — the causal transformer is exported as one graph per "
                 "chunk index with its KV cache as tensors: onnx/far/chunk_{k}.onnx (+ cache_{k}.onnx where far-context "
                 "compression starts) and onnx/far/far_onnx.json (anyflow/export/far_onnx.py). The graphs fix "
                 "chunk_partition and the latent size (--length-chunks beyond it: --backend torch); "
                 "onnx/vae_encoder_{first,step}.onnx encode an I2V/V2V context of any length, one chunk per call")


def far_runtime_block(scfg, merged, vae) -> dict:
    """What the runtime needs to sample a FAR release chunk by chunk (``ReleaseInfo``)."""
    from anyflow.export.far_onnx import RELEASE_SUBDIR

    return {"architecture": "far", "chunk_partition": list(scfg.chunk_partition),
            "full_chunk_limit": int(merged.config.full_chunk_limit), "paradigm": scfg.paradigm,
            "temporal_factor": temporal_factor(vae),
            "transformer_inputs": "AnyFlowFARTransformer3DModel, chunk by chunk with its KV cache "
                                  f"(anyflow.export.far_runtime.ChunkStep; ONNX: {RELEASE_SUBDIR}/far_onnx.json)",
            "notes": FAR_ONNX_NOTE}


def temporal_factor(vae) -> int:
    return 2 ** sum(bool(x) for x in vae.config.temperal_downsample)


def context_frame_counts(partition: Sequence[int], factor: int) -> list[int]:
    """Pixel frame counts of every I2V/V2V context a release can take: each chunk boundary before the last."""
    from anyflow.export.far_runtime import pixel_frames

    return [pixel_frames(sum(partition[:k]), factor) for k in range(1, len(partition))]


def export_far_graphs(merged, vae, onnx_dir: Path, shape: Sequence[int], text, partition: Sequence[int],
                      components: Sequence[str], opset: int, video_hw: Sequence[int]) -> dict:
    """``onnx/far/`` (the transformer, when ``"transformer"`` is a component) and the streaming VAE encoder
    ``onnx/vae_encoder_{first,step}.onnx`` (with the VAE decoder); each graph through ``onnx.checker``. Returns the
    parity entries: the chunk graphs are checked by the generation check, the encoder against torch here at every
    context length the release can take."""
    import torch

    from anyflow.export import onnx_export as ox
    from anyflow.export.far_onnx import RELEASE_SUBDIR, export_far

    parity: dict = {}
    if "transformer" in components:
        export_far(merged, onnx_dir.parent / RELEASE_SUBDIR, shape, tuple(text.shape[1:]), opset, list(partition))
    if "vae_decoder" in components:
        parity["vae_encoder"] = {}
        video = torch.rand((1, 3, 1 + ox.ENCODER_CHUNK, *video_hw), generator=torch.Generator().manual_seed(11))
        paths = ox.export_vae_encoder(vae, onnx_dir, {"video": video * 2 - 1}, opset)
        for path in paths:
            ox.check_onnx(path)
        sessions = tuple(ox.session(path) for path in paths)
        for n in context_frame_counts(partition, temporal_factor(vae)):  # every context the release can take
            video = torch.rand((1, 3, n, *video_hw), generator=torch.Generator().manual_seed(11)) * 2 - 1
            parity["vae_encoder"][f"frames={n}"] = ox.encoder_parity(onnx_dir, vae, video, sessions).as_dict()
    return parity


def far_reload_check(release: Path, merged, tokenizer, prompts: Sequence[str], shift: float) -> tuple[dict, object]:
    """4 steps per chunk through the runtime on the release as saved (``TorchBackend.from_release``) vs
    :func:`anyflow.models.far.far_generate` on the in-memory merged model, same noise and text; returns the
    parity entry and the runtime's :class:`~anyflow.export.runtime.Generation`."""
    import torch

    from anyflow.export import onnx_export as ox
    from anyflow.export.runtime import ReleaseInfo, TorchBackend, generate, initial_noise, tokenize
    from anyflow.models.far import far_generate

    info = ReleaseInfo.read(release)
    backend = TorchBackend.from_release(release)
    got = generate(backend, info, prompts, 4, seed=0, tokenizer=tokenizer)
    text = backend.encode(*tokenize(tokenizer, prompts, info.max_text_len))
    noise = initial_noise(len(prompts), info.latent_shape, torch.Generator().manual_seed(0))
    ref = far_generate(merged, noise.permute(0, 2, 1, 3, 4), text, 4, shift)
    return {"latents": ox.compare(got.latents.permute(0, 2, 1, 3, 4).numpy(), ref.numpy()).as_dict()}, got


def far_onnx_check(release: Path, ref, tokenizer, prompts: Sequence[str]) -> tuple[dict, object]:
    """The release on ONNX Runtime (text encoder, per-chunk transformer graphs, VAE decoder) vs ``ref``, the torch
    runtime's :class:`~anyflow.export.runtime.Generation` of the same prompts, 4 steps per chunk, seed 0; returns
    the parity entry (latents, video, uint8 frames) and the ONNX Runtime generation."""
    from anyflow.export import onnx_export as ox
    from anyflow.export.runtime import ReleaseInfo, generate, make_backend

    info = ReleaseInfo.read(release)
    got = generate(make_backend("onnxruntime", release), info, prompts, 4, seed=0, tokenizer=tokenizer)
    return {"latents": ox.compare(got.latents.numpy(), ref.latents.numpy()).as_dict(),
            "video": ox.compare(got.video.numpy(), ref.video.numpy()).as_dict(),
            "frames_max_uint8_diff": int(abs(got.frames.astype(int) - ref.frames.astype(int)).max())}, got
