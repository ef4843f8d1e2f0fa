"""Backward simulation against closed forms (DESIGN §3 "Stage 2"): exact Gaussian flow maps, gradient paths, cost."""

import pytest
import torch

from anyflow.objectives.simulation import (consistency_backward_simulation, draw_rollout, euler_sample,
                                           flowmap_backward_simulation, sampling_grid)

MU, S = 1.5, 0.5  # data x0 ~ N(MU, S²) per coordinate; z_t = (1 − t)·x0 + t·ε


def sigma(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def exact_flow_map_u(z, t, r):
    """Average velocity of the exact probability-flow map of Gaussian data: the standardised coordinate
    w = (z − (1 − t)·MU)/σ_t is constant along trajectories, so z_r = (1 − r)·MU + σ_r·w."""
    t_, r_ = t.view(-1, 1), r.view(-1, 1)
    w = (z - (1 - t_) * MU) / sigma(t_)
    z_r = (1 - r_) * MU + sigma(r_) * w
    dt = t_ - r_
    v_inst = -MU + (t_ - (1 - t_) * S**2) / sigma(t_) ** 2 * (z - (1 - t_) * MU)  # d/dt along the trajectory
    return torch.where(dt.abs() > 1e-12, (z - z_r) / torch.where(dt.abs() > 1e-12, dt, torch.ones_like(dt)), v_inst)


def exact_endpoint(noise):
    return MU + sigma(torch.tensor(0.0)) * noise  # w = ε at t = 1 (σ_1 = 1)


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_three_jumps_with_exact_map_equal_n_step_trajectory_and_ode_solution(n):
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sequential = euler_sample(exact_flow_map_u, noise, n, shift=5.0)  # N-step flow-map sampler endpoint
    for k in range(n):
        out = flowmap_backward_simulation(exact_flow_map_u, noise, n, k, shift=5.0)
        torch.testing.assert_close(out, sequential, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sequential, exact_endpoint(noise), rtol=1e-10, atol=1e-10)


def test_euler_endpoint_with_instantaneous_velocity():
    """With r ignored (u = instantaneous velocity) the sampler is Euler: exact for straight paths (point-mass data,
    v = (z − c)/t), and converging to the flow-map endpoint for curved ones."""
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = 0.7
    straight = lambda z, t, r: (z - c) / t.view(-1, 1).clamp_min(1e-12)  # noqa: E731 (t = 0: zero-length jump)
    for n in (1, 3, 8):
        torch.testing.assert_close(euler_sample(straight, noise, n, 5.0), torch.full_like(noise, c))
        for k in range(n):
            torch.testing.assert_close(flowmap_backward_simulation(straight, noise, n, k, 5.0),
                                       torch.full_like(noise, c))
    inst = lambda z, t, r: exact_flow_map_u(z, t, t)  # noqa: E731
    errs = [float((euler_sample(inst, noise, n, 3.0) - exact_endpoint(noise)).abs().max()) for n in (4, 16, 64)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.3 * errs[1]


class Counting:
    """u(z, t, r) = a_i·W·z at its i-th call: gradient w.r.t. each a_i says whether that call reaches the output."""

    def __init__(self, num_calls: int):
        self.w = torch.nn.Parameter(torch.eye(3) + 0.1 * torch.randn(3, 3, generator=torch.Generator().manual_seed(2)))
        self.a = [torch.ones((), requires_grad=True) for _ in range(num_calls)]
        self.calls = 0

    def __call__(self, z, t, r):
        out = self.a[self.calls] * (z @ self.w)
        self.calls += 1
        return out


@pytest.mark.parametrize("n,k", [(4, 1), (16, 7), (50, 48)])
def test_gradients_flow_through_all_three_jumps(n, k):
    u = Counting(3)
    out = flowmap_backward_simulation(u, torch.randn(2, 3, generator=torch.Generator().manual_seed(3)), n, k, 5.0)
    assert u.calls == 3  # cost flat in N
    grads = torch.autograd.grad(out.square().sum(), [*u.a, u.w])
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_consistency_simulation_cost_and_truncated_gradient():
    n, k = 8, 5
    u = Counting(n)
    gen = torch.Generator().manual_seed(4)
    out = consistency_backward_simulation(u, torch.randn(2, 3, generator=gen), n, k, 5.0, generator=gen)
    assert u.calls == k + 1  # cost linear in the exit step
    assert out.requires_grad
    grads = torch.autograd.grad(out.square().sum(), u.a, allow_unused=True)
    assert grads[k] is not None and float(grads[k].abs()) > 0
    assert all(g is None for g in grads[:k])  # earlier steps are simulated without gradient


def test_consistency_simulation_exact_for_point_mass():
    """x0-predict of the exact (point-mass) velocity is exact at every step, so any exit step returns c."""
    c = -0.3
    u = lambda z, t, r: (z - c) / t.view(-1, 1)  # noqa: E731
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    for k in range(4):
        out = consistency_backward_simulation(u, noise, 4, k, 5.0, generator=gen)
        torch.testing.assert_close(out, torch.full_like(noise, c))


def test_grid_and_rollout_draws():
    tau = sampling_grid(4, 5.0)
    assert float(tau[0]) == 1.0 and float(tau[-1]) == 0.0 and bool((tau[1:] < tau[:-1]).all())
    torch.testing.assert_close(tau[2], torch.tensor(5 * 0.5 / (1 + 4 * 0.5)))
    draws = [draw_rollout((2, 4, 8), torch.Generator().manual_seed(s)) for s in range(200)]
    assert {n for n, _ in draws} == {2, 4, 8} and all(0 <= k < n for n, k in draws)
    assert draws == [draw_rollout((2, 4, 8), torch.Generator().manual_seed(s)) for s in range(200)]
    assert {k for n, k in draws if n == 8} == set(range(8))
