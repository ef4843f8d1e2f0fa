"""FAR ONNX export (issue [H] deliverable 6): the functional KV-cache wrappers equal the model's own KV-cache path
(far_generate), with and without far-context compression; the ONNX Runtime chunk loop equals torch far_generate
(T2V at N = 1 and 3, I2V)."""

from dataclasses import replace

import pytest
import torch

from anyflow.config import Student
from anyflow.export.far_onnx import (FARChunkStep, export_far, far_generate_functional, far_generate_onnx,
                                     load_far_sessions)
from anyflow.models.far import _kv_cache, far_generate
from anyflow.models.student import add_lora, student_from_teacher, unwrap_full_modules
from conftest import make_tiny_wan

# latents (B, C=8, F=5, H=8, W=8) as tests/test_far.py; compressed: 3 chunks > full_chunk_limit 2
FAR = Student(architecture="far", lora_rank=4, lora_alpha=4.0, chunk_partition=(1, 2, 2), full_chunk_limit=3)
FAR_COMPRESSED = replace(FAR, full_chunk_limit=2)

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


def merged_student(scfg=FAR):
    """A tiny FAR student with a random LoRA, merged (what a release exports)."""
    model = student_from_teacher(make_tiny_wan(), scfg)
    torch.manual_seed(1)
    add_lora(model, scfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_((0.05 if "lora_B" in n else 0.3) * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in n:  # far context: the adapter's trained far_patch_embedding
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.fuse_lora(adapter_names=["student"])
    model.unload_lora()
    return unwrap_full_modules(model)


def data(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 8, 5, 8, 8, generator=g), torch.randn(b, 8, 64, generator=g),
            torch.randn(b, 8, 1, 8, 8, generator=g))


@pytest.fixture(scope="module")
def model():
    return merged_student()


def test_chunk_step_equals_the_model_read_step_and_its_cache_output_the_model_cache_write(model):
    """Chunk 2 through FARChunkStep with caches built by chunk-step appends == the model's _cached_velocity on its
    own dict cache written by the prefix cache step; the appended K/V == the model's cache buffers."""
    from anyflow.models.far import _cached_velocity

    noise, text, _ = data(1)
    clean = torch.randn_like(noise)
    part = [1, 2, 2]
    z, t, r = noise[:, :, 3:], torch.tensor([0.8, 0.3]), torch.tensor([0.5, 0.0])
    buf = _kv_cache(model, 2, part, 8, 8, "cpu", torch.float32)
    with torch.no_grad():  # the model's own cache step after chunk 1: prefix [0, 3) at t = r = 0
        mask = model.build_attention_mask(chunk_partition=part[:2], height=8, width=8, mode="cache")
        zeros = torch.zeros(2, 3)
        model(hidden_states=clean[:, :, :3].permute(0, 2, 1, 3, 4), timestep=zeros, r_timestep=zeros,
              encoder_hidden_states=text, chunk_partition=part[:2], attention_mask=mask, kv_cache=buf,
              kv_cache_flag={"num_cached_chunks": 1, "is_cache_step": True}, return_dict=False)
        ref = _cached_velocity(model, text, part, buf, {"num_cached_chunks": 2, "is_cache_step": False})(z, t, r)
        s0, s1, s2 = (FARChunkStep(model, part, k, 8, 8) for k in range(3))
        cache = s0(clean[:, :, :1], torch.zeros(2), torch.zeros(2), text)[1:]
        cache = s1(clean[:, :, 1:3], torch.zeros(2), torch.zeros(2), text, *cache)[1:]
        ours, k_out, v_out = s2(z, t, r, text, *cache)
    n = 3 * 16
    for layer in range(2):
        torch.testing.assert_close(cache[0][layer], buf[layer]["full_cache"][0, :, :, :n], rtol=0, atol=1e-5)
        torch.testing.assert_close(cache[1][layer], buf[layer]["full_cache"][1, :, :, :n], rtol=0, atol=1e-5)
    assert float(ref.abs().max()) > 0.1
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert torch.equal(k_out[:, :, :, :n], cache[0]) and k_out.shape[3] == 5 * 16  # chunk 2 appended
    other = s2(z, t, r, text, cache[0] + 0.5, cache[1])[0]  # the cache inputs are really read
    assert float((other - ours).abs().max()) > 1e-3
    assert type(model.blocks[0].attn1.processor).__name__ == "DenseFARAttnProcessor"  # swaps undone


@pytest.mark.parametrize("scfg", [FAR, FAR_COMPRESSED], ids=["full", "compressed"])
def test_functional_generation_equals_far_generate(scfg):
    """The whole chunk loop through the functional wrappers (append writes; a prefix-recompute write where far
    context compression starts) equals far_generate with the model's KV cache, T2V and I2V."""
    m = merged_student(scfg)
    noise, text, first = data(2)
    for context in (None, first):
        ref = far_generate(m, noise, text, 3, 5.0, context=context)
        ours = far_generate_functional(m, noise, text, 3, 5.0, context=context)
        assert float(ref.abs().max()) > 0.5
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scfg", [FAR, FAR_COMPRESSED], ids=["full", "compressed"])
def test_onnx_runtime_generation_equals_torch_far_generate(scfg, tmp_path):
    """export_far → ONNX Runtime chunk loop == torch far_generate for the same noise: N = 1 and 3, batch 2 and 1
    (dynamic batch), and I2V with a given first frame."""
    m = merged_student(scfg)
    paths = export_far(m, tmp_path, (8, 5, 8, 8), (8, 64), opset=18)
    expected = {"chunk_0", "chunk_1", "chunk_2", "manifest"} | ({"cache_1"} if scfg is FAR_COMPRESSED else set())
    assert set(paths) == expected
    sessions, part = load_far_sessions(tmp_path, threads=1)
    assert part == [1, 2, 2]
    noise, text, first = data(3)
    for n, b, context in ((1, 2, None), (3, 2, None), (3, 1, None), (2, 2, first)):
        ctx = None if context is None else context[:b]
        ref = far_generate(m, noise[:b], text[:b], n, 5.0, context=ctx)
        ours = far_generate_onnx(sessions, noise[:b], text[:b], n, 5.0, part, context=ctx)
        assert float(ref.abs().max()) > 0.5
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging directory removed
    with pytest.raises(ValueError, match="chunk_2"):
        far_generate_onnx({k: v for k, v in sessions.items() if k != "chunk_2"}, noise, text, 1, 5.0, part)
    (tmp_path / "chunk_1.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="chunk_1.onnx"):
        load_far_sessions(tmp_path)


def test_export_refuses_an_unmerged_student():
    model = student_from_teacher(make_tiny_wan(), FAR)
    add_lora(model, FAR)
    with pytest.raises(ValueError, match="merge the adapter"):
        FARChunkStep(model, [1, 2, 2], 0, 8, 8)
