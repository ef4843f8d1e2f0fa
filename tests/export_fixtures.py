"""A tiny random teacher ``WanPipeline`` + a random student adapter on disk, for the export/generate tests.

Geometry matches ``tests/conftest.py``'s ``TINY_WAN``: video 9×32×32 → latents (C=8, F=5, h=8, w=8); text (L, 64).
"""

from __future__ import annotations

from pathlib import Path

import torch

from anyflow.config import build

MAX_TEXT_LEN = 16


def tiny_teacher_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from conftest import TINY_WAN

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TINY_WAN).eval()
    with torch.no_grad():
        transformer.proj_out.weight.normal_(0, 0.05)
    vae = AutoencoderKLWan(base_dim=16, z_dim=8, dim_mult=[1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True], scale_factor_temporal=2, scale_factor_spatial=4,
                           latents_mean=[0.1] * 8, latents_std=[1.5] * 8).eval()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                               num_heads=4)).eval()
    return WanPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def tiny_config(root: Path):
    return build({"paths": {"root": str(root / "artifacts"), "metrics": str(root / "metrics"),
                            "plots": str(root / "plots"), "checkpoints": str(root / "ckpt")},
                  "video": {"num_frames": 9, "height": 32, "width": 32},
                  "model": {"max_text_len": MAX_TEXT_LEN},
                  "student": {"lora_rank": 4, "lora_alpha": 4.0}})


def write_tiny_artifacts(root: Path, seed: int = 0):
    """``<root>/artifacts/teacher`` (WanPipeline dir) and ``<root>/artifacts/stage1/ema_adapter.safetensors``
    (a random, non-zero LoRA so the merge is not vacuous). Returns the config."""
    from anyflow.models.student import add_lora, save_adapter, student_from_teacher
    from anyflow.stages.export import ADAPTER

    cfg = tiny_config(root)
    pipe = tiny_teacher_pipeline(seed)
    pipe.save_pretrained(str(root / "artifacts" / "teacher"))
    model = student_from_teacher(pipe.transformer, cfg.student)
    add_lora(model, cfg.student, ADAPTER)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, root / "artifacts" / "stage1" / "ema_adapter.safetensors", ADAPTER)
    return cfg
