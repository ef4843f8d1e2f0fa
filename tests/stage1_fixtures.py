"""A tiny stage-1 setup shared by tests/test_stage1.py and its DDP worker: random tiny Wan teacher → student with a
rank-4 LoRA, an in-memory dataset of 16 latents, a FlowMapTrainer with global batch 4."""

from dataclasses import replace

import torch

from anyflow.config import Config, Optim, Stage1, Student
from anyflow.data.shards import Batch
from conftest import make_tiny_wan

STUDENT_CFG = Student(lora_rank=4, lora_alpha=4.0)
CFG = replace(Config(), student=STUDENT_CFG,
              stage1=replace(Stage1(), batch_size=4, ckpt_every=2, log_every=1,
                             optim=Optim(lr=1e-2, warmup_steps=2, ema_decay=0.9)))


def tiny_teacher():
    return make_tiny_wan()


def dataset(n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(11)
    return Batch(latents=torch.randn(n, 8, 5, 8, 8, generator=g), noise=torch.randn(n, 8, 5, 8, 8, generator=g),
                 prompt_embeds=torch.randn(n, 8, 64, generator=g), prompts=[f"p{i}" for i in range(n)],
                 index=torch.arange(n))


def make_trainer(ckpt_dir, cfg: Config = CFG, teacher=None):
    from anyflow.models.student import add_lora, student_from_teacher
    from anyflow.train.stage1 import FlowMapTrainer

    torch.set_num_threads(1)
    data = dataset()
    model = student_from_teacher(teacher if teacher is not None else tiny_teacher(), cfg.student)
    torch.manual_seed(1)  # peft draws LoRA A from the global RNG
    add_lora(model, cfg.student, "student")

    def data_fn(generator):
        idx = torch.randint(data.latents.shape[0], (cfg.stage1.batch_size,), generator=generator)
        return Batch(latents=data.latents[idx], noise=data.noise[idx], prompt_embeds=data.prompt_embeds[idx],
                     prompts=[data.prompts[int(i)] for i in idx], index=idx)

    return FlowMapTrainer(model, cfg, data_fn, torch.zeros(1, 8, 64), cfg.stage1.optim, ckpt_dir,
                          cfg.stage1.ckpt_every, cfg.stage1.seed)
