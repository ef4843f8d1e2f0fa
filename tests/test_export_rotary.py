"""The real-valued cos/sin rotary (for ONNX export) reproduces diffusers' complex RoPE."""

import torch

from conftest import TINY_WAN


def _model():
    from diffusers import AnyFlowTransformer3DModel

    torch.manual_seed(0)
    m = AnyFlowTransformer3DModel(**TINY_WAN, gate_value=0.25).eval()
    with torch.no_grad():
        m.proj_out.weight.normal_(0, 0.05)
    return m


def _inputs(b=2, f=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, f, generator=g) * 1000
    return (torch.randn(b, f, 8, 8, 8, generator=g), t, t * torch.rand(b, f, generator=g),
            torch.randn(b, 8, 64, generator=g))


def test_rotate_pairs_is_complex_multiplication():
    from anyflow.export.rotary import rotate_pairs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64)
    theta = torch.rand(7, 4, generator=g, dtype=torch.float64) * 6.28
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.polar(torch.ones_like(theta),
                                                                                          theta)).flatten(-2)
    assert torch.allclose(rotate_pairs(x, theta.cos(), theta.sin()), ref, atol=1e-12)


def test_real_rotary_matches_stock_forward_and_restores():
    from diffusers.models.transformers.transformer_anyflow import AnyFlowAttnProcessor, AnyFlowRotaryPosEmbed

    from anyflow.export.rotary import real_rotary

    m = _model()
    for b, f, seed in [(2, 5, 1), (1, 3, 2)]:
        x, t, r, e = _inputs(b, f, seed)
        with torch.no_grad():
            stock = m(x, t, r, e, return_dict=False)[0]
            with real_rotary(m):
                real = m(x, t, r, e, return_dict=False)[0]
        err = (real - stock).abs().max().item()
        assert err < 5e-6, err  # float32 vs complex128 rotation: rounding only
        assert stock.abs().max() > 0.1  # not vacuous
    assert isinstance(m.rope, AnyFlowRotaryPosEmbed)
    assert all(isinstance(blk.attn1.processor, AnyFlowAttnProcessor) for blk in m.blocks)


def test_real_rotary_under_peft_lora():
    from peft import LoraConfig

    from anyflow.export.rotary import real_rotary

    m = _model()
    m.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn1.to_q", "attn1.to_k"]), adapter_name="s")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x, t, r, e = _inputs()
    with torch.no_grad():
        stock = m(x, t, r, e, return_dict=False)[0]
        with real_rotary(m):
            real = m(x, t, r, e, return_dict=False)[0]
    assert (real - stock).abs().max() < 5e-6
