"""``route`` (the fast adapter switch stage 2 uses ~18 times per step) leaves the model in exactly the state of
diffusers' ``disable_adapters`` / ``enable_adapters`` + ``set_adapter`` followed by ``set_trainable``: the same
output of every forward and the same ``requires_grad`` on every parameter, over a sequence of switches that
includes peft's own calls in between (which toggle requires_grad behind route's back)."""

import pytest
import torch

from anyflow.models.student import add_lora, route, set_trainable, student_from_teacher, student_velocity
from stage1_fixtures import STUDENT_CFG, tiny_teacher


def slow_route(model, adapter, trainable):
    if adapter is None:
        model.disable_adapters()
    else:
        model.enable_adapters()
        model.set_adapter(adapter)
    set_trainable(model, trainable)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = student_from_teacher(tiny_teacher(), STUDENT_CFG)
    for name in ("student", "fake_score"):
        add_lora(m, STUDENT_CFG, name)
    with torch.no_grad():  # LoRA B starts at zero: make every adapter move the output, differently
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def state(model, z, t, r, text):
    with torch.no_grad():
        out = student_velocity(model, z, t, r, text)
    return out, {n: p.requires_grad for n, p in model.named_parameters()}


SEQUENCE = [("student", "student"), (None, "student"), ("fake_score", "fake_score"), ("student", None),
            (None, None), ("fake_score", "student"), ("student", "student"), ("student", "fake_score")]


def test_route_equals_diffusers_switch(model):
    g = torch.Generator().manual_seed(3)
    z, text = torch.randn(2, 8, 5, 8, 8, generator=g), torch.randn(2, 8, 64, generator=g)
    t, r = torch.tensor([0.9, 0.6]), torch.tensor([0.3, 0.1])
    outs = {}
    for i, (adapter, trainable) in enumerate(SEQUENCE):
        slow_route(model, adapter, trainable)
        want, want_grad = state(model, z, t, r, text)
        # leave the model elsewhere before routing back: the previous step's route, or peft's own switch (which
        # sets requires_grad on the adapter it activates, behind route's back)
        if i % 2:
            model.enable_adapters()
            model.set_adapter("fake_score" if adapter == "student" else "student")
        else:
            route(model, *SEQUENCE[i - 1])
        route(model, adapter, trainable)
        got, got_grad = state(model, z, t, r, text)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got_grad == want_grad, (adapter, trainable)
        assert any(got_grad.values()) == (trainable is not None)
        outs[adapter] = got
    # the three routes are three different functions (the test would pass vacuously otherwise)
    assert (outs["student"] - outs["fake_score"]).abs().max() > 1e-3
    assert (outs["student"] - outs[None]).abs().max() > 1e-3


def test_route_rejects_an_unknown_adapter(model):
    with pytest.raises(ValueError, match="'nope' is not loaded"):
        route(model, "nope", None)
