"""Stage-1 loss weighting as the reference ([I] items 3 and 4; ``trainer_wan_anyflow_pretrain.py:310-320``):

    loss_i = mean((pred − target)²)                         # ℓ_i
    loss_i = loss_i · get_train_weight(t_i)                 # λ at the SHIFTED t (the scheduler's shifted grid)
    scale  = sg(mean_{r=t} loss / (loss_i + 1e-5))          # μ_λ over the λ-weighted r = t losses
    loss_i ← loss_i · scale            for r ≠ t
    loss   = mean_i loss_i

Setup with a known per-sample error: point-mass data x0 ≡ μ, where the exact flow map is u(z, t, r) = (z − μ)/t
(its stage-1 target is itself, for both derivative methods). The model under test adds the sample's text value a_i,
so ℓ_i = a_i² exactly; the (t, r) draws are replayed from the same generator (float32 times, hence rtol 1e-6)."""

import pytest
import torch

from anyflow.config import Stage1
from anyflow.objectives import flowmap as fm

MU = 0.7
A = torch.tensor([0.3, 0.5, 0.8, 1.1, 0.2, 0.9, 1.5, 0.4], dtype=torch.float64)  # 4 r = t, 2 r = 0, 2 free


def run(shift, split, weighting="beta08", seed=4, c=1e-5, **switches):
    b = A.numel()
    x0 = torch.full((b, 1, 2, 2, 2), MU, dtype=torch.float64)
    text = A.clone().reshape(b, 1, 1).requires_grad_(True)
    s1 = Stage1(guidance_scale=1.0, text_dropout=0.0, time_split=split, weighting=weighting, adaptive_c=c,
                **switches)

    def u(z, t, r, txt):
        tb = t.reshape(-1, *([1] * (z.ndim - 1)))
        return (z - MU) / tb + txt.reshape(-1, *([1] * (z.ndim - 1)))

    out = fm.stage1_terms(u, x0, text, torch.zeros(1, 1, 1, dtype=torch.float64), s1, "flowmap", shift,
                          torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad(out.loss, text)
    ua, ub, _, _ = fm.draw(x0, torch.Generator().manual_seed(seed))
    times = fm.sample_times(b, shift, split, None, "flowmap", 0, b, uniforms=(ua, ub))
    return out, grad.reshape(-1), times


def reference(times, weighting="beta08", c=1e-5):
    """The reference's loss and its gradient w.r.t. a_i, written out."""
    lam = fm.time_weight(times.t.double(), weighting)  # at the shifted t
    ell = A**2
    weighted = lam * ell
    diff = times.kind == fm.KIND_DIFFUSION
    mu = weighted[diff].mean()
    scale = torch.where(diff, torch.ones_like(weighted), mu / (weighted + c))  # sg: a constant below
    loss = (scale * weighted).mean()
    grad = scale * lam * 2 * A / A.numel()
    return loss, grad


def test_time_weight_is_evaluated_at_the_shifted_time():
    """All r = t (no adaptive weight): loss = mean λ(shift(s))·ℓ — not λ at the unshifted draw s."""
    out, grad, times = run(5.0, (1.0, 0.0, 0.0))
    assert not torch.allclose(times.t, times.s)  # shift 5 moves every draw
    lam_t = fm.time_weight(times.t.double(), "beta08")
    torch.testing.assert_close(out.loss, (lam_t * A**2).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, lam_t * 2 * A / A.numel(), rtol=1e-6, atol=0)


def test_beta08_weight_peaks_at_two_thirds_of_the_shifted_time():
    """λ ∝ t·(1 − t)^0.5 peaks at t = 2/3 on the time the model sees (the reference's grid is shifted)."""
    t = torch.linspace(0.0, 1.0, 30_001, dtype=torch.float64)
    assert abs(float(t[fm.time_weight(t, "beta08").argmax()]) - 2 / 3) < 1e-4


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_adaptive_weight_rescales_the_lambda_weighted_loss_as_the_reference(shift):
    """The adaptive weight is sg(μ_λ / (λ_i·ℓ_i + c)) with μ_λ the mean λ-weighted r = t loss, applied to the
    λ-weighted loss — at shift 1 too, where λ's argument is the same either way, so this is the weighting alone."""
    out, grad, times = run(shift, (0.5, 0.25, 0.25))
    assert (times.kind == fm.KIND_DIFFUSION).sum() == 4 and (times.kind != fm.KIND_DIFFUSION).sum() == 4
    loss, g = reference(times)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, g, rtol=1e-6, atol=0)  # the scale is a stop-gradient


def test_every_r_ne_t_sample_contributes_the_r_eq_t_mean():
    """A consequence of the reference's form: with c → 0 each r ≠ t sample's weighted loss is rescaled to exactly
    μ_λ, so the loss equals μ_λ whatever λ_i — unlike a weight computed on the unweighted ℓ_i."""
    out, _, times = run(5.0, (0.5, 0.25, 0.25), c=0.0)
    diff = times.kind == fm.KIND_DIFFUSION
    mu_lam = (fm.time_weight(times.t.double(), "beta08") * A**2)[diff].mean()
    torch.testing.assert_close(out.loss, mu_lam, rtol=1e-6, atol=0)


def test_the_ablation_switches_give_the_earlier_weighting():
    """README's ablation reverts items 3 and 4 with ``stage1.weight_time: unshifted`` and ``stage1.adaptive_on:
    unweighted``; written out, the code before issue [I] was loss = mean(λ(s_i)·a_i·ℓ_i) with λ at the unshifted draw
    s and a_i = sg(μ_ℓ / (ℓ_i + c)) on the bare MSE (μ_ℓ the mean r = t MSE) — and it differs from the default."""
    out, grad, times = run(5.0, (0.5, 0.25, 0.25), weight_time="unshifted", adaptive_on="unweighted")
    lam = fm.time_weight(times.s.double(), "beta08")
    ell = A**2
    diff = times.kind == fm.KIND_DIFFUSION
    scale = torch.where(diff, torch.ones_like(ell), ell[diff].mean() / (ell + 1e-5))
    torch.testing.assert_close(out.loss, (lam * scale * ell).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, lam * scale * 2 * A / A.numel(), rtol=1e-6, atol=0)
    default, _, _ = run(5.0, (0.5, 0.25, 0.25))
    assert abs(float(default.loss.detach()) - float(out.loss.detach())) > 0.05 * float(default.loss.detach())
