"""Real-valued rotary position embedding for exporting ``AnyFlowTransformer3DModel`` (ONNX / TensorRT).

diffusers applies RoPE with complex arithmetic: ``x' = view_as_complex(x)·e^{iθ}`` in complex128
(``transformer_anyflow.apply_rotary_emb``), which neither ONNX exporter can lower ("ScalarType ComplexDouble is an
unexpected tensor scalar type"). The same rotation on real pairs ``(x₀, x₁)`` (adjacent channels, the layout of
``unflatten(3, (-1, 2))``) is::

    x₀' = x₀·cos θ − x₁·sin θ
    x₁' = x₀·sin θ + x₁·cos θ

:class:`RealRotaryPosEmbed` precomputes ``cos θ``/``sin θ`` tables from the stock complex table (so the angles are
bit-identical), and :class:`RealRotaryAttnProcessor` applies the formula above; everything else in the attention
is the stock processor's code path. The rotation runs in float32 instead of float64, so outputs differ from the
stock forward only by float32 rounding (~1e-6; tested in ``tests/test_export_rotary.py``).

Use :func:`real_rotary` (context manager) or :func:`set_real_rotary` / :func:`restore_rotary` around export.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn


def rotate_pairs(x_BHLD: torch.Tensor, cos_LD2: torch.Tensor, sin_LD2: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` (B, H, L, D) by angles θ (cos/sin of shape (..., L, D/2)).

    ``(x₀, x₁) → (x₀cosθ − x₁sinθ, x₀sinθ + x₁cosθ)``, i.e. the real form of ``x·e^{iθ}`` with
    ``x = x₀ + i·x₁``. Computed in float32 (or the input's dtype if wider) and cast back to ``x``'s dtype.
    """
    work = torch.promote_types(x_BHLD.dtype, torch.float32)
    pairs = x_BHLD.to(work).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_LD2.to(work), sin_LD2.to(work)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.type_as(x_BHLD)


class RealRotaryPosEmbed(nn.Module):
    """Drop-in for ``AnyFlowRotaryPosEmbed`` returning real ``(cos, sin)`` tables instead of complex ``freqs``.

    The tables are built once from the stock module's complex128 table (``_build_freqs``) and split per axis
    (frame, height, width) exactly as the stock ``_forward_full_frame`` does; the per-call work is slicing and
    broadcasting, which exports with a dynamic frame count.
    """

    def __init__(self, stock: nn.Module):
        super().__init__()
        self.attention_head_dim = stock.attention_head_dim
        self.max_seq_len = stock.max_seq_len
        freqs = stock._build_freqs(torch.device("cpu"))  # complex128 (max_seq_len, D/2)
        d = self.attention_head_dim
        self.split = (d // 2 - 2 * (d // 6), d // 6, d // 6)
        angle = torch.angle(freqs)
        for axis, part in zip("fhw", angle.split_with_sizes(self.split, dim=1)):
            self.register_buffer(f"cos_{axis}", torch.cos(part).float(), persistent=False)
            self.register_buffer(f"sin_{axis}", torch.sin(part).float(), persistent=False)

    def _table(self, kind: str, ppf: int, pph: int, ppw: int) -> torch.Tensor:
        f = getattr(self, f"{kind}_f")[:ppf]
        h = getattr(self, f"{kind}_h")[:pph]
        w = getattr(self, f"{kind}_w")[:ppw]
        f = f.view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)
        h = h.view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)
        w = w.view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)
        return torch.cat([f, h, w], dim=-1).flatten(0, 2)[None, None]  # (1, 1, L, D/2)

    def forward(self, layout_cfg: dict, device: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        ppf = layout_cfg["total_frames"]
        pph, ppw = layout_cfg["full_frame_shape"]
        cs = (self._table("cos", ppf, pph, ppw), self._table("sin", ppf, pph, ppw))
        return {"query": cs, "key": cs}


class RealRotaryAttnProcessor:
    """``AnyFlowAttnProcessor`` with the rotation done by :func:`rotate_pairs` on ``(cos, sin)`` tables.

    Accepts both the real tables of :class:`RealRotaryPosEmbed` and the stock complex ``freqs`` (converted on the
    fly), so it is safe to set even where the stock rope module is still in place.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[Any] = None, rotary_emb: Optional[dict] = None) -> torch.Tensor:
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1)).transpose(1, 2)  # (B, H, L, D)
        key = key.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = value.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        if rotary_emb is not None:
            query = rotate_pairs(query, *_cos_sin(rotary_emb["query"]))
            key = rotate_pairs(key, *_cos_sin(rotary_emb["key"]))
        hidden_states = dispatch_attention_fn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask,
            dropout_p=0.0, is_causal=False, backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _cos_sin(emb) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(emb, tuple):
        return emb
    return emb.real, emb.imag  # stock complex freqs e^{iθ}


def _self_attentions(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__}: no .blocks — expected an AnyFlowTransformer3DModel")
    return [b.attn1 for b in blocks]


def set_real_rotary(model: nn.Module) -> dict:
    """Swap ``model.rope`` for :class:`RealRotaryPosEmbed` and every ``attn1`` processor for
    :class:`RealRotaryAttnProcessor`; returns what :func:`restore_rotary` needs to undo it."""
    base = _unwrap(model)
    saved = {"rope": base.rope, "processors": [a.processor for a in _self_attentions(base)]}
    if not isinstance(base.rope, RealRotaryPosEmbed):
        base.rope = RealRotaryPosEmbed(base.rope).to(next(base.parameters()).device)
    for attn in _self_attentions(base):
        attn.processor = RealRotaryAttnProcessor()
    return saved


def restore_rotary(model: nn.Module, saved: dict) -> None:
    """Undo :func:`set_real_rotary`."""
    base = _unwrap(model)
    base.rope = saved["rope"]
    for attn, proc in zip(_self_attentions(base), saved["processors"]):
        attn.processor = proc


@contextlib.contextmanager
def real_rotary(model: nn.Module) -> Iterator[nn.Module]:
    """``with real_rotary(model): torch.onnx.export(model, ...)`` — stock rotary restored afterwards."""
    saved = set_real_rotary(model)
    try:
        yield model
    finally:
        restore_rotary(model, saved)


def _unwrap(model: nn.Module) -> nn.Module:
    """The diffusers model under a peft wrapper (``PeftModel.base_model.model``), or the model itself."""
    while not hasattr(model, "blocks") and hasattr(model, "base_model"):
        model = model.base_model
        if hasattr(model, "model") and not hasattr(model, "blocks"):
            model = model.model
    return model
