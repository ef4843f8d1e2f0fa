"""Any-step samplers against closed forms, and against diffusers' own AnyFlowPipeline loop."""

import pytest
import torch

from anyflow.objectives.simulation import time_shift
from anyflow.sampling import consistency_sample, flowmap_sample, model_velocity, schedule
from test_flowmap_objective import MU, flow, u_true, v_marginal


def test_schedule_is_the_shifted_uniform_grid():
    for n in (1, 2, 4, 7, 64):
        grid = schedule(n, 5.0)
        assert grid.shape == (n + 1,) and grid[0] == 1 and grid[-1] == 0
        torch.testing.assert_close(grid, time_shift(1 - torch.arange(n + 1, dtype=torch.float64) / n, 5.0))
    with pytest.raises(ValueError, match="steps"):
        schedule(0, 5.0)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_exact_flow_map_is_exact_at_every_step_count(n):
    """With the true mean velocity, N flow-map jumps land on the ODE solution for any N (no discretisation)."""
    noise = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = flow(noise, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    out = flowmap_sample(lambda z, t, r: u_true(z, t.double(), r.double()), noise, n, 5.0)
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-6)  # times are float32


def test_instantaneous_field_is_euler_and_converges_with_steps():
    """Ignoring r (the teacher's velocity) the sampler is Euler: first-order convergence to the ODE solution."""
    noise = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = flow(noise, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))

    def v(z, t, r):
        return v_marginal(z, t.double().reshape(-1, 1, 1, 1))

    errs = [float((flowmap_sample(v, noise, n, 1.0) - exact).abs().max()) for n in (16, 32, 64)]
    assert errs[0] > errs[1] > errs[2]
    assert 1.6 < errs[0] / errs[1] < 2.4 and 1.6 < errs[1] / errs[2] < 2.4


def test_consistency_sampler_with_exact_x0_predictor():
    """Point-mass data: x̂0 = z − t·u(z, t, 0) is exact, so every step count returns the data point."""
    import test_flowmap_objective as analytic

    old, analytic.S = analytic.S, 0.0
    try:
        noise = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        for n in (1, 3, 8):
            out = consistency_sample(lambda z, t, r: u_true(z, t.double(), r.double()), noise, n, 5.0,
                                     torch.Generator().manual_seed(0))
            torch.testing.assert_close(out, torch.full_like(out, MU), rtol=0, atol=1e-6)
    finally:
        analytic.S = old


def test_student_sampling_matches_diffusers_anyflow_pipeline(tiny_wan):
    from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    from anyflow.config import Student
    from anyflow.models.student import add_lora, student_from_teacher

    scfg = Student(lora_rank=4, lora_alpha=4.0)
    model = student_from_teacher(tiny_wan, scfg)
    add_lora(model, scfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    noise, text = torch.randn(2, 8, 5, 8, 8, generator=g), torch.randn(2, 8, 64, generator=g)
    ours = flowmap_sample(model_velocity(model, text), noise, 4, 5.0)
    pipe = AnyFlowPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                           scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=text, latents=noise.clone(), num_inference_steps=4, guidance_scale=1.0,
                      height=64, width=64, num_frames=17, output_type="latent", return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert float((ours - noise).abs().mean()) > 1e-2
