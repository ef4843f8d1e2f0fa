"""The toy video domain: coloured shapes moving in named directions, with exact ground truth.

A clip is rendered procedurally from ``(colour, shape, direction, seed)``; the same arguments always give the same
pixels. The ground truth (colour, shape, direction, per-frame centre positions, radius) is returned beside the
pixels, so evaluation can check a generated video against what its prompt asked for (``anyflow.eval``).

Pixel layout: ``uint8 (F, H, W, 3)``; :func:`to_model_space` maps a batch to float ``(B, 3, F, H, W)`` in [−1, 1],
the layout ``AutoencoderKLWan`` takes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from itertools import product
from typing import Iterable, Sequence

import numpy as np
import torch

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) in image coordinates (y grows downwards)
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
BACKGROUND: tuple[int, int, int] = (24, 24, 28)


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for."""

    color: str
    shape: str
    direction: str

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


@dataclass(frozen=True)
class GroundTruth:
    color: str
    shape: str
    direction: str
    radius: float
    centers: tuple[tuple[float, float], ...]  # (x, y) per frame, pixels

    def to_dict(self) -> dict:
        return asdict(self)


def all_specs() -> list[Spec]:
    return [Spec(c, s, d) for c, s, d in product(COLORS, SHAPES, DIRECTIONS)]


def parse_prompt(prompt: str) -> Spec:
    """Inverse of :attr:`Spec.prompt`; raises ``ValueError`` naming the unknown word."""
    words = prompt.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"prompt {prompt!r}: expected 'a <colour> <shape> moving <direction>'")
    color, shape, direction = words[1], words[2], words[4]
    for value, known, name in ((color, COLORS, "colour"), (shape, SHAPES, "shape"), (direction, DIRECTIONS,
                                                                                      "direction")):
        if value not in known:
            raise ValueError(f"prompt {prompt!r}: unknown {name} {value!r}")
    return Spec(color, shape, direction)


def split(seed: int = 0, heldout_fraction: float = 0.25) -> tuple[list[Spec], list[Spec]]:
    """Train / held-out split of prompt *combinations*.

    Every colour, shape and direction still appears in the training split (so held-out prompts test composition,
    not unseen words): held-out combinations are drawn as a partial Latin design over the three factors.
    """
    return split_combinations(all_specs(), seed, heldout_fraction, ("color", "shape", "direction"))


def split_combinations(specs: list, seed: int, heldout_fraction: float, factors: Sequence[str]) -> tuple[list, list]:
    """Shuffle ``specs`` with ``seed`` and hold out ``heldout_fraction`` of them, keeping every value of every
    factor covered by the remaining training combinations; both lists sorted by prompt (shared by toy domains)."""
    specs = list(specs)
    random.Random(seed).shuffle(specs)
    n_held = int(round(len(specs) * heldout_fraction))
    held: list = []
    for spec in specs:
        if len(held) == n_held:
            break
        rest = [s for s in specs if s not in held and s != spec]
        if all(any(getattr(s, f) == getattr(spec, f) for s in rest) for f in factors):
            held.append(spec)
    train = [s for s in specs if s not in held]
    return sorted(train, key=lambda s: s.prompt), sorted(held, key=lambda s: s.prompt)


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    if shape == "square":
        half = radius * 0.85
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    if shape == "triangle":  # apex up, base down; area comparable to the circle
        top, bottom = cy - radius, cy + radius
        frac = np.clip((yy - top) / (bottom - top), 0.0, 1.0)
        inside_y = (yy >= top) & (yy <= bottom)
        return inside_y & (np.abs(xx - cx) <= frac * radius * 1.1)
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: Spec, seed: int, num_frames: int = 9, height: int = 32, width: int = 32
           ) -> tuple[np.ndarray, GroundTruth]:
    """Render one clip. Deterministic in ``(spec, seed, geometry)``.

    The shape starts at a random position such that it stays fully inside the frame while it travels a random
    distance of 30–45 % of the frame along its direction.
    """
    rng = np.random.default_rng([seed, hash_spec(spec)])
    radius = float(rng.uniform(0.14, 0.18) * min(height, width))
    dx, dy = DIRECTIONS[spec.direction]
    travel = float(rng.uniform(0.30, 0.45) * (width if dx else height))
    margin = radius + 1.0
    # start range so that start + travel stays inside
    def start_range(size: int, d: int) -> tuple[float, float]:
        lo, hi = margin, size - margin
        if d > 0:
            hi -= travel
        elif d < 0:
            lo += travel
        return lo, hi
    x0 = float(rng.uniform(*start_range(width, dx)))
    y0 = float(rng.uniform(*start_range(height, dy)))
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    centers = []
    color = np.array(COLORS[spec.color], dtype=np.uint8)
    for f in range(num_frames):
        a = f / max(num_frames - 1, 1)
        cx, cy = x0 + dx * travel * a, y0 + dy * travel * a
        centers.append((round(cx, 4), round(cy, 4)))
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[:] = BACKGROUND
        frame[_shape_mask(spec.shape, height, width, cx, cy, radius)] = color
        frames[f] = frame
    gt = GroundTruth(spec.color, spec.shape, spec.direction, radius, tuple(centers))
    return frames, gt


def hash_spec(spec: Spec) -> int:
    """A stable (process-independent) integer for a spec; Python's ``hash`` of str is salted per process."""
    colors, directions = list(COLORS), list(DIRECTIONS)
    return (colors.index(spec.color) * len(SHAPES) + SHAPES.index(spec.shape)) * len(directions) + directions.index(
        spec.direction)


def to_model_space(frames: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (F, H, W, 3) or (B, F, H, W, 3) → float32 (B, 3, F, H, W) in [−1, 1]."""
    arr = np.asarray(frames)
    if arr.ndim == 4:
        arr = arr[None]
    x = torch.from_numpy(arr).float().div(127.5).sub(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def to_pixels(video_BCFHW: torch.Tensor) -> np.ndarray:
    """float (B, 3, F, H, W) in [−1, 1] → uint8 (B, F, H, W, 3)."""
    x = video_BCFHW.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def sample_batch(specs: Sequence[Spec], batch_size: int, rng: np.random.Generator, num_frames: int, height: int,
                 width: int) -> tuple[np.ndarray, list[Spec]]:
    """Random training clips (pixels, specs) from ``specs``."""
    chosen = [specs[i] for i in rng.integers(0, len(specs), size=batch_size)]
    seeds = rng.integers(0, 2**31 - 1, size=batch_size)
    frames = np.stack([render(s, int(sd), num_frames, height, width)[0] for s, sd in zip(chosen, seeds)])
    return frames, chosen


def prompts(specs: Iterable[Spec]) -> list[str]:
    return [s.prompt for s in specs]
