"""Toy domain: ground truth agrees with the rendered pixels; the prompt split tests composition."""

import numpy as np
import pytest

from anyflow.data import toy


@pytest.mark.parametrize("spec", toy.all_specs()[::5])
def test_ground_truth_matches_pixels(spec):
    frames, gt = toy.render(spec, seed=3)
    color = np.array(toy.COLORS[spec.color])
    for f, (cx, cy) in enumerate(gt.centers):
        mask = (frames[f] == color).all(-1)
        assert mask.sum() > 10
        ys, xs = np.nonzero(mask)
        # pixel centres are at +0.5; the pixel centroid equals the ground-truth centre — for the triangle (apex up,
        # spanning cy ± r) the area centroid lies a third of the way up from the base: cy + r/3
        cy_area = cy + gt.radius / 3 if spec.shape == "triangle" else cy
        assert abs(xs.mean() + 0.5 - cx) < 0.6 and abs(ys.mean() + 0.5 - cy_area) < 0.6
        others = frames[f][~mask]
        assert (others == np.array(toy.BACKGROUND)).all()
    dx, dy = toy.DIRECTIONS[spec.direction]
    (x0, y0), (x1, y1) = gt.centers[0], gt.centers[-1]
    assert np.sign(round(x1 - x0, 3)) == dx and np.sign(round(y1 - y0, 3)) == dy


def test_render_deterministic_and_seed_dependent():
    spec = toy.Spec("red", "circle", "left")
    a, _ = toy.render(spec, 1)
    b, _ = toy.render(spec, 1)
    c, _ = toy.render(spec, 2)
    assert (a == b).all() and not (a == c).all()


def test_split_properties():
    train, held = toy.split(0, 0.25)
    assert len(held) == round(0.25 * len(toy.all_specs())) and not set(train) & set(held)
    assert set(train) | set(held) == set(toy.all_specs())
    for factor in ("color", "shape", "direction"):  # every word is seen in training
        assert {getattr(s, factor) for s in train} == {getattr(s, factor) for s in toy.all_specs()}
    assert toy.split(0, 0.25) == (train, held) and toy.split(1, 0.25) != (train, held)
    assert all(toy.parse_prompt(s.prompt) == s for s in held)
