"""VBench-style dimensions on hand-made clips with known answers, and VBench's aggregation by hand."""

import numpy as np
import pytest

from anyflow.data import toy
from anyflow.eval import vbench_like as V


def _clip(direction="left", seed=0, color="red", shape="circle"):
    return toy.render(toy.Spec(color, shape, direction), seed)[0]


def test_temporal_flickering_formula_and_ordering():
    # two alternating flat frames 0 / 51: mean |diff| = 51 → (255 − 51)/255 = 0.8
    x = np.zeros((5, 4, 4, 3), np.uint8)
    x[1::2] = 51
    assert V.temporal_flickering(x) == pytest.approx(0.8)
    clip = _clip()
    flicker = clip.copy()
    flicker[1::2] = np.clip(flicker[1::2].astype(int) + 40, 0, 255).astype(np.uint8)
    assert V.temporal_flickering(flicker) < V.temporal_flickering(clip) - 0.1
    assert V.temporal_flickering(np.repeat(clip[:1], 9, 0)) == 1.0


def test_subject_consistency_drops_when_subject_changes():
    a, b = _clip(color="red", shape="circle"), _clip(color="blue", shape="square")
    mixed = a.copy()
    mixed[4:] = b[4:]
    assert V.subject_consistency(a) > 0.9
    assert V.subject_consistency(mixed) < V.subject_consistency(a) - 0.15


def test_motion_smoothness_constant_velocity_vs_jitter():
    clip = _clip("right", 3)
    jitter = clip[[0, 2, 1, 3, 5, 4, 6, 8, 7]]  # frames out of order: trajectory zig-zags
    assert V.motion_smoothness(clip) > 0.95
    assert V.motion_smoothness(jitter) < V.motion_smoothness(clip) - 0.05
    vanishing = clip.copy()
    vanishing[5:] = toy.BACKGROUND
    assert V.motion_smoothness(vanishing) < 0.6


def test_dynamic_degree_static_clip_and_background_cleanliness():
    clip = _clip("up", 1)
    static = np.repeat(clip[:1], 9, 0)
    specs = [toy.Spec("red", "circle", "up")] * 2
    assert V.score_videos([static, static], specs)["dimensions"]["dynamic_degree"] == 0.0
    assert V.score_videos([clip, static], specs)["dimensions"]["dynamic_degree"] == 0.5
    assert V.background_cleanliness(clip) == 1.0
    noisy = clip.copy()
    speckle = np.random.default_rng(0).random(clip.shape[:3]) < 0.1  # 10 % stray bright pixels
    noisy[speckle] = 200
    assert 0.85 < V.background_cleanliness(noisy) < 0.95


def test_aggregation_hand_computed_total():
    scores = {"subject_consistency": 0.9, "background_cleanliness": 0.8, "temporal_flickering": 0.95,
              "motion_smoothness": 0.9, "dynamic_degree": 0.5, "color": 0.75, "shape": 0.5, "direction": 1.0}
    n_sc = (0.9 - 0.1462) / (1 - 0.1462)
    n_bc = (0.8 - 0.2615) / (1 - 0.2615)
    n_tf = (0.95 - 0.6293) / (1 - 0.6293)
    n_ms = (0.9 - 0.706) / (0.9975 - 0.706)
    n_dd = 0.5
    quality = (n_sc + n_bc + n_tf + n_ms + 0.5 * n_dd) / 4.5
    semantic = (0.75 + 0.5 + 1.0) / 3
    out = V.aggregate(scores)
    assert out["quality"] == pytest.approx(quality)
    assert out["semantic"] == pytest.approx(semantic)
    assert out["total"] == pytest.approx((4 * quality + semantic) / 5)
    with pytest.raises(KeyError, match="sharpness"):
        V.aggregate({"sharpness": 1.0})
    # quality dimensions only (VBench custom_input): Semantic and Total are undefined, not invented
    only_q = V.aggregate({k: v for k, v in scores.items() if k not in ("color", "shape", "direction")})
    assert only_q["quality"] == pytest.approx(quality) and only_q["semantic"] is None and only_q["total"] is None


def test_clean_renders_score_near_top():
    specs = toy.all_specs()[::4]
    r = V.score_videos([toy.render(s, i)[0] for i, s in enumerate(specs)], specs)
    d = r["dimensions"]
    assert d["color"] == d["shape"] == d["direction"] == d["dynamic_degree"] == d["background_cleanliness"] == 1.0
    assert V.aggregate(d)["total"] > 0.95


def test_partial_aggregate_totals_the_group_present():
    """Without any semantic dimension (a prompt-file evaluation set) VBench's Total is undefined (None); with
    ``partial`` it is the Quality alone — and a dead dimension is still left out of it."""
    from anyflow.eval.vbench_like import aggregate

    dims = {"temporal_flickering": 0.95, "subject_consistency": 0.9}
    assert aggregate(dims)["total"] is None
    agg = aggregate(dims, partial=True)
    assert agg["semantic"] is None and agg["total"] == agg["quality"] is not None
    only = aggregate({"temporal_flickering": 0.95}, partial=True)
    assert aggregate(dims, drop=("subject_consistency",), partial=True)["total"] == only["total"] != agg["total"]
