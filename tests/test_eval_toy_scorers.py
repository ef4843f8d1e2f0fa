"""Toy ground-truth scorers read pixels: exact on clean clips, robust to mild noise/blur, catch wrong answers."""

import numpy as np
import pytest

from anyflow.data import toy
from anyflow.eval import toy_scorers


def _blur(frames: np.ndarray) -> np.ndarray:
    """3×3 box blur per frame (edge-padded)."""
    x = np.pad(frames.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(x[:, i:i + frames.shape[1], j:j + frames.shape[2]] for i in range(3) for j in range(3)) / 9.0
    return out


@pytest.mark.parametrize("corrupt", ["clean", "noise_blur"])
def test_all_specs_several_seeds(corrupt):
    rng = np.random.default_rng(0)
    wrong = []
    for spec in toy.all_specs():
        for seed in range(4):
            frames, _ = toy.render(spec, seed)
            if corrupt == "noise_blur":
                x = _blur(frames) + rng.normal(0, 8.0, frames.shape)
                frames = np.clip(np.round(x), 0, 255).astype(np.uint8)
            r = toy_scorers.score_clip(frames, spec)
            if not (r["color"] and r["shape"] and r["direction"]):
                wrong.append((spec.prompt, seed, r["pred_color"], r["pred_shape"], r["pred_direction"]))
    assert wrong == []


def test_left_clip_scored_left_and_wrong_answers_fail():
    spec = toy.Spec("red", "circle", "left")
    frames, _ = toy.render(spec, 3)
    r = toy_scorers.score_clip(frames, spec)
    assert r["pred_direction"] == "left" and r["direction"] == 1
    # the same pixels judged against a different prompt: colour / shape / direction each fail
    assert toy_scorers.score_clip(frames, toy.Spec("blue", "circle", "left"))["color"] == 0
    assert toy_scorers.score_clip(frames, toy.Spec("red", "square", "left"))["shape"] == 0
    assert toy_scorers.score_clip(frames, toy.Spec("red", "circle", "right"))["direction"] == 0
    # time-reversed clip moves right
    assert toy_scorers.score_clip(frames[::-1], spec)["pred_direction"] == "right"


def test_static_and_empty_clips():
    spec = toy.Spec("green", "square", "up")
    frames, _ = toy.render(spec, 1)
    static = np.repeat(frames[:1], len(frames), axis=0)
    assert toy_scorers.score_clip(static, spec)["pred_direction"] == "none"
    empty = np.empty_like(frames)
    empty[:] = toy.BACKGROUND
    r = toy_scorers.score_clip(empty, spec)
    assert (r["color"], r["shape"], r["direction"], r["visible_fraction"]) == (0, 0, 0, 0.0)


def test_wrong_colour_pixels_fail_colour():
    spec = toy.Spec("yellow", "triangle", "down")
    frames, _ = toy.render(spec, 2)
    mask = toy_scorers.foreground_mask(frames)
    recoloured = frames.copy()
    recoloured[mask] = toy.COLORS["blue"]
    r = toy_scorers.score_clip(recoloured, spec)
    assert r["pred_color"] == "blue" and r["color"] == 0 and r["shape"] == 1 and r["direction"] == 1
