"""Ground-truth scorers for the driving domain (:mod:`anyflow.data.driving`) that read the PIXELS of a clip.

Nothing here looks at the prompt except to compare a prediction with what was asked. A clip is
``uint8 (F, H, W, 3)``. The road and its lane stripes are achromatic, every vehicle colour is strongly chromatic,
so the vehicle is found by chroma:

* vehicle mask: pixels whose chroma ``max(R, G, B) − min(R, G, B)`` exceeds ``CHROMA_TOL``;
* colour: nearest palette colour (L2 in RGB) to the per-channel median of all vehicle pixels;
* vehicle class: per visible frame the elongation ``std(y) / std(x)`` of the vehicle pixels at the half-chroma
  level (:func:`refined_mask`; a w × l rectangle gives l / w: car 1.36, truck 3.0), median over frames; truck
  when ≥ ``TRUCK_ELONGATION`` = 1.6 (also right on blurred reconstructions, which shorten both toward 1);
* road scene: the lane markings — achromatic pixels brighter than the road by ``MARKING_CONTRAST`` in the 2-px
  bands on the lane boundaries — visible in at least half the frames (the prompt asks for a driving scene; a clip
  of a coloured object on a blank background, what a shapes-only student draws, fails it);
* direction: least-squares slope of the vehicle's x centroid over the visible frames; the displacement
  slope·(F − 1) gives left/right, 'none' below ``toy_scorers.STATIC_FRACTION`` of the width.

:func:`score_videos` returns the same structure as :func:`anyflow.eval.vbench_like.score_videos`, with the same
dimension keys so VBench's aggregation and the gate policy apply unchanged: ``color``, ``shape`` (← vehicle class,
VBench "object class"), ``direction`` (← lane-change direction), ``road_scene`` (toy semantic dimension "road
scene", standing for VBench's "scene" on an accuracy scale: VBench's own normalisation of "scene", max 0.8222, is
for caption-match rates); quality dimensions are computed on the vehicle
mask (``background_cleanliness`` ← fraction of non-vehicle pixels that are achromatic road/stripe pixels).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from anyflow.data import driving
from anyflow.eval import toy_scorers, vbench_like

CHROMA_TOL = 60.0  # palette colours have chroma ≥ 155, road and stripes 0–4
MIN_PIXELS = toy_scorers.MIN_PIXELS
# clean rectangles measure 1.36 (car) / 3.0 (truck); a blurring decoder shortens both toward 1 (the toy teacher's
# VAE reconstructions of driving clips measure 1.03–1.23 / 1.96–2.19), so the cut sits between those ranges
TRUCK_ELONGATION = 1.6
BG_CHROMA_TOL = 30.0  # non-vehicle pixels at most this chromatic count as clean road
MARKING_CONTRAST = 40.0  # stripes are 125 grey levels above the road; VAE reconstructions keep > 60


def chroma(frames: np.ndarray) -> np.ndarray:
    x = np.asarray(frames, dtype=np.float32)
    return x.max(-1) - x.min(-1)


def vehicle_mask(frames: np.ndarray, tol: float = CHROMA_TOL) -> np.ndarray:
    """bool (F, H, W): chromatic pixels."""
    return chroma(frames) > tol


def refined_mask(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Half-way iso-level of chroma between the road (0) and the vehicle (median chroma of ``mask``): undoes the
    dilation a blur gives the coarse mask, so the vehicle's proportions survive a blurry decoder."""
    if mask.sum() == 0:
        return mask
    c = chroma(frames)
    return c > 0.5 * float(np.median(c[mask]))


def classify_color(frames: np.ndarray, mask: np.ndarray) -> str | None:
    return toy_scorers.classify_color(frames, mask)


def elongation(mask_hw: np.ndarray) -> float | None:
    """std(y) / std(x) of one frame's mask pixels; None when fewer than MIN_PIXELS."""
    ys, xs = np.nonzero(mask_hw)
    if len(xs) < MIN_PIXELS:
        return None
    sx, sy = float(np.std(xs + 0.5)), float(np.std(ys + 0.5))
    return sy / max(sx, 0.5)


def classify_vehicle(mask: np.ndarray) -> str | None:
    values = [e for e in (elongation(m) for m in mask) if e is not None]
    if not values:
        return None
    return "truck" if float(np.median(values)) >= TRUCK_ELONGATION else "car"


def x_displacement(mask: np.ndarray) -> float | None:
    """Horizontal displacement over the clip from a least-squares line through the visible x centroids."""
    d = toy_scorers.displacement(mask)
    return None if d is None else float(d[0])


def classify_direction(mask: np.ndarray) -> str | None:
    dx = x_displacement(mask)
    if dx is None:
        return None
    if abs(dx) < toy_scorers.STATIC_FRACTION * mask.shape[2]:
        return "none"
    return "right" if dx > 0 else "left"


def lane_markings(frames: np.ndarray) -> float:
    """Fraction of (frame, lane boundary) pairs showing lane markings: in the 2-px band on each lane boundary (columns ``b·W/3``), the
    non-chromatic pixels (the vehicle may cross the band) brighter than the median road luminance by more than
    ``MARKING_CONTRAST`` somewhere along the frame height. A clip shows the road scene when it is >= 0.5."""
    f = np.asarray(frames, np.float32)
    lum, chrom = f.mean(-1), chroma(f)
    road = float(np.median(lum))
    w = f.shape[2]
    seen = []
    for b in range(1, driving.NUM_LANES):
        c = int(round(b * w / driving.NUM_LANES))
        band = np.where(chrom[:, :, c - 1:c + 1] < BG_CHROMA_TOL, lum[:, :, c - 1:c + 1] - road, 0.0)
        seen.append(band.max(axis=(1, 2)) > MARKING_CONTRAST)
    return float(np.mean(seen))


def score_clip(frames: np.ndarray, spec: "driving.Spec") -> dict:
    """Per-dimension correctness of a clip against ``spec``: ``{"color", "vehicle", "direction": 0|1, "pred_*",
    "visible_fraction"}``; a missing vehicle scores 0 on every dimension."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 (F, H, W, 3), got shape {frames.shape}")
    mask = vehicle_mask(frames)
    fine = refined_mask(frames, mask)
    pc, pv, pd = classify_color(frames, mask), classify_vehicle(fine), classify_direction(fine)
    visible = float(np.mean(mask.reshape(len(mask), -1).sum(1) >= MIN_PIXELS))
    return {"color": int(pc == spec.color), "vehicle": int(pv == spec.vehicle),
            "direction": int(pd == spec.direction), "road_scene": int(lane_markings(frames) >= 0.5), "pred_color": pc, "pred_vehicle": pv, "pred_direction": pd,
            "visible_fraction": visible}


# --- quality dimensions on the vehicle mask ---------------------------------------------------------------------
def subject_consistency(frames: np.ndarray, crop: int = 12) -> float:
    """VBench formula mean_{i≥1} (cos(f_i, f_{i−1}) + cos(f_i, f_0)) / 2 on per-frame features [unit colour
    histogram of the vehicle pixels, unit vehicle-mask crop centred at its centroid] (as vbench_like)."""
    frames = np.asarray(frames)
    mask = vehicle_mask(frames)
    feats = np.zeros((len(frames), 24 + crop * crop))
    for f, (img, m) in enumerate(zip(frames, mask)):
        ys, xs = np.nonzero(m)
        if len(xs) < MIN_PIXELS:
            continue
        px = img[m].astype(np.int64)
        hist = np.concatenate([np.bincount(px[:, c] // 32, minlength=8) for c in range(3)]).astype(np.float64)
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        pad = np.pad(m, crop)
        win = pad[cy + crop - crop // 2: cy + 2 * crop - crop // 2,
                  cx + crop - crop // 2: cx + 2 * crop - crop // 2].astype(np.float64).ravel()
        feats[f, :24] = hist / np.linalg.norm(hist)
        feats[f, 24:] = win / max(np.linalg.norm(win), 1e-12)
    if len(feats) < 2:
        return 1.0
    return float(np.mean([(vbench_like._cos(feats[i], feats[i - 1]) + vbench_like._cos(feats[i], feats[0])) / 2
                          for i in range(1, len(feats))]))


def motion_smoothness(frames: np.ndarray) -> float:
    """(1 − min(1, rms / (0.25·min(H, W)))) · visible fraction for the vehicle centroid's residual from its
    least-squares constant-velocity line (the lane change is at constant speed)."""
    frames = np.asarray(frames)
    c = toy_scorers.centroids(vehicle_mask(frames))
    ok = ~np.isnan(c[:, 0])
    visible = float(ok.mean())
    if ok.sum() < 3:
        return visible if ok.sum() == len(c) else 0.0
    t = np.arange(len(c), dtype=np.float64)[ok]
    A = np.stack([t, np.ones_like(t)], 1)
    coef, *_ = np.linalg.lstsq(A, c[ok], rcond=None)
    rms = float(np.sqrt(((A @ coef - c[ok]) ** 2).sum(1).mean()))
    return (1.0 - min(1.0, rms / (0.25 * min(frames.shape[1:3])))) * visible


def background_cleanliness(frames: np.ndarray, tol: float = BG_CHROMA_TOL) -> float:
    """Fraction of the pixels outside the vehicle (largest chromatic component, dilated by 1 px) whose chroma is at
    most ``tol``: stray coloured blobs and tinted roads lower it."""
    frames = np.asarray(frames)
    fg = vbench_like.largest_component(vehicle_mask(frames))
    dil = fg.copy()
    dil[:, 1:] |= fg[:, :-1]
    dil[:, :-1] |= fg[:, 1:]
    dil[:, :, 1:] |= fg[:, :, :-1]
    dil[:, :, :-1] |= fg[:, :, 1:]
    bg = ~dil
    return float((chroma(frames)[bg] <= tol).mean()) if bg.sum() else 0.0


def score_videos(videos: Sequence[np.ndarray], specs: Sequence["driving.Spec"]) -> dict:
    """Raw dimension scores (means over videos) keyed by the toy names :func:`vbench_like.aggregate` maps, plus
    per-clip records: ``{"dimensions": {...}, "clips": [...]}``."""
    if len(videos) != len(specs):
        raise ValueError(f"videos ({len(videos)}) and specs ({len(specs)}) differ in length")
    if not videos:
        raise ValueError("videos: empty")
    clips = []
    for v, s in zip(videos, specs):
        rec = score_clip(v, s)
        rec.update(prompt=s.prompt, temporal_flickering=vbench_like.temporal_flickering(v),
                   subject_consistency=subject_consistency(v), motion_smoothness=motion_smoothness(v),
                   dynamic=int(classify_direction(vehicle_mask(v)) not in (None, "none")),
                   background_cleanliness=background_cleanliness(v))
        clips.append(rec)
    mean = lambda k: float(np.mean([c[k] for c in clips]))  # noqa: E731
    dims = {"temporal_flickering": mean("temporal_flickering"), "subject_consistency": mean("subject_consistency"),
            "motion_smoothness": mean("motion_smoothness"), "dynamic_degree": mean("dynamic"),
            "background_cleanliness": mean("background_cleanliness"), "color": mean("color"),
            "shape": mean("vehicle"), "direction": mean("direction"), "road_scene": mean("road_scene")}
    return {"dimensions": dims, "clips": clips}
