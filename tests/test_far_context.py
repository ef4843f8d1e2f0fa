"""FAR far context in training (issue I, item 8): with a ``chunk_partition`` longer than ``full_chunk_limit`` the
training forward feeds the first chunks through the compressed far context (``far_patch_embedding``) exactly as
chunk-by-chunk generation with the KV cache does, the adapter trains ``far_patch_embedding`` in full (as the
reference's ``param_names_to_optimize``), stage 1 and stage 2 train it, and it survives save / load / EMA / merge."""

from dataclasses import replace

import pytest
import torch

from anyflow.config import Student
from anyflow.models.far import (_per_frame, _rollout, far_cached_chunk_velocity, far_generate, far_recompute_chunk,
                                far_velocity)
from anyflow.models.student import (adapter_parameters, add_lora, load_adapter, save_adapter, state_to_peft_keys,
                                    student_from_teacher, unwrap_full_modules)
from conftest import make_tiny_wan
from test_far import randomise_lora

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

# latents (B, C=8, F=5, H=8, W=8); 4 chunks, 2 at full resolution: chunk 2 sees chunk 0 compressed, chunk 3 sees
# chunks 0-1 compressed (the toy FAR pipeline's setting, far/dvc.yaml)
PART = (1, 1, 1, 2)
BOUNDS = (0, 1, 2, 3, 5)
LONG = Student(architecture="far", lora_rank=4, lora_alpha=4.0, chunk_partition=PART, full_chunk_limit=2)
SHORT = replace(LONG, full_chunk_limit=4)  # same chunks, far context unused
FAR_W, FAR_B = "far_patch_embedding.modules_to_save.student.weight", "far_patch_embedding.modules_to_save.student.bias"


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_wan()


def far_student(teacher, scfg=LONG, far_seed=4):
    """FAR student with a random LoRA and (with far context) a perturbed trained far_patch_embedding copy, so
    that a forward that skipped the copy, or the far context, would differ."""
    model = student_from_teacher(teacher, scfg)
    torch.manual_seed(1)
    add_lora(model, scfg)
    randomise_lora(model)
    params = adapter_parameters(model)
    if far_seed is not None and FAR_W in params:
        g = torch.Generator().manual_seed(far_seed)
        with torch.no_grad():
            params[FAR_W].add_(0.05 * torch.randn(params[FAR_W].shape, generator=g))
    return model


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z, x0, text = (torch.randn(2, 8, 5, 8, 8, generator=g), torch.randn(2, 8, 5, 8, 8, generator=g),
                   torch.randn(2, 8, 64, generator=g))
    t = torch.tensor([[0.9, 0.6, 0.3, 0.8], [0.7, 0.5, 0.2, 0.4]])
    return z, x0, text, t, torch.tensor([[0.4, 0.0, 0.1, 0.3], [0.7, 0.2, 0.0, 0.1]])


def test_only_a_partition_longer_than_the_limit_trains_far_patch_embedding(teacher):
    long, short = far_student(teacher), far_student(teacher, SHORT)
    assert {FAR_W, FAR_B} <= set(adapter_parameters(long))
    assert not any("far_patch" in n for n in adapter_parameters(short))
    assert all(p.requires_grad == (n in adapter_parameters(long)) for n, p in long.named_parameters())
    # the copy starts as the base embedding (the teacher's kernel average-pooled over the compressed patch)
    fresh = student_from_teacher(teacher, LONG)
    add_lora(fresh, LONG)
    base = fresh.far_patch_embedding.original_module
    assert torch.equal(adapter_parameters(fresh)[FAR_W], base.weight)


def test_training_forward_is_generation_for_every_chunk_with_far_context(teacher):
    """(a) far_velocity with teacher forcing on 4 chunks, limit 2: every chunk's output equals its velocity in
    chunk-by-chunk generation — the KV cache filled with the clean earlier chunks (compressed far context
    included), and the recomputed [clean prefix, noisy chunk] forward. One diffusers forward over all chunks (the
    reference's pretrain forward) is generation's view only for the last chunk."""
    model = far_student(teacher)
    z, x0, text, t, r = inputs()
    with torch.no_grad():
        tf = far_velocity(model, z, t, r, text, clean=x0)
        for k in range(len(PART)):
            lo, hi = BOUNDS[k], BOUNDS[k + 1]
            cached = far_cached_chunk_velocity(model, text, PART[:k + 1], x0[:, :, :lo])(z[:, :, lo:hi], t[:, k],
                                                                                          r[:, k])
            recomputed = far_recompute_chunk(model, text, PART[:k + 1], x0[:, :, :lo])(z[:, :, lo:hi], t[:, k],
                                                                                       r[:, k])
            assert float(cached.abs().max()) > 0.5
            torch.testing.assert_close(tf[:, :, lo:hi], cached, rtol=0, atol=1e-5)
            torch.testing.assert_close(recomputed, cached, rtol=0, atol=1e-5)
        one = _rollout(model, z, _per_frame(t, 2, PART, "t"), _per_frame(r, 2, PART, "r"), text, list(PART), x0)
        assert one.shape[2] == 3  # chunks 2-3 at full resolution, chunks 0-1 far context without output
        torch.testing.assert_close(one[:, :, 1:], tf[:, :, 3:], rtol=0, atol=1e-5)
        assert float((one[:, :, :1] - tf[:, :, 2:3]).abs().max()) > 1e-2

        # chunk k depends on no other chunk's (z, t, r) (per-chunk MeanFlow derivatives stay per chunk)...
        z2, t2 = z.clone(), t.clone()
        z2[:, :, :3] += 1.0
        t2[:, :3] = 0.99
        other = far_velocity(model, z2, t2, r, text, clean=x0)
        torch.testing.assert_close(other[:, :, 3:], tf[:, :, 3:], rtol=0, atol=1e-6)
        # ...while chunk 0's clean latents reach chunk 3 only through the compressed far context
        x2 = x0.clone()
        x2[:, :, :1] += 1.0
        assert float((far_velocity(model, z, t, r, text, clean=x2)[:, :, 3:] - tf[:, :, 3:]).abs().max()) > 1e-3
        # and the adapter's far_patch_embedding copy is what encodes it: chunks 0-1 never use it, 2-3 do
        params = adapter_parameters(model)
        saved = params[FAR_W].clone()
        params[FAR_W].mul_(0.5)
        halved = far_velocity(model, z, t, r, text, clean=x0)
        params[FAR_W].copy_(saved)
        torch.testing.assert_close(halved[:, :, :2], tf[:, :, :2], rtol=0, atol=0)
        assert float((halved[:, :, 2:] - tf[:, :, 2:]).abs().max()) > 1e-3
        # without teacher forcing (no clean copy) chunk k is the recomputed forward of z's own chunks 0..k
        noisy = far_velocity(model, z, t, r, text)
        for k in range(len(PART)):
            lo, hi = BOUNDS[k], BOUNDS[k + 1]
            ts, rs = _per_frame(t, 2, PART, "t")[:, :hi], _per_frame(r, 2, PART, "r")[:, :hi]
            ref = model(hidden_states=z[:, :, :hi].permute(0, 2, 1, 3, 4), timestep=ts, r_timestep=rs,
                        encoder_hidden_states=text, chunk_partition=list(PART[:k + 1]), return_dict=False)[0]
            torch.testing.assert_close(noisy[:, :, lo:hi], ref[:, -(hi - lo):].permute(0, 2, 1, 3, 4), rtol=0,
                                       atol=1e-5)


def test_far_generate_with_far_context_uses_the_trained_embedding(teacher):
    """Generation (KV cache) = recomputation with far context, and it reads the adapter's far_patch_embedding."""
    model = far_student(teacher)
    _, _, text, _, _ = inputs(1)
    noise = torch.randn(2, 8, 5, 8, 8, generator=torch.Generator().manual_seed(6))
    cached = far_generate(model, noise, text, 2, 5.0)
    torch.testing.assert_close(cached, far_generate(model, noise, text, 2, 5.0, use_cache=False), rtol=0, atol=1e-5)
    with torch.no_grad():
        adapter_parameters(model)[FAR_W].zero_()
    other = far_generate(model, noise, text, 2, 5.0)
    torch.testing.assert_close(other[:, :, :2], cached[:, :, :2], rtol=0, atol=0)
    assert float((other[:, :, 2:] - cached[:, :, 2:]).abs().max()) > 1e-3


def test_stage1_gradient_reaches_the_far_patch_embedding(teacher):
    """(b) The stage-1 loss on the long partition reaches the adapter's far_patch_embedding copy (and every LoRA
    weight), never the base weights; with the same chunks but no far context it has nothing to reach."""
    from anyflow.objectives.flowmap import stage1_loss
    from stage1_fixtures import CFG, dataset

    for scfg in (LONG, SHORT):
        model = far_student(teacher, scfg)
        loss = stage1_loss(model, replace(CFG, student=scfg), dataset(4), torch.zeros(1, 8, 64),
                           torch.Generator().manual_seed(0))
        loss.backward()
        params = adapter_parameters(model)
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params.values()), scfg
        assert all(p.grad is None for n, p in model.named_parameters() if n not in params)
        assert (FAR_W in params) == (scfg is LONG)
    assert all(p.grad is None for p in teacher.parameters())


def test_stage1_steps_train_the_far_context_and_the_adapter_round_trips(teacher, tmp_path):
    """(c) FlowMapTrainer on the long partition: a few steps change the far_patch_embedding copy and the LoRA and
    lower the loss on a fixed batch; the adapter (and its EMA) saves with far_patch_embedding.*, loads into a fresh
    student to the same function, and merges (fuse_lora + unwrap_full_modules) into a plain model."""
    from anyflow.objectives.flowmap import stage1_loss
    from stage1_fixtures import CFG, dataset, make_trainer

    cfg = replace(CFG, student=LONG)
    trainer = make_trainer(tmp_path / "ckpt", cfg, teacher)
    bare, params = trainer.model, trainer.params  # one process: the model itself
    assert FAR_W in params and FAR_B in params
    before = {n: p.detach().clone() for n, p in params.items()}
    data = dataset(8)

    def fixed_loss():
        with torch.no_grad():
            return float(stage1_loss(bare, cfg, data, torch.zeros(1, 8, 64), torch.Generator().manual_seed(3)))

    start = fixed_loss()
    trainer.train(6, progress=False)
    assert float((params[FAR_W] - before[FAR_W]).abs().max()) > 1e-4
    assert float((params[FAR_B] - before[FAR_B]).abs().max()) > 1e-4
    assert all(not torch.equal(p, before[n]) for n, p in params.items() if "lora_B" in n)
    assert fixed_loss() < start
    assert not torch.equal(trainer.ema_state()[FAR_W], before[FAR_W])

    z, x0, text, t, r = inputs(2)
    path = save_adapter(bare, tmp_path / "far.safetensors")
    ema = save_adapter(bare, tmp_path / "ema.safetensors", state=state_to_peft_keys(bare, trainer.ema_state()))
    from safetensors.torch import load_file

    assert {"far_patch_embedding.weight", "far_patch_embedding.bias"} <= set(load_file(str(path)))
    assert torch.equal(load_file(str(ema))["far_patch_embedding.weight"], trainer.ema_state()[FAR_W])
    other = student_from_teacher(teacher, LONG)
    add_lora(other, LONG)
    load_adapter(other, path)
    with torch.no_grad():
        ref = far_velocity(bare, z, t, r, text, clean=x0)
        torch.testing.assert_close(far_velocity(other, z, t, r, text, clean=x0), ref, rtol=0, atol=0)
    other.fuse_lora(adapter_names=["student"])
    other.unload_lora()
    unwrap_full_modules(other)
    assert not any("lora_" in n or "modules_to_save" in n or "original_module" in n
                   for n in other.state_dict())
    assert torch.equal(other.far_patch_embedding.weight, params[FAR_W])
    with torch.no_grad():
        torch.testing.assert_close(far_velocity(other, z, t, r, text, clean=x0), ref, rtol=0, atol=2e-5)


def test_adapters_without_or_with_unexpected_far_embedding(teacher, tmp_path):
    """An adapter saved before far_patch_embedding trained (no such keys) loads into a long-partition student with
    the base embedding; an adapter that trained it refuses a student built without far context."""
    short = far_student(teacher, SHORT)
    old = save_adapter(short, tmp_path / "old.safetensors")
    long = student_from_teacher(teacher, LONG)
    add_lora(long, LONG)
    load_adapter(long, old)
    for n, p in adapter_parameters(short).items():
        assert torch.equal(adapter_parameters(long)[n], p)
    assert torch.equal(adapter_parameters(long)[FAR_W], long.far_patch_embedding.original_module.weight)
    trained = save_adapter(far_student(teacher), tmp_path / "new.safetensors")
    fresh = student_from_teacher(teacher, SHORT)
    add_lora(fresh, SHORT)
    with pytest.raises(ValueError, match="full_chunk_limit"):
        load_adapter(fresh, trained)


def test_stage2_generator_loss_reaches_the_far_patch_embedding(teacher):
    """Stage 2 on the long partition: the chunkwise backward simulation (chunks 2-3 through the far context) and
    the stage-1 term run, and the generator loss reaches the far_patch_embedding copy and the LoRA only."""
    from types import SimpleNamespace

    from anyflow.config import Config, Stage2
    from anyflow.stages.stage2 import stage1_fn_for
    from anyflow.train.stage2 import FAKE, STUDENT, far_rollout, generator_loss, use_adapter

    cfg = replace(Config(), student=LONG, stage2=replace(Stage2(), batch_size=2, num_steps_choices=(2, 4)))
    bidi = replace(LONG, architecture="bidirectional")
    scores = student_from_teacher(teacher, bidi)
    torch.manual_seed(1)
    add_lora(scores, bidi, FAKE)
    randomise_lora(scores, seed=5)
    far = far_student(teacher)
    g = torch.Generator().manual_seed(2)
    batch = SimpleNamespace(latents=torch.randn(2, 8, 5, 8, 8, generator=g),
                            prompt_embeds=torch.randn(2, 8, 64, generator=g), index=torch.arange(2))
    use_adapter(far, STUDENT, STUDENT)
    neg = torch.zeros(1, 8, 64)
    loss, parts = generator_loss(scores, cfg, batch, neg, g, lambda: stage1_fn_for(far, cfg, neg)(batch, g),
                                 far_rollout(far, cfg.model.flow_shift))
    loss.backward()
    params = adapter_parameters(far)
    assert parts["dmd_grad"] > 0 and parts["stage1"] > 0
    assert FAR_W in params and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params.values())
    assert [n for n, p in far.named_parameters() if n not in params and p.grad is not None] == []
