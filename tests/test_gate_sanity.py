"""[J] Scorer sanity: corrupted procedural clips must score below the clean ones (Total and the dimension each
corruption targets), blur included (the sharpness dimension), and the ordering machinery of ``anyflow gate-sanity``
passes a known-good ranking and names a broken one."""

import numpy as np
import pytest

from anyflow.data import toy
from anyflow.eval import corruptions as C
from anyflow.eval import vbench_like as V
from anyflow.stages.gate_sanity import evaluate, paired, table

_, HELD = toy.split(0, 0.25)
HELD = HELD[::2]  # 6 of the 12 held-out specs (every colour and shape): keeps the test short
COLUMNS = 2
SPECS = [s for _ in range(COLUMNS) for s in HELD]  # seed-major, as the stage lays them out
CLEAN = np.stack([toy.render(s, 7 + i // len(HELD))[0] for i, s in enumerate(SPECS)])


@pytest.fixture(scope="module")
def clean_scores():
    dims = V.score_videos(list(CLEAN), SPECS)["dimensions"]
    return dims, V.aggregate(dims)


@pytest.mark.parametrize("name", sorted(C.CORRUPTIONS))
def test_every_corruption_scores_below_the_clean_clip(name, clean_scores):
    dims0, agg0 = clean_scores
    bad = [C.corrupt(name, v, s, i) for i, (v, s) in enumerate(zip(CLEAN, SPECS))]
    assert any(not np.array_equal(b, v) for b, v in zip(bad, CLEAN)), name
    dims = V.score_videos(bad, SPECS)["dimensions"]
    target = C.TARGETS[name]
    assert dims[target] < dims0[target], (name, target, dims[target], dims0[target])
    assert V.aggregate(dims)["total"] < agg0["total"], name


def test_blur_is_seen_by_quality_through_the_sharpness_dimension(clean_scores):
    """The issue's measurement: σ = 1 px left Quality unchanged (0.979 → 0.979). Now the sharpness dimension sees it
    and σ = 2 px is worse than σ = 1 px."""
    dims0, agg0 = clean_scores
    assert dims0["imaging_quality"] > 0.97  # a procedural clip is as sharp as its reference render
    q = {}
    for sigma in (1.0, 2.0):
        dims = V.score_videos([C.gaussian_blur(v, sigma) for v in CLEAN], SPECS)["dimensions"]
        q[sigma] = (V.aggregate(dims)["quality"], dims["imaging_quality"])
    assert q[1.0][0] < agg0["quality"] - 0.05 and q[2.0][0] < q[1.0][0]
    assert q[1.0][1] < 0.5 and q[2.0][1] < q[1.0][1]
    # independent of the subject's position and size: another seed of the same specs is as sharp
    other = V.score_videos([toy.render(s, 99 + i)[0] for i, s in enumerate(SPECS)], SPECS)["dimensions"]
    assert other["imaging_quality"] == pytest.approx(dims0["imaging_quality"], abs=0.03)
    # and a missing subject is not sharp
    empty = np.zeros_like(CLEAN[0]) + np.array(toy.BACKGROUND, np.uint8)
    assert V.imaging_quality(empty, SPECS[0]) == 0.0


def test_corruptions_are_deterministic_and_do_what_they_say():
    v, s = CLEAN[0], SPECS[0]
    for name in C.CORRUPTIONS:
        np.testing.assert_array_equal(C.corrupt(name, v, s, 3), C.corrupt(name, v, s, 3))
    np.testing.assert_array_equal(C.direction_reversed(v)[0], v[-1])
    f = C.frozen(v)
    assert (f[len(v) // 2:] == v[len(v) // 2]).all() and np.array_equal(f[:len(v) // 2], v[:len(v) // 2])
    sh = C.shuffled(v, 0)
    assert not np.array_equal(sh, v) and sorted(x.tobytes() for x in sh) == sorted(x.tobytes() for x in v)
    from anyflow.eval.toy_scorers import score_clip
    assert score_clip(C.color_swapped(v, s), s)["color"] == 0 and score_clip(C.color_swapped(v, s), s)["shape"] == 1
    with pytest.raises(KeyError, match="unknown corruption"):
        C.corrupt("jpeg", v, s)


def test_paired_verdicts():
    a = np.array([0.80, 0.82, 0.81, 0.83])
    assert paired(a, a - 0.05, 2.0)["status"] == "holds"  # every seed 0.05 better, SE 0: holds
    assert paired(a - 0.05, a, 2.0)["status"] == "broken"
    noisy = a + np.array([0.01, -0.012, 0.011, -0.009])
    p = paired(a, noisy, 2.0)
    assert p["status"] == "tie" and p["se"] > 0
    assert p["mean_diff"] == pytest.approx(float(np.mean(a - noisy)))


def _rows(order):
    """Procedural clips, and 'teacher' rows made of increasingly corrupted procedural clips (a known ranking)."""
    blur = lambda sigma: np.stack([C.gaussian_blur(v, sigma) for v in CLEAN])  # noqa: E731
    noisy = np.stack([C.additive_noise(C.gaussian_blur(v, 1.0), 40.0, i) for i, v in enumerate(CLEAN)])
    made = {"t50": blur(0.7), "t8": blur(1.0), "t4": blur(2.0), "t1": noisy}
    return {"procedural": CLEAN, **{k: made[v] for k, v in zip(("t50", "t8", "t4", "t1"), order)}}


def _corrupted():
    return {c: np.stack([C.corrupt(c, v, s, i) for i, (v, s) in enumerate(zip(CLEAN, SPECS))]) for c in C.CORRUPTIONS}


def test_sanity_passes_a_known_ranking_and_names_a_broken_one():
    cor = _corrupted()
    good = evaluate(_rows(("t50", "t8", "t4", "t1")), SPECS, COLUMNS, "t50", ["t8", "t4", "t1"], 0.5, 2.0, cor)
    assert good["passed"], table(good)
    assert [o["status"] for o in good["orderings"]][:2] == ["holds", "holds"]
    assert all(c["passed"] for c in good["corruptions"]) and len(good["corruptions"]) == len(C.CORRUPTIONS)
    assert {"blur_1px", "blur_2px", "noise", "frozen", "shuffled", "color_swapped",
            "direction_reversed"} == {c["corruption"] for c in good["corruptions"]}
    # the 8-step row sharper than the 50-step one: the scorer ranks it higher beyond the spread → broken, named
    bad = evaluate(_rows(("t8", "t50", "t4", "t1")), SPECS, COLUMNS, "t50", ["t8", "t4", "t1"], 0.5, 2.0, cor)
    assert not bad["passed"] and bad["failed"] == ["order:t50>t8"], table(bad)
    # a corruption that does not hurt (the clean clips themselves) fails by name
    worse = evaluate(_rows(("t50", "t8", "t4", "t1")), SPECS, COLUMNS, "t50", ["t8", "t4", "t1"], 0.5, 2.0,
                     {**cor, "noise": CLEAN})
    assert worse["failed"] == ["corruption:noise"]
    assert "← FAILED" in table(worse)
