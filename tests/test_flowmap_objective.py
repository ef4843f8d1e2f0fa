"""Stage-1 objective against closed forms.

The analytic field: Gaussian data x0 ~ N(μ, s²) per coordinate. Then z_t = (1 − t)·x0 + t·ε is Gaussian with mean
m_t = (1 − t)·μ and std σ_t = sqrt((1 − t)²s² + t²); the probability-flow ODE maps standardised values to
standardised values, so the flow map is f(z, t, r) = m_r + (σ_r/σ_t)(z − m_t), the marginal velocity is
v(z, t) = m_t' + (σ_t'/σ_t)(z − m_t), and the mean velocity u = (z − f)/(t − r). Along the ODE, (t − r)·u = z_t − z_r
with z_r fixed, so dF/dt = (v − u)/(t − r) exactly.
"""

import math

import pytest
import torch

from anyflow.config import Stage1
from anyflow.objectives import flowmap as fm
from anyflow.objectives.simulation import time_shift

MU, S = 0.7, 0.4


def m(t):
    return (1 - t) * MU


def sig(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def flow(z, t, r):
    return m(r) + sig(r) / sig(t) * (z - m(t))


def v_marginal(z, t):
    dsig = (-(1 - t) * S**2 + t) / sig(t)
    return -MU + dsig / sig(t) * (z - m(t))


def u_true(z, t, r):
    tb, rb = (x.reshape(-1, *([1] * (z.ndim - 1))) for x in (t, r))
    same = (tb - rb).abs() < 1e-12
    return torch.where(same, v_marginal(z, tb), (z - flow(z, tb, rb)) / torch.where(same, 1.0, tb - rb))


@pytest.fixture
def point():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, 2, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.95, 0.8, 0.6, 0.5, 0.35, 0.2], dtype=torch.float64)
    r = torch.tensor([0.0, 0.3, 0.1, 0.45, 0.0, 0.05], dtype=torch.float64)
    return z, t, r


def _derivative_error(point, method, eps=0.005):
    z, t, r = point
    tb = t.reshape(-1, 1, 1, 1)
    v = v_marginal(z, tb)
    dfdt = fm.total_derivative(lambda zz, tt: u_true(zz, tt, r), z, t, v, method, eps=eps)
    exact = (v - u_true(z, t, r)) / (tb - r.reshape(-1, 1, 1, 1))
    assert exact.abs().max() > 1  # non-trivial
    return float((dfdt - exact).abs().max() / exact.abs().max())


def test_jvp_derivative_is_exact(point):
    assert _derivative_error(point, "jvp") < 1e-12


def test_central_difference_is_second_order(point):
    """The reference ε = 0.005 is accurate to ~1e-4 relative, and halving ε quarters the error (O(ε²): the
    straight-line probe z ± εv misses the trajectory's curvature only at second order)."""
    e1, e2 = _derivative_error(point, "central", 0.005), _derivative_error(point, "central", 0.0025)
    assert e1 < 2e-4
    assert 3.5 < e1 / e2 < 4.5


@pytest.mark.parametrize("method", ["jvp", "central"])
def test_meanflow_target_is_the_true_mean_velocity(point, method):
    """With the exact flow map as student and the marginal velocity as tangent, u_tgt = v − (t − r)·dF/dt = u."""
    z, t, r = point
    v = v_marginal(z, t.reshape(-1, 1, 1, 1))
    dfdt = fm.total_derivative(lambda zz, tt: u_true(zz, tt, r), z, t, v, method)
    target = fm.meanflow_target(dfdt, v, t, r)
    tol = 1e-9 if method == "jvp" else 1e-3  # central: O(ε²) error times (t − r) ≤ 1
    assert torch.allclose(target, u_true(z, t, r), atol=tol)
    # and the flow-map step with it lands on the ODE solution
    z_r = z - (t - r).reshape(-1, 1, 1, 1) * target
    assert torch.allclose(z_r, flow(z, t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)), atol=tol)


def test_fused_guidance_inverts_cfg():
    g = torch.Generator().manual_seed(1)
    v_c, v_u = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for w in (1.0, 3.0, 7.5):
        guided = v_u + w * (v_c - v_u)  # what the fused student outputs on the conditional text
        assert torch.allclose(fm.fuse_guidance(guided, v_u, w), v_c, atol=1e-5)
    # the unconditional branch is stop-gradient: gradients reach only u_c, scaled by 1/w
    u_c, u_u = v_c.clone().requires_grad_(True), v_u.clone().requires_grad_(True)
    fm.fuse_guidance(u_c, u_u, torch.full((4,), 3.0)).sum().backward()
    assert u_u.grad is None and torch.allclose(u_c.grad, torch.full_like(u_c, 1 / 3))


def test_split_by_global_index_is_rank_invariant():
    kinds = fm.split_kinds(torch.arange(16), 16, (0.5, 0.25, 0.25))
    assert kinds.tolist() == [0] * 8 + [1] * 4 + [2] * 4
    ranks = [fm.split_kinds(off + torch.arange(4), 16, (0.5, 0.25, 0.25)) for off in (0, 4, 8, 12)]
    assert torch.equal(torch.cat(ranks), kinds)
    with pytest.raises(ValueError, match="stage1.time_split"):
        fm.split_kinds(torch.arange(4), 4, (0.5, 0.5, 0.25))


def test_sample_times_kinds_and_shift():
    g = torch.Generator().manual_seed(2)
    tm = fm.sample_times(64, 5.0, (0.5, 0.25, 0.25), g)
    assert torch.allclose(tm.t, time_shift(tm.s, 5.0))
    assert torch.all(tm.r <= tm.t)
    assert torch.equal(tm.r[tm.kind == 0], tm.t[tm.kind == 0])
    assert torch.all(tm.r[tm.kind == 1] == 0)
    free = tm.kind == 2
    assert torch.all(tm.r[free] < tm.t[free]) and torch.all(tm.r[free] > 0)
    cons = fm.sample_times(8, 5.0, (0.5, 0.25, 0.25), g, paradigm="consistency")
    assert torch.all(cons.r == 0)


def test_max_of_two_uniforms_has_density_2s():
    g = torch.Generator().manual_seed(3)
    s = fm.sample_times(200_000, 1.0, (0, 0, 1), g).s
    assert abs(float(s.mean()) - 2 / 3) < 3e-3  # E[max(U, U)] = 2/3


def test_time_weights_match_their_definitions():
    s = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    for kind in ("beta08", "uniform"):
        assert abs(float(torch.trapezoid(fm.time_weight(s, kind), s)) - 1) < 1e-4  # densities on [0, 1]
    half = torch.tensor([0.5], dtype=torch.float64)
    assert math.isclose(float(fm.time_weight(half, "beta08")), 0.5 * math.sqrt(0.5) * 15 / 4, rel_tol=1e-9)
    assert math.isclose(float(fm.time_weight(half, "gaussian")), 1 / (0.25 * math.sqrt(2 * math.pi)), rel_tol=1e-9)
    gauss_mass = float(torch.trapezoid(fm.time_weight(s, "gaussian"), s))
    assert math.isclose(gauss_mass, math.erf(2 / math.sqrt(2)), rel_tol=1e-6)  # N(0.5, 0.25) mass on [0, 1]
    with pytest.raises(ValueError, match="stage1.weighting"):
        fm.time_weight(s, "cosine")


def test_adaptive_weights_hand_computed():
    per = torch.tensor([1.0, 3.0, 4.0, 0.5])
    kind = torch.tensor([0, 0, 1, 2])
    w = fm.adaptive_weights(per, kind, c=0.0)
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 2.0 / 4.0, 2.0 / 0.5]))
    assert torch.equal(fm.adaptive_weights(per, torch.tensor([1, 1, 2, 2]), 1e-5), torch.ones(4))


def test_stage1_loss_is_zero_for_the_exact_flow_map_on_a_point_mass():
    """Point-mass data (s = 0): the conditional tangent ε − x0 *is* the marginal velocity, so the exact flow map has
    zero loss under every (t, r) kind and both derivative methods, with guidance w = 1 (no text)."""
    global S
    old, S = S, 0.0
    try:
        x0 = torch.full((8, 2, 3, 2, 2), MU, dtype=torch.float64)
        text = torch.zeros(8, 1, 1, dtype=torch.float64)
        for method in ("central", "jvp"):
            s1 = Stage1(guidance_scale=1.0, text_dropout=0.0, derivative=method)
            out = fm.stage1_terms(lambda z, t, r, c: u_true(z, t, r), x0, text, text[:1], s1, "flowmap", 3.0,
                                  torch.Generator().manual_seed(4))
            assert float(out.loss) < 1e-8, (method, out.parts)
            wrong = fm.stage1_terms(lambda z, t, r, c: 1.1 * u_true(z, t, r), x0, text, text[:1], s1, "flowmap", 3.0,
                                    torch.Generator().manual_seed(4))
            assert float(wrong.loss) > 1e-3
    finally:
        S = old


def test_teacher_velocity_target_makes_the_exact_flow_map_a_zero_of_the_loss_on_spread_data():
    """Spread data (s > 0): ε − x0 is only the marginal velocity in expectation, so even the exact flow map has a
    positive loss under the data target; with the teacher's (here: the exact marginal) velocity as target, the r = t
    target and the dF/dt tangent are exact and the exact flow map scores zero, while a wrong one does not."""
    g = torch.Generator().manual_seed(5)
    x0 = MU + S * torch.randn(8, 2, 3, 2, 2, generator=g, dtype=torch.float64)
    text = torch.zeros(8, 1, 1, dtype=torch.float64)
    v_teacher = lambda z, t, c: v_marginal(z, t.reshape(-1, *([1] * (z.ndim - 1))))  # noqa: E731
    for method in ("central", "jvp"):
        s1 = Stage1(guidance_scale=1.0, text_dropout=0.0, derivative=method, velocity_target="teacher")
        exact = fm.stage1_terms(lambda z, t, r, c: u_true(z, t, r), x0, text, text[:1], s1, "flowmap", 3.0,
                                torch.Generator().manual_seed(4), v_teacher=v_teacher)
        data = fm.stage1_terms(lambda z, t, r, c: u_true(z, t, r), x0, text, text[:1], s1, "flowmap", 3.0,
                               torch.Generator().manual_seed(4))
        wrong = fm.stage1_terms(lambda z, t, r, c: 1.1 * u_true(z, t, r), x0, text, text[:1], s1, "flowmap", 3.0,
                                torch.Generator().manual_seed(4), v_teacher=v_teacher)
        assert float(exact.loss) < 1e-6, (method, exact.parts)
        assert float(data.loss) > 1e-2  # the noisy target the teacher target removes
        assert float(wrong.loss) > 1e-3
