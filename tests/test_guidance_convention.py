"""One guidance convention ([I] item 2, DESIGN §3): every scale is ``u + w·(c − u)`` (w = 1: no guidance), and the
real score's w, stage 1's fused w and the gate's teacher scale are one number in every profile and in params.yaml.

The reference writes its real score ``c + s·(c − u)`` (``trainer_wan_anyflow_onpolicy.py:130-132``), i.e. w = 1 + s,
while it fuses ``(pred − (1 − w)·u)/w`` (``trainer_wan_anyflow_pretrain.py:302``), i.e. the student's conditional
output learns ``u + w·(c − u)``: with the same number in both places the two pulled towards different guidance."""

from pathlib import Path

import pytest
import torch

from anyflow import config as C
from anyflow.objectives.dmd import guided_velocity
from anyflow.objectives.flowmap import fuse_guidance
from anyflow.profiles import PROFILES

ROOT = Path(__file__).resolve().parents[1]


def _cu():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("w", [1.0, 3.0, 5.0])
def test_real_score_guidance_is_u_plus_w_c_minus_u(w):
    c, u = _cu()
    torch.testing.assert_close(guided_velocity(c, u, w), u + w * (c - u))


def test_w_one_is_the_conditional_score():
    c, u = _cu()
    torch.testing.assert_close(guided_velocity(c, u, 1.0), c)


@pytest.mark.parametrize("w", [2.0, 3.0, 5.0])
def test_stage1_fusion_inverts_the_real_scores_guidance(w):
    """Stage 1 trains the student's conditional output u_c so that fuse(u_c, u, w) matches the (unguided) target;
    the student whose u_c is the real score's guided velocity at the same w is a zero of that: both stages pull
    towards the same guided field."""
    c, u = _cu()
    torch.testing.assert_close(fuse_guidance(guided_velocity(c, u, w), u, w), c)


def test_teacher_sampler_uses_the_same_form():
    """The teacher ODE sampler (gate reference, stage-1/2 evaluation references, synthesis) guides by
    ``u + w·(c − u)`` too — checked on a velocity model that returns its text embedding."""
    from anyflow.models.teacher import teacher_ode_sample

    class Echo(torch.nn.Module):  # v = the first entry of the text embedding, everywhere
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            return (encoder_hidden_states[:, :1, :1, None, None].expand_as(hidden_states),)

    z = torch.zeros(2, 1, 1, 1, 1)
    cond, neg = torch.full((2, 1, 1), 2.0), torch.full((1, 1, 1), 0.5)
    w = 3.0
    out = teacher_ode_sample(Echo(), z, cond, neg, steps=1, guidance_scale=w, shift=1.0)
    # one Euler step from t = 1 to 0 with a constant velocity v: x0 = z − v
    torch.testing.assert_close(out, z - (0.5 + w * (2.0 - 0.5)))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_use_one_guidance_scale(name):
    cfg = PROFILES[name]()
    assert cfg.stage2.real_guidance_scale == cfg.stage1.guidance_scale == cfg.gate.teacher_guidance_scale, name


def test_params_yaml_uses_one_guidance_scale():
    cfg = C.load(ROOT / "params.yaml")
    assert cfg.stage2.real_guidance_scale == cfg.stage1.guidance_scale == cfg.gate.teacher_guidance_scale


def test_real_guidance_below_one_is_rejected_by_name():
    with pytest.raises(C.ConfigError, match="stage2.real_guidance_scale"):
        C.build({"stage2": {"real_guidance_scale": 0.0}})
