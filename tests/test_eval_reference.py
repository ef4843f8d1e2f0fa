"""The students' evaluation reference (the teacher's CFG samples of the shards' first noises) is sampled once: stage 1
stores it beside its adapters, stage 2 reads it — only while it is a sample of the same teacher, inputs and settings,
otherwise it is sampled afresh, never silently reused."""

from types import SimpleNamespace

import torch

from anyflow.config import build
from anyflow.models.teacher import teacher_ode_sample
from anyflow.stages.common import eval_reference
from conftest import make_tiny_wan


def _data(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(noise=torch.randn(n, 8, 2, 4, 4, generator=g),
                           latents=torch.randn(n, 8, 2, 4, 4, generator=g), prompt_embeds=torch.randn(n, 6, 64, generator=g))


def test_stored_reference_is_reused_only_for_the_same_teacher_inputs_and_settings(tmp_path):
    cfg = build({"synthesize": {"steps": 3, "guidance_scale": 1.0}})
    teacher, data, neg = make_tiny_wan(), _data(0), torch.randn(1, 6, 64)
    store = tmp_path / "eval_reference.safetensors"
    direct = teacher_ode_sample(teacher, data.noise[:2], data.prompt_embeds[:2], neg, 3, 5.0, cfg.model.flow_shift,
                                guidance_min_t=cfg.model.guidance_min_t)

    first = eval_reference(cfg, teacher, data, neg, 2, 5.0, store=store, write=True)
    torch.testing.assert_close(first, direct, rtol=0, atol=0)
    assert store.is_file()
    # a read of the stored file, not a new sample: poison the file's tensor and keep its metadata
    from safetensors import safe_open

    from anyflow.utils.io import write_safetensors

    with safe_open(str(store), "pt") as f:
        key = f.metadata()
    write_safetensors(store, {"latents": torch.full_like(first, 7.0)}, metadata=key)
    assert torch.all(eval_reference(cfg, teacher, data, neg, 2, 5.0, store=store) == 7.0)
    # anything the samples depend on differs: sampled afresh (and the file left alone without write)
    other_teacher = make_tiny_wan()
    with torch.no_grad():
        other_teacher.proj_out.bias.add_(0.1)
    for args in [(teacher, data, neg, 2, 4.0), (teacher, data, neg, 1, 5.0), (teacher, _data(1), neg, 2, 5.0),
                 (teacher, data, neg + 1, 2, 5.0), (other_teacher, data, neg, 2, 5.0)]:
        got = eval_reference(cfg, *args, store=store)
        assert not torch.any(got == 7.0)
    cfg4 = build({"synthesize": {"steps": 4, "guidance_scale": 1.0}})
    assert not torch.any(eval_reference(cfg4, teacher, data, neg, 2, 5.0, store=store) == 7.0)
    for min_t in (0.0, 0.3):  # another guidance interval is another reference (0: guidance at every step)
        other = build({"synthesize": {"steps": 3, "guidance_scale": 1.0}, "model": {"guidance_min_t": min_t}})
        assert other.model.guidance_min_t != cfg.model.guidance_min_t
        assert not torch.any(eval_reference(other, teacher, data, neg, 2, 5.0, store=store) == 7.0)
    assert torch.all(eval_reference(cfg, teacher, data, neg, 2, 5.0, store=store) == 7.0)
    # at the data's own scale the shard latents are the reference, no sampling
    assert torch.equal(eval_reference(cfg, teacher, data, neg, 2, 1.0, store=store), data.latents[:2])
