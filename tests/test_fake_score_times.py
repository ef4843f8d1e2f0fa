"""The fake score trains at the noise levels DMD queries it at ([I] item 1, DESIGN §3 "Stage 2").

DMD queries both scores at ``t' = clamp(shift(U), renoise_min, renoise_max)`` (reference
``trainer_wan_anyflow_onpolicy.py:181-183``). A fake score trained elsewhere (it was ``sigmoid(N(0, 1))``, unshifted:
8 % of its training above t = 0.8 against 56 % of the queries at shift 5) is the unguided teacher where it is asked,
and DMD then pushes the bare CFG direction. The trainers' own draws are recorded here (the scores and the rollout
stubbed, so the test costs no model) and compared as distributions."""

from types import SimpleNamespace

import pytest
import torch

import anyflow.train.stage2 as st2
from anyflow.config import Config
from anyflow.objectives.dmd import DMDOut
from anyflow.objectives.simulation import time_shift

B = 20_000


@pytest.fixture
def recorded(monkeypatch):
    seen = {}

    def fake_score_loss(fake_v, x0, eps, t_B):
        seen["train"] = t_B.clone()
        return torch.zeros(())

    def generator_dmd_loss(x_hat, real_v, fake_v, t_prime, eps):
        seen["query"] = t_prime.clone()
        return DMDOut(torch.zeros(()), 0.0, t_prime)

    monkeypatch.setattr(st2, "fake_score_loss", fake_score_loss)
    monkeypatch.setattr(st2, "generator_dmd_loss", generator_dmd_loss)
    monkeypatch.setattr(st2, "use_adapter", lambda *a, **k: None)
    cfg = Config()  # toy: flow_shift 5, renoise in [0.02, 0.98]
    batch = SimpleNamespace(latents=torch.zeros(B, 1, 1, 1, 1), prompt_embeds=torch.zeros(B, 1, 1),
                            index=torch.arange(B))
    rollout = st2.Rollout(model=None, simulate=lambda noise, text, n, k, trainable: noise)
    st2.generator_loss(None, cfg, batch, torch.zeros(1, 1, 1), torch.Generator().manual_seed(1), rollout=rollout)
    st2.fake_loss(None, cfg, batch, torch.Generator().manual_seed(2), rollout=rollout)
    return cfg, seen["query"], seen["train"]


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov–Smirnov statistic sup |F_a − F_b|."""
    grid = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, grid, right=True) / a.numel()
    fb = torch.searchsorted(b.sort().values, grid, right=True) / b.numel()
    return float((fa - fb).abs().max())


def test_fake_score_training_times_share_the_query_distribution(recorded):
    cfg, query, train = recorded
    # 1.95·sqrt(2/B) ≈ 0.02 is the KS critical value at α = 0.001; logit-normal vs shift(U) is ≈ 0.5 apart
    assert ks(query, train) < 0.025
    assert abs(float((train > 0.8).float().mean()) - float((query > 0.8).float().mean())) < 0.02


def test_query_and_training_times_are_the_references_shifted_clamped_uniform(recorded):
    cfg, query, train = recorded
    s2 = cfg.stage2
    for t in (query, train):
        assert float(t.min()) >= s2.renoise_min - 1e-6 and float(t.max()) <= s2.renoise_max + 1e-6
        # shift(U) has median shift(0.5) = 5/6 at shift 5 and P(t > 0.8) = 1 − 0.8/(5 − 4·0.8) = 0.556
        assert abs(float(t.median()) - float(time_shift(torch.tensor(0.5), cfg.model.flow_shift))) < 0.01
        assert abs(float((t > 0.8).float().mean()) - (1 - 0.8 / 1.8)) < 0.015


def test_the_other_fake_score_laws_are_what_they_say():
    """``stage2.fake_times`` for README's ablation: ``logit_normal`` is the earlier (unshifted) law — median 0.5,
    8 % above t = 0.8 — and ``reference`` NVlabs/AnyFlow's shift(sigmoid(N(0, 1))): median shift(0.5) = 5/6 like the
    query, but P(t > 0.8) 0.59 (a KS distance from the query well beyond noise); an unknown law names the field."""
    from anyflow.objectives.dmd import fake_score_time

    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    query = fake_score_time(B, 5.0, 0.02, 0.98, g(), "query")
    old = fake_score_time(B, 5.0, 0.02, 0.98, g(), "logit_normal")
    ref = fake_score_time(B, 5.0, 0.02, 0.98, g(), "reference")
    assert abs(float(old.median()) - 0.5) < 0.01 and abs(float((old > 0.8).float().mean()) - 0.084) < 0.01
    assert abs(float(ref.median()) - 5 / 6) < 0.01 and abs(float((ref > 0.8).float().mean()) - 0.59) < 0.015
    assert ks(query, old) > 0.4 and 0.03 < ks(query, ref) < 0.2
    with pytest.raises(ValueError, match="stage2.fake_times"):
        fake_score_time(4, 5.0, 0.02, 0.98, g(), "uniform")
