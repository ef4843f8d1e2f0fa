"""The second toy domain, "driving": a coloured car or truck changing lanes on a road whose lane stripes flow toward
the viewer. Used by ``anyflow domain`` (continued training of the distilled student on a new domain, issue [G]).

A clip is rendered procedurally from ``(colour, vehicle, direction, seed)``; the same arguments always give the same
pixels. Same geometry and pixel layout as :mod:`anyflow.data.toy` (``uint8 (F, H, W, 3)``, ``cfg.video``: 9 frames
of 32×32), so :func:`anyflow.data.toy.to_model_space` / ``to_pixels`` apply unchanged.

Scene (all sizes as fractions of the frame, so any ``cfg.video`` works):

* road: ``ROAD`` (the shapes domain's background colour), three lanes of width W/3;
* lane markings: two achromatic ``STRIPE`` dashed lines (2 px wide) on the lane boundaries, dash period H/4, moving
  DOWN (toward the viewer) by a random 1.5–2.5 px per frame from a random phase;
* vehicle: an axis-aligned rectangle in a palette colour (``toy.COLORS``, all strongly chromatic), 0.22·W × 0.3·H
  (car) or 0.2·W × 0.6·H (truck), at a random height; it moves from the centre of its start lane to the
  centre of the adjacent lane (``left``: x decreases) at constant speed over the clip.

Ground truth is returned beside the pixels; :mod:`anyflow.eval.driving_scorers` recovers colour, vehicle class and
lane-change direction from the pixels alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import product
from typing import Iterable, Sequence

import numpy as np

from anyflow.data import toy

COLORS = toy.COLORS
VEHICLES: dict[str, tuple[float, float]] = {"car": (0.22, 0.3), "truck": (0.2, 0.6)}  # (width, length) / frame
DIRECTIONS: dict[str, int] = {"left": -1, "right": 1}
ROAD: tuple[int, int, int] = toy.BACKGROUND
STRIPE: tuple[int, int, int] = (150, 150, 150)
NUM_LANES = 3


@dataclass(frozen=True)
class Spec:
    """What a driving prompt asks for."""

    color: str
    vehicle: str
    direction: str

    @property
    def prompt(self) -> str:
        # short on purpose: the toy text encoder reads model.max_text_len = 32 bytes (ByT5 + EOS); the first
        # wording ("... changing lanes to the left", 36-42 bytes) lost the direction word to truncation
        return f"a {self.color} {self.vehicle} veering {self.direction}"


@dataclass(frozen=True)
class GroundTruth:
    color: str
    vehicle: str
    direction: str
    size: tuple[float, float]  # (width, length) in pixels
    centers: tuple[tuple[float, float], ...]  # (x, y) of the vehicle per frame, pixels
    stripe_offsets: tuple[float, ...]  # dash phase per frame, pixels (grows: the stripes move down)

    def to_dict(self) -> dict:
        return asdict(self)


def all_specs() -> list[Spec]:
    return [Spec(c, v, d) for c, v, d in product(COLORS, VEHICLES, DIRECTIONS)]


def parse_prompt(prompt: str) -> Spec:
    """Inverse of :attr:`Spec.prompt`; raises ``ValueError`` naming the unknown word."""
    words = prompt.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "veering":
        raise ValueError(f"prompt {prompt!r}: expected 'a <colour> <car|truck> veering <left|right>'")
    color, vehicle, direction = words[1], words[2], words[-1]
    for value, known, name in ((color, COLORS, "colour"), (vehicle, VEHICLES, "vehicle"),
                               (direction, DIRECTIONS, "direction")):
        if value not in known:
            raise ValueError(f"prompt {prompt!r}: unknown {name} {value!r}")
    return Spec(color, vehicle, direction)


def split(seed: int = 0, heldout_fraction: float = 0.25) -> tuple[list[Spec], list[Spec]]:
    """Train / held-out split of prompt combinations; every colour, vehicle and direction stays in training."""
    return toy.split_combinations(all_specs(), seed, heldout_fraction, ("color", "vehicle", "direction"))


def hash_spec(spec: Spec) -> int:
    """A stable (process-independent) integer for a spec."""
    colors, vehicles, directions = list(COLORS), list(VEHICLES), list(DIRECTIONS)
    return (colors.index(spec.color) * len(vehicles) + vehicles.index(spec.vehicle)) * len(directions) + \
        directions.index(spec.direction)


def lane_centers(width: int) -> list[float]:
    lane = width / NUM_LANES
    return [lane * (i + 0.5) for i in range(NUM_LANES)]


def render(spec: Spec, seed: int, num_frames: int = 9, height: int = 32, width: int = 32
           ) -> tuple[np.ndarray, GroundTruth]:
    """Render one clip. Deterministic in ``(spec, seed, geometry)``."""
    rng = np.random.default_rng([seed, hash_spec(spec), 2])  # the trailing 2 keeps streams apart from toy.render
    d = DIRECTIONS[spec.direction]
    centers_x = lane_centers(width)
    start_lane = int(rng.integers(1, NUM_LANES)) if d < 0 else int(rng.integers(0, NUM_LANES - 1))
    x0 = centers_x[start_lane] + float(rng.uniform(-0.5, 0.5))
    travel = width / NUM_LANES
    vw = VEHICLES[spec.vehicle][0] * width
    vl = VEHICLES[spec.vehicle][1] * height
    cy = float(rng.uniform(vl / 2 + 1, height - vl / 2 - 1))
    period = height / 4
    speed = float(rng.uniform(1.5, 2.5))
    phase = float(rng.uniform(0, period))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    stripe_cols = np.zeros((height, width), bool)
    for b in range(1, NUM_LANES):
        stripe_cols |= np.abs(xx - b * width / NUM_LANES) <= 1.0
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    centers, offsets = [], []
    for f in range(num_frames):
        a = f / max(num_frames - 1, 1)
        cx = x0 + d * travel * a
        off = (phase + speed * f) % period
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[:] = ROAD
        dash = ((yy - off) % period) < period / 2
        frame[stripe_cols & dash] = STRIPE
        car = (np.abs(xx - cx) <= vw / 2) & (np.abs(yy - cy) <= vl / 2)
        frame[car] = COLORS[spec.color]
        frames[f] = frame
        centers.append((round(cx, 4), round(cy, 4)))
        offsets.append(round(off, 4))
    gt = GroundTruth(spec.color, spec.vehicle, spec.direction, (vw, vl), tuple(centers), tuple(offsets))
    return frames, gt


def sample_clips(specs: Sequence[Spec], n: int, seed: int, num_frames: int, height: int, width: int
                 ) -> tuple[list[np.ndarray], list[Spec], list[int]]:
    """``n`` clips: spec ``i % len(specs)`` with per-clip seed ``seed·10⁶ + i`` (as synthesis numbers samples)."""
    chosen = [specs[i % len(specs)] for i in range(n)]
    seeds = [seed * 1_000_000 + i for i in range(n)]
    frames = [render(s, sd, num_frames, height, width)[0] for s, sd in zip(chosen, seeds)]
    return frames, chosen, seeds


def prompts(specs: Iterable[Spec]) -> list[str]:
    return [s.prompt for s in specs]
