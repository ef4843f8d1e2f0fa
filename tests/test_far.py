"""AnyFlow-FAR student (issue 10 foundation): teacher init, dense-mask attention on CPU vs flex, chunk causality,
KV-cache generation vs full recomputation and vs diffusers' AnyFlowFARPipeline, image-to-video context, and stage 1
through the same objective code."""

from dataclasses import replace

import pytest
import torch

from anyflow.config import Student
from anyflow.models.far import far_generate, far_velocity, set_far_attention
from anyflow.models.student import (adapter_parameters, add_lora, load_adapter, save_adapter, student_from_teacher,
                                    student_velocity)
from conftest import make_tiny_wan

# latents (B, C=8, F=5, H=8, W=8): full tokens 4×4 per frame, compressed (1, 4, 4) tokens 2×2 per frame
FAR = Student(architecture="far", lora_rank=4, lora_alpha=4.0, chunk_partition=(1, 2, 2), full_chunk_limit=3)
FAR_COMPRESSED = replace(FAR, full_chunk_limit=2)  # 3 chunks > 2: the first chunk becomes compressed far context

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_wan()


def inputs(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 8, 5, 8, 8, generator=g), torch.randn(b, 8, 64, generator=g), torch.tensor([0.9, 0.35])[:b]


def randomise_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_((0.05 if "lora_B" in n else 0.3) * torch.randn(p.shape, generator=g))


def student(teacher, scfg=FAR, lora=True):
    model = student_from_teacher(teacher, scfg)
    if lora:
        torch.manual_seed(1)
        add_lora(model, scfg)
        randomise_lora(model)
    return model


def teacher_out(teacher, z, text, t):
    with torch.no_grad():
        return teacher(z, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]


def test_far_student_at_r_equal_t_is_the_teacher_where_far_context_is_unused(teacher):
    """delta_embedder ← time_embedder: chunk 0 (which sees nothing before it) at r = t is the teacher on chunk 0
    alone, and one chunk spanning the clip is the (bidirectional) teacher on the clip; r ≠ t changes it."""
    z, text, t = inputs()
    model = student(teacher, lora=False)
    add_lora(model, FAR)  # identity adapter on the same targets as the bidirectional student
    assert len(adapter_parameters(model)) == 2 * 2 * 6 + 2 * 4
    with torch.no_grad():
        chunked = student_velocity(model, z, t, t, text)
        whole = far_velocity(model, z, t, t, text, chunk_partition=[5])
        other_r = far_velocity(model, z, t, torch.zeros(2), text, chunk_partition=[5])
    torch.testing.assert_close(chunked[:, :, :1], teacher_out(teacher, z[:, :, :1], text, t), rtol=0, atol=1e-5)
    ref = teacher_out(teacher, z, text, t)
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-5)
    assert float((other_r - ref).abs().max()) > 1e-3
    assert float((chunked[:, :, 1:] - ref[:, :, 1:]).abs().max()) > 1e-3  # later chunks are causal, not the teacher
    zero = student_from_teacher(teacher, replace(FAR, delta_init="zero"))
    with torch.no_grad():
        assert float((far_velocity(zero, z, t, t, text, chunk_partition=[5]) - ref).abs().max()) > 1e-3


def test_compressed_token_is_the_mean_of_the_teacher_tokens_it_covers(teacher):
    model = student(teacher, lora=False)
    x = torch.randn(2, 8, 3, 8, 8)
    with torch.no_grad():
        full = teacher.patch_embedding(x)  # (B, D, F, 4, 4)
        comp = model.far_patch_embedding(x)  # (B, D, F, 2, 2)
        torch.testing.assert_close(comp, torch.nn.functional.avg_pool3d(full, (1, 2, 2)), rtol=0, atol=1e-5)
    assert torch.equal(model.patch_embedding.weight, teacher.patch_embedding.weight)
    with pytest.raises(ValueError, match="compressed_patch_size"):
        student_from_teacher(teacher, replace(FAR, compressed_patch_size=(1, 3, 4)))


@pytest.mark.parametrize("scfg", [FAR, FAR_COMPRESSED], ids=["full", "compressed"])
def test_dense_processor_equals_flex_forward(teacher, scfg):
    """The same BlockMask, materialised densely + SDPA, against diffusers' flex processor (CPU forward, no grad):
    the chunk-causal rollout with per-chunk times and, with clean context (teacher-forcing layout), the full mask."""
    z, text, t = inputs(1)
    model = student(teacher, scfg)
    ts, rs = 1000 * torch.tensor([[0.9, 0.6, 0.3], [0.8, 0.8, 0.1]]), 1000 * torch.tensor([[0.5, 0.2, 0.0]] * 2)
    ts, rs = (x.repeat_interleave(torch.tensor([1, 2, 2]), dim=1) for x in (ts, rs))
    n_full = 5 if scfg.full_chunk_limit == 3 else 4
    clean = torch.randn(2, n_full, 8, 8, 8)
    outs = {}
    for mode in ("flex", "dense"):
        set_far_attention(model, mode)
        with torch.no_grad():
            plain = model(hidden_states=z.permute(0, 2, 1, 3, 4), timestep=ts, r_timestep=rs,
                          encoder_hidden_states=text, chunk_partition=[1, 2, 2], return_dict=False)[0]
            ctx = model(hidden_states=z.permute(0, 2, 1, 3, 4), timestep=ts, r_timestep=rs,
                        encoder_hidden_states=text, chunk_partition=[1, 2, 2], clean_hidden_states=clean,
                        clean_timestep=torch.zeros(2, n_full), return_dict=False)[0]
        outs[mode] = (plain, ctx)
    assert outs["dense"][0].shape[1] == n_full
    for a, b in zip(outs["flex"], outs["dense"]):
        assert float(a.abs().max()) > 0.1
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert float((outs["dense"][0] - outs["dense"][1]).abs().max()) > 1e-3  # the clean copy is attended to


def test_gradients_flow_through_the_dense_processor_on_cpu(teacher):
    """flex has no CPU backward (why the dense processor exists); through the dense one every LoRA weight gets a
    gradient and it matches a central difference of the loss along a random direction."""
    z, text, t = inputs(2)
    r = torch.tensor([0.4, 0.1])
    model = student(teacher)
    lora = adapter_parameters(model)
    set_far_attention(model, "flex")
    with pytest.raises(NotImplementedError):
        far_velocity(model, z, t, r, text).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    set_far_attention(model, "auto")  # on CPU: dense
    loss = far_velocity(model, z, t, r, text).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
    g = torch.Generator().manual_seed(5)
    direction = {n: torch.randn(p.shape, generator=g) for n, p in lora.items()}
    analytic = sum(float((p.grad.double() * direction[n].double()).sum()) for n, p in lora.items())

    def loss_at(eps):
        with torch.no_grad():
            for n, p in lora.items():
                p.add_(eps * direction[n])
            out = float(far_velocity(model, z, t, r, text).double().pow(2).mean())
            for n, p in lora.items():
                p.sub_(eps * direction[n])
        return out

    fd = (loss_at(1e-3) - loss_at(-1e-3)) / 2e-3
    assert abs(analytic) > 1e-3 and abs(fd - analytic) < 2e-2 * abs(analytic), (fd, analytic)
    # forward-mode AD too (stage1.derivative: jvp) — dF/dt by jvp vs central difference, as for the bidirectional
    from anyflow.objectives.flowmap import total_derivative

    v = torch.randn_like(z)
    u = lambda zz, tt: far_velocity(model, zz, tt, r, text)  # noqa: E731
    exact = total_derivative(u, z, t, v, "jvp")
    rel = float((total_derivative(u, z, t, v, "central", 1e-4) - exact).norm() / exact.norm())
    assert float(exact.abs().max()) > 1e-2 and rel < 1e-2, rel


def test_chunk_k_does_not_see_later_chunks(teacher):
    z, text, t = inputs(3)
    model = student(teacher)
    t_k = torch.tensor([[0.9, 0.6, 0.3], [0.7, 0.5, 0.2]])
    with torch.no_grad():
        base = far_velocity(model, z, t_k, 0.5 * t_k, text)
        for k, lo in ((0, 1), (1, 3)):  # perturb latents and times of every chunk after k
            z2, t2 = z.clone(), t_k.clone()
            z2[:, :, lo:] += torch.randn_like(z2[:, :, lo:])
            t2[:, k + 1:] = 0.95
            other = far_velocity(model, z2, t2, 0.5 * t2, text)
            assert torch.equal(other[:, :, :lo], base[:, :, :lo])
            assert float((other[:, :, lo:] - base[:, :, lo:]).abs().max()) > 1e-2
        z3 = z.clone()
        z3[:, :, :1] += 1.0  # ...while chunk 2 does see chunk 0
        assert float((far_velocity(model, z3, t_k, 0.5 * t_k, text)[:, :, 3:] - base[:, :, 3:]).abs().max()) > 1e-3


@pytest.mark.parametrize("scfg", [FAR, FAR_COMPRESSED], ids=["full", "compressed"])
def test_kv_cache_generation_equals_full_recomputation(teacher, scfg):
    """Chunk-by-chunk sampling with the model's KV cache (cache write at t = r = 0, then read) equals recomputing
    [clean prefix, noisy chunk] in one rollout forward at every step — with compressed far context too."""
    _, text, _ = inputs(4)
    model = student(teacher, scfg)
    noise = torch.randn(2, 8, 5, 8, 8, generator=torch.Generator().manual_seed(6))
    cached = far_generate(model, noise, text, 3, 5.0)
    full = far_generate(model, noise, text, 3, 5.0, use_cache=False)
    assert float(full.abs().max()) > 0.5
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    chunk0 = far_generate(model, noise[:, :, :1], text, 3, 5.0, chunk_partition=[1])
    torch.testing.assert_close(cached[:, :, :1], chunk0, rtol=0, atol=1e-6)  # later chunks never feed back


def test_image_to_video_keeps_the_given_first_frame(teacher):
    _, text, _ = inputs(5)
    model = student(teacher)
    g = torch.Generator().manual_seed(7)
    noise, first = torch.randn(2, 8, 5, 8, 8, generator=g), torch.randn(2, 8, 1, 8, 8, generator=g)
    out = far_generate(model, noise, text, 2, 5.0, context=first)
    assert torch.equal(out[:, :, :1], first)
    torch.testing.assert_close(out, far_generate(model, noise, text, 2, 5.0, context=first, use_cache=False),
                               rtol=0, atol=1e-5)
    other = far_generate(model, noise, text, 2, 5.0, context=first + 1.0)
    assert float((other[:, :, 1:] - out[:, :, 1:]).abs().max()) > 1e-3  # the later chunks are conditioned on it
    # the consistency baseline runs through the same chunk loop (x0-predict and re-noise per chunk)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    cons = far_generate(model, noise, text, 2, 5.0, context=first, paradigm="consistency", generator=g1)
    assert torch.equal(cons[:, :, :1], first)
    torch.testing.assert_close(cons, far_generate(model, noise, text, 2, 5.0, context=first, use_cache=False,
                                                  paradigm="consistency", generator=g2), rtol=0, atol=1e-5)
    assert float((cons - out).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="chunk boundary"):
        far_generate(model, noise, text, 2, 5.0, context=torch.randn(2, 8, 2, 8, 8))


def test_stage1_objective_trains_the_far_adapter_and_adapter_round_trips(teacher, tmp_path):
    """The unchanged stage-1 code (stage1_loss → student_velocity) trains only the FAR student's LoRA; the
    adapter file loads into a fresh FAR student."""
    from anyflow.objectives.flowmap import stage1_loss
    from stage1_fixtures import CFG, dataset

    model = student(teacher)
    cfg = replace(CFG, student=FAR)
    loss = stage1_loss(model, cfg, dataset(4), torch.zeros(1, 8, 64), torch.Generator().manual_seed(0))
    loss.backward()
    lora = adapter_parameters(model)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
    assert all(p.grad is None for p in teacher.parameters())
    z, text, t = inputs(8)
    path = save_adapter(model, tmp_path / "far.safetensors")
    other = student(teacher, lora=False)
    add_lora(other, FAR)
    load_adapter(other, path)
    with torch.no_grad():
        torch.testing.assert_close(student_velocity(other, z, t, 0.3 * t, text),
                                   student_velocity(model, z, t, 0.3 * t, text), rtol=0, atol=0)
    model.fuse_lora(adapter_names=["student"])  # what export does: merged weights, same function
    model.unload_lora()
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(student_velocity(model, z, t, 0.3 * t, text),
                                   student_velocity(other, z, t, 0.3 * t, text), rtol=0, atol=2e-5)
    with torch.no_grad():  # far context (3 chunks > limit 2) trains too: a velocity of every frame (test_far_context)
        assert far_velocity(student(teacher, FAR_COMPRESSED, lora=False), z, t, t, text).shape == z.shape
    with pytest.raises(ValueError, match="one per chunk"):
        far_velocity(model, z, torch.ones(2, 2), t, text)


def test_far_generate_is_the_diffusers_far_pipeline(teacher):
    """far_generate is AnyFlowFARPipeline's chunk loop: the pipeline (on latents, text embeddings, no CFG) with
    this FAR student gives the same latents, for T2V and with a given first latent frame (video_latents)."""
    from diffusers import AnyFlowFARPipeline, FlowMapEulerDiscreteScheduler

    from anyflow.config import build
    from anyflow.models import toy_teacher

    toy = toy_teacher.build(build({}))  # random tokenizer/text encoder/VAE: 9×32×32 → 5×8×8
    model = student(teacher, FAR_COMPRESSED)
    pipe = AnyFlowFARPipeline(tokenizer=toy.tokenizer, text_encoder=toy.text_encoder, transformer=model, vae=toy.vae,
                              scheduler=FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(10)
    noise, text, first = torch.randn(2, 8, 5, 8, 8, generator=g), torch.randn(2, 8, 64, generator=g), \
        torch.randn(2, 8, 1, 8, 8, generator=g)
    for context in (None, first):
        kw = {} if context is None else {"video_latents": context.permute(0, 2, 1, 3, 4)}
        ref = pipe(prompt_embeds=text, latents=noise, height=32, width=32, num_frames=9, num_inference_steps=3,
                   output_type="latent", guidance_scale=1.0, chunk_partition=[1, 2, 2], **kw).frames
        ours = far_generate(model, noise, text, 3, 5.0, context=context)
        assert float(ours.abs().max()) > 0.5
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_teacher_forcing_is_what_generation_shows_each_chunk(teacher):
    """far_velocity(clean=x0): chunk k's velocity equals the generation-time velocity of chunk k with the clean
    chunks < k as prefix (far_recompute_chunk ≡ KV cache), and depends on no other chunk's (z, t, r) — so per-chunk
    times and an all-ones JVP tangent give per-chunk MeanFlow derivatives."""
    from anyflow.models.far import far_recompute_chunk

    z, text, _ = inputs(11)
    x0 = torch.randn_like(z)
    model = student(teacher)
    t_k, r_k = torch.tensor([[0.9, 0.6, 0.3], [0.7, 0.5, 0.2]]), torch.tensor([[0.4, 0.0, 0.1], [0.7, 0.2, 0.0]])
    with torch.no_grad():
        tf = far_velocity(model, z, t_k, r_k, text, clean=x0)
        for k, (lo, hi) in enumerate(((0, 1), (1, 3), (3, 5))):
            ref = far_recompute_chunk(model, text, [1, 2, 2][:k + 1], x0[:, :, :lo])(z[:, :, lo:hi], t_k[:, k],
                                                                                      r_k[:, k])
            torch.testing.assert_close(tf[:, :, lo:hi], ref, rtol=0, atol=1e-5)
        z2, t2 = z.clone(), t_k.clone()
        z2[:, :, :3] += 1.0  # perturb chunks 0-1 noisy input and times: chunk 2 is unchanged, chunks 0-1 change
        t2[:, :2] = 0.99
        other = far_velocity(model, z2, t2, r_k, text, clean=x0)
        torch.testing.assert_close(other[:, :, 3:], tf[:, :, 3:], rtol=0, atol=1e-6)
        assert float((other[:, :, :3] - tf[:, :, :3]).abs().max()) > 1e-2
        x2 = x0.clone()
        x2[:, :, :1] += 1.0  # the clean context does enter later chunks
        assert float((far_velocity(model, z, t_k, r_k, text, clean=x2)[:, :, 1:] - tf[:, :, 1:]).abs().max()) > 1e-3
        assert float((far_velocity(model, z, t_k, r_k, text) - tf)[:, :, 1:].abs().max()) > 1e-3  # ≠ noisy context


@pytest.mark.parametrize("scfg", [FAR, FAR_COMPRESSED], ids=["full", "compressed"])
def test_broadcast_dense_mask_equals_torch_create_mask(teacher, scfg):
    """_dense_mask evaluates diffusers' mask_mod on broadcast index grids; it equals torch's vmapped create_mask
    for every layout the FAR model builds (rollout with and without clean context, cache write)."""
    from torch.nn.attention.flex_attention import create_mask

    from anyflow.models.far import _dense_mask

    model = student(teacher, scfg, lora=False)
    for mode, clean in (("train", False), ("train", True), ("cache", False)):
        bm = model.build_attention_mask(chunk_partition=[1, 2, 2], height=8, width=8, has_clean_context=clean,
                                        mode=mode)
        q, kv = bm.seq_lengths
        ref = create_mask(bm.mask_mod, None, None, q, kv, "cpu")
        n = q - 7  # a length inside the padding
        ours = _dense_mask(bm, n, n, "cpu")
        assert ours.shape == (1, 1, n, n) and 0 < int(ours.sum()) < n * n
        assert torch.equal(ours, ref[:, :, :n, :n]), (mode, clean)


def test_attention_mask_cache_never_serves_a_freed_masks_entry():
    """The dense-mask cache was keyed by id(): the KV-cache steps and stage 2 build a block mask per call, so a new
    mask of other content could get a freed one's id and be served its stale dense mask. It holds the mask now."""
    from anyflow.models.far import DenseFARAttnProcessor, _dense_mask

    class Mask:  # what _dense_mask reads of a BlockMask
        def __init__(self, mask_mod):
            self.mask_mod = mask_mod

    proc = DenseFARAttnProcessor("dense")
    causal = Mask(lambda b, h, q, kv: q >= kv)
    proc._mask(causal, 6, 6, "cpu")
    freed = id(causal)
    del causal
    masks = [Mask(lambda b, h, q, kv: q <= kv) for _ in range(50)]  # one of them may take the freed id
    for m in masks:
        assert torch.equal(proc._mask(m, 6, 6, "cpu"), _dense_mask(m, 6, 6, "cpu")), id(m) == freed
