"""Deterministic corruptions of a clip (``uint8 (F, H, W, 3)``) for the scorer sanity check (``anyflow gate-sanity``).

Each corruption degrades one thing a scorer must see, and :data:`TARGETS` names the dimension (toy name, as in
:func:`anyflow.eval.vbench_like.score_videos`) that must fall below the clean clip's:

* ``blur_1px`` / ``blur_2px`` — Gaussian blur of every frame, σ = 1 / 2 px (separable, reflect padding) →
  ``imaging_quality`` (the sharpness dimension);
* ``noise`` — additive Gaussian pixel noise, σ = ``NOISE_STD`` (seeded), independent per frame →
  ``temporal_flickering``;
* ``frozen`` — the video freezes half-way: frames from F//2 on repeat frame F//2 → ``motion_smoothness``
  (the trajectory leaves its constant-velocity line);
* ``shuffled`` — frames in a fixed random order (seeded, never the identity) → ``motion_smoothness``;
* ``color_swapped`` — the subject's pixels repainted in another palette colour → ``color``;
* ``direction_reversed`` — frames in reverse order (the subject moves the opposite way) → ``direction``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from anyflow.data import toy

NOISE_STD = 25.0  # uint8 levels


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (radius ⌈3σ⌉, reflect padding) of every frame and channel; uint8 out."""
    x = np.asarray(frames, np.float64)
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="reflect")
        x = sum(k[i] * np.take(xp, np.arange(i, i + x.shape[axis]), axis=axis) for i in range(2 * r + 1))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def additive_noise(frames: np.ndarray, std: float = NOISE_STD, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.asarray(frames, np.float64) + rng.normal(0.0, std, np.shape(frames))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def frozen(frames: np.ndarray) -> np.ndarray:
    x = np.array(frames)
    x[len(x) // 2:] = x[len(x) // 2]
    return x


def shuffled(frames: np.ndarray, seed: int = 0) -> np.ndarray:
    n = len(frames)
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    while n > 1 and np.array_equal(perm, np.arange(n)):
        perm = rng.permutation(n)
    return np.asarray(frames)[perm]


def color_swapped(frames: np.ndarray, spec: "toy.Spec") -> np.ndarray:
    """Repaint every non-background pixel in the next palette colour after ``spec.color`` (anti-aliased or blurred
    edge pixels keep their mix ratio: the pixel is re-mixed between background and the new colour)."""
    names = list(toy.COLORS)
    new = np.array(toy.COLORS[names[(names.index(spec.color) + 1) % len(names)]], np.float64)
    old = np.array(toy.COLORS[spec.color], np.float64)
    bg = np.array(toy.BACKGROUND, np.float64)
    x = np.asarray(frames, np.float64)
    a = np.clip(((x - bg) @ (old - bg)) / float((old - bg) @ (old - bg)), 0.0, 1.0)[..., None]
    out = np.where(a > 0, bg + a * (new - bg), x)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def direction_reversed(frames: np.ndarray) -> np.ndarray:
    return np.asarray(frames)[::-1].copy()


CORRUPTIONS: dict[str, Callable[[np.ndarray, "toy.Spec", int], np.ndarray]] = {
    "blur_1px": lambda v, s, seed: gaussian_blur(v, 1.0),
    "blur_2px": lambda v, s, seed: gaussian_blur(v, 2.0),
    "noise": lambda v, s, seed: additive_noise(v, NOISE_STD, seed),
    "frozen": lambda v, s, seed: frozen(v),
    "shuffled": lambda v, s, seed: shuffled(v, seed),
    "color_swapped": lambda v, s, seed: color_swapped(v, s),
    "direction_reversed": lambda v, s, seed: direction_reversed(v),
}
TARGETS: dict[str, str] = {"blur_1px": "imaging_quality", "blur_2px": "imaging_quality",
                           "noise": "temporal_flickering", "frozen": "motion_smoothness",
                           "shuffled": "motion_smoothness", "color_swapped": "color",
                           "direction_reversed": "direction"}


def corrupt(name: str, frames: np.ndarray, spec: "toy.Spec", seed: int = 0) -> np.ndarray:
    """Corruption ``name`` (a key of :data:`CORRUPTIONS`) of one clip."""
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[name](frames, spec, seed)
