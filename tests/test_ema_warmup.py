"""EMA warm-up as the reference's ShardEMA ([I] item 6; ``far/utils/ema_util.py:71-83``, stepped from
``far/main.py:171-172`` with the 0-based count of finished steps): decay 0 — the shadow is the weights — for the
first ``warmup_steps`` updates, the configured decay afterwards."""

import pytest
import torch

from anyflow import config as C
from anyflow.profiles import PROFILES
from anyflow.train.common import Ema


def test_decay_is_zero_during_warmup_then_the_configured_decay():
    p = {"w": torch.nn.Parameter(torch.zeros(3))}
    ema = Ema(p, 0.9, warmup_steps=2)
    for step in range(2):
        with torch.no_grad():
            p["w"].fill_(float(step + 1))
        assert ema.current_decay() == 0.0
        ema.update(p)
        assert torch.equal(ema.shadow["w"], p["w"].detach())  # the shadow is the weights
    with torch.no_grad():
        p["w"].fill_(10.0)
    assert ema.current_decay() == 0.9
    ema.update(p)
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 0.9 * 2.0 + 0.1 * 10.0))


def test_no_warmup_is_the_plain_ema():
    p = {"w": torch.nn.Parameter(torch.ones(2))}
    ema = Ema(p, 0.5)
    with torch.no_grad():
        p["w"].fill_(3.0)
    ema.update(p)
    torch.testing.assert_close(ema.shadow["w"], torch.full((2,), 2.0))


def test_resume_keeps_the_update_count():
    p = {"w": torch.nn.Parameter(torch.zeros(1))}
    a = Ema(p, 0.9, warmup_steps=3)
    a.update(p)
    a.update(p)
    b = Ema(p, 0.9, warmup_steps=3)
    b.load_state_dict(a.state_dict())
    assert b.updates == 2 and b.current_decay() == 0.0
    b.update(p)
    assert b.current_decay() == 0.9
    with pytest.raises(ValueError, match="EMA"):
        b.load_state_dict({"decay": 0.9, "shadow": {"w": torch.zeros(1)}})  # written before the warm-up existed


def test_negative_warmup_is_rejected_by_name():
    with pytest.raises(C.ConfigError, match="stage2.optim.ema_warmup_steps"):
        C.build({"stage2": {"optim": {"ema_warmup_steps": -1}}})
    with pytest.raises(C.ConfigError, match="stage1.optim.ema_warmup_steps"):
        C.build({"stage1": {"optim": {"ema_warmup_steps": -5}}})
    with pytest.raises(ValueError, match="ema_warmup_steps"):
        Ema({}, 0.9, warmup_steps=-1)


def test_wan_profiles_carry_the_reference_warmups():
    for name in ("wan-1.3b", "wan-14b"):
        cfg = PROFILES[name]()
        assert cfg.stage1.optim.ema_warmup_steps == 1000 and cfg.stage2.optim.ema_warmup_steps == 200


def test_trainers_pass_the_configured_warmup(tiny_wan):
    """Stage 2's student EMA follows stage2.optim.ema_warmup_steps: after one generator step inside the warm-up
    the EMA equals the updated student exactly."""
    from dataclasses import replace

    from test_stage2 import CFG, NEG, build, data_fn

    from anyflow.train.stage2 import Stage2Trainer

    cfg = replace(CFG, stage2=replace(CFG.stage2, optim=replace(CFG.stage2.optim, ema_warmup_steps=2)))
    trainer = Stage2Trainer(build(tiny_wan), cfg, data_fn, NEG)
    assert trainer.ema.warmup_steps == 2
    trainer.generator_step()
    assert all(torch.equal(trainer.ema_state()[n], p.detach()) for n, p in trainer.student.items())


def test_stage1_trainer_passes_the_configured_warmup():
    from dataclasses import replace

    from stage1_fixtures import CFG, make_trainer

    cfg = replace(CFG, stage1=replace(CFG.stage1, optim=replace(CFG.stage1.optim, ema_warmup_steps=3)))
    trainer = make_trainer(None, cfg)
    assert trainer.ema.warmup_steps == 3
    trainer.train(1, progress=False)
    assert all(torch.equal(trainer.ema_state()[n], p.detach().cpu()) for n, p in trainer.params.items())
