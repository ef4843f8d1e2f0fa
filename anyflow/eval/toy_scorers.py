"""Ground-truth scorers for the toy domain (:mod:`anyflow.data.toy`) that read the PIXELS of a decoded clip.

Nothing here looks at the prompt except to compare a prediction with what was asked. A clip is
``uint8 (F, H, W, 3)``.

* foreground: pixels whose RGB L2 distance to ``toy.BACKGROUND`` exceeds ``FG_TOL``;
* colour: nearest palette colour (L2 in RGB) to the per-channel median of all foreground pixels;
* shape: best mean IoU (over the visible frames) between the foreground mask (refined to the half-way level
  between background and object colour, see :func:`refined_mask`) and each shape's template
  rendered by ``toy._shape_mask`` at the mask's centroid with the radius that matches the mask's area
  (circle: A = πr², square: A = (1.7r)², triangle: A = 2.2r², centroid of the triangle at cy + r/3). This is the
  fill-ratio idea (circle ≈ π/4 of its box, square ≈ 1, triangle ≈ 1/2) made robust to blur and noise;
* direction: least-squares slope of the foreground centroid trajectory over the frames where the object is
  visible; the displacement slope·(F−1) along the dominant axis gives the sign (y grows downwards); 'none' when
  the displacement is below ``STATIC_FRACTION`` of the frame size.
"""

from __future__ import annotations

import numpy as np

from anyflow.data import toy

FG_TOL = 60.0  # RGB L2 distance from the background colour that counts as foreground
MIN_PIXELS = 4  # fewer foreground pixels in a frame: object not visible in that frame
STATIC_FRACTION = 0.08  # |displacement| < 8 % of the frame size → 'none'

_AREA_PER_R2 = {"circle": np.pi, "square": 1.7**2, "triangle": 2.2}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}  # template centre = centroid − dy·r


def foreground_mask(frames: np.ndarray, tol: float = FG_TOL) -> np.ndarray:
    """bool (F, H, W): pixels farther than ``tol`` (RGB L2) from ``toy.BACKGROUND``."""
    x = np.asarray(frames, dtype=np.float32)
    return np.sqrt(((x - np.array(toy.BACKGROUND, np.float32)) ** 2).sum(-1)) > tol


def refined_mask(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Half-way iso-level between background and object colour: bool (F, H, W) where the projection of a pixel
    onto the segment background→(median foreground colour) exceeds 1/2. Undoes the dilation a blur gives the
    coarse ``FG_TOL`` mask (keeps a blurred square's corners)."""
    if mask.sum() == 0:
        return mask
    x = np.asarray(frames, np.float32)
    bg = np.array(toy.BACKGROUND, np.float32)
    d = np.median(x[mask], axis=0) - bg
    if float((d**2).sum()) < FG_TOL**2:
        return mask
    proj = ((x - bg) * d).sum(-1) / float((d**2).sum())
    return proj > 0.5


def centroids(mask: np.ndarray) -> np.ndarray:
    """float (F, 2) of (x, y) centroids in pixel-centre coordinates (+0.5); NaN where < MIN_PIXELS pixels."""
    out = np.full((mask.shape[0], 2), np.nan, dtype=np.float64)
    for f, m in enumerate(mask):
        ys, xs = np.nonzero(m)
        if len(xs) >= MIN_PIXELS:
            out[f] = xs.mean() + 0.5, ys.mean() + 0.5
    return out


def classify_color(frames: np.ndarray, mask: np.ndarray) -> str | None:
    """Nearest palette colour to the median foreground RGB; None when there is no foreground."""
    if mask.sum() == 0:
        return None
    med = np.median(np.asarray(frames, np.float32)[mask], axis=0)
    return min(toy.COLORS, key=lambda c: float(((np.array(toy.COLORS[c], np.float32) - med) ** 2).sum()))


def shape_scores(mask_hw: np.ndarray) -> dict[str, float]:
    """IoU of one frame's mask with each area-matched shape template at the mask's centroid."""
    h, w = mask_hw.shape
    ys, xs = np.nonzero(mask_hw)
    if len(xs) < MIN_PIXELS:
        return {s: 0.0 for s in toy.SHAPES}
    area = float(len(xs))
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    out = {}
    for shape in toy.SHAPES:
        r = float(np.sqrt(area / _AREA_PER_R2[shape]))
        tmpl = toy._shape_mask(shape, h, w, cx, cy - _CENTROID_DY[shape] * r, r)
        inter = float((tmpl & mask_hw).sum())
        union = float((tmpl | mask_hw).sum())
        out[shape] = inter / union if union else 0.0
    return out


def classify_shape(mask: np.ndarray) -> str | None:
    """Shape with the highest mean IoU over the frames where the object is visible."""
    visible = [m for m in mask if m.sum() >= MIN_PIXELS]
    if not visible:
        return None
    totals = {s: 0.0 for s in toy.SHAPES}
    for m in visible:
        for s, v in shape_scores(m).items():
            totals[s] += v
    return max(totals, key=totals.get)


def displacement(mask: np.ndarray) -> np.ndarray | None:
    """(dx, dy) over the clip from a least-squares line through the visible centroids; None if < 2 visible."""
    c = centroids(mask)
    t = np.arange(len(c), dtype=np.float64)
    ok = ~np.isnan(c[:, 0])
    if ok.sum() < 2:
        return None
    tt = t[ok] - t[ok].mean()
    slope = (tt[:, None] * (c[ok] - c[ok].mean(0))).sum(0) / (tt**2).sum()
    return slope * (len(c) - 1)


def classify_direction(mask: np.ndarray) -> str | None:
    """'left'/'right'/'up'/'down' from the dominant axis of the displacement, 'none' when static, None when absent."""
    d = displacement(mask)
    if d is None:
        return None
    dx, dy = float(d[0]), float(d[1])
    h, w = mask.shape[1:]
    if abs(dx) >= abs(dy):
        return "none" if abs(dx) < STATIC_FRACTION * w else ("right" if dx > 0 else "left")
    return "none" if abs(dy) < STATIC_FRACTION * h else ("down" if dy > 0 else "up")


def score_clip(frames: np.ndarray, spec: "toy.Spec") -> dict:
    """Per-dimension correctness of a clip against ``spec``.

    Returns ``{"color": 0|1, "shape": 0|1, "direction": 0|1, "pred_color", "pred_shape", "pred_direction",
    "visible_fraction"}``; a missing object scores 0 on every dimension.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 (F, H, W, 3), got shape {frames.shape}")
    mask = foreground_mask(frames)
    fine = refined_mask(frames, mask)
    pc, ps, pd = classify_color(frames, mask), classify_shape(fine), classify_direction(fine)
    visible = float(np.mean(mask.reshape(len(mask), -1).sum(1) >= MIN_PIXELS))
    return {"color": int(pc == spec.color), "shape": int(ps == spec.shape), "direction": int(pd == spec.direction),
            "pred_color": pc, "pred_shape": ps, "pred_direction": pd, "visible_fraction": visible}
