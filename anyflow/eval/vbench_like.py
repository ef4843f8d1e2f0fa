"""VBench-style quality and semantic dimensions computed from pixels without pretrained weights, and VBench's
aggregation into Quality / Semantic / Total.

Dimensions (every score in [0, 1], higher is better; a clip is ``uint8 (F, H, W, 3)``):

* ``temporal flickering`` — VBench's own formula (``vbench/temporal_flickering.py``): per video the mean over
  consecutive frame pairs of ``mean(|frame_{i+1} − frame_i|)`` (cv2.absdiff averaged over pixels and channels),
  score = (255 − that mean) / 255, averaged over videos. (VBench runs it on static-prompt videos; our clips move,
  so the number is lower than for static content — it is compared across NFEs, not to published numbers.)
* ``subject consistency`` — VBench's formula on a fixed, weight-free feature space: per frame a feature =
  [L2-normalised 8-bin-per-channel colour histogram of the foreground pixels, L2-normalised 12×12 foreground mask
  crop centred at the centroid (translation-invariant shape descriptor)]; per video
  mean_{i≥1} (cos(f_i, f_{i−1}) + cos(f_i, f_0)) / 2 (VBench uses DINO features with the same formula).
* ``motion smoothness`` — VBench uses a frame-interpolation network; ours: 1 − min(1, rms / (0.25·min(H, W))) of
  the foreground-centroid trajectory's residual from its least-squares constant-velocity fit, times the fraction of
  frames in which the object is visible (a vanishing object is not smooth).
* ``dynamic degree`` — VBench: fraction of videos judged dynamic (RAFT optical flow); ours: fraction of videos
  whose centroid displacement exceeds ``toy_scorers.STATIC_FRACTION`` of the frame (``classify_direction`` not
  'none').
* ``background consistency`` slot ← our *background cleanliness*: fraction of pixels outside the subject (largest
  foreground component, 1-px dilated) within RGB L2 distance ``BG_TOL`` of ``toy.BACKGROUND``. VBench's dimension is CLIP-feature
  similarity of the background across frames; the toy background is a constant colour, so cleanliness is the
  honest pixel analogue.
* ``imaging quality`` slot ← our *edge sharpness* (VBench: MUSIQ, a learned image-quality model that penalises blur
  and noise): per clip, in a band around the subject (the refined foreground mask dilated by ``EDGE_BAND`` px),
  the ratio Σ|∇x|² / (C·Σ|∇x|) of the RGB gradient magnitude (forward differences), C the RGB distance between
  the subject's median colour and the background — for an edge of height C spread over w pixels this is ≈ 1/w,
  independent of the subject's size, position and contrast; score = min(1, that / the same on the procedural
  render of the clip's spec) × the fraction of frames the subject is visible in. A procedural clip scores 1; a
  Gaussian blur of σ = 1 px ≈ 0.33, σ = 2 px ≈ 0.22; noise in the band lowers it too (Σ|∇x| grows faster than
  Σ|∇x|²). Weight-free; it needs the spec only for the reference render (as the semantic dimensions need it for
  the ground truth).
* ``aesthetic quality`` slot ← our *realism* (VBench: the LAION aesthetic predictor, a learned model), only where a
  :class:`anyflow.eval.toy_fvd.Realism` is passed (the gate and its sanity stage, from ``artifacts/fvd_net``): per
  clip ``min(1, D / d²)``, d² the Mahalanobis distance of the clip's toy-FVD features to those of procedural renders
  of the same specs — it sees the faint smeared blob of a one-step sample that the hand-made dimensions pass.
* semantic: ``color`` ← toy colour accuracy (VBench "color"); ``object class`` ← toy shape accuracy;
  ``direction`` ← toy direction accuracy (no VBench counterpart; weight 1, range [0, 1]); ``road scene`` ← the
  driving domain's lane-marking check (:mod:`anyflow.eval.driving_scorers`; VBench "scene" on an accuracy scale).

Aggregation (Vchitect/VBench ``scripts/constant.py`` + ``scripts/cal_final_score.py``): each dimension is min-max
normalised with VBench's constants, ``n = (s − Min) / (Max − Min)`` (no clamping, as in VBench); Quality Score and
Semantic Score are the DIM_WEIGHT-weighted means of the normalised quality / semantic dimensions present; Total =
(QUALITY_WEIGHT·Quality + SEMANTIC_WEIGHT·Semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT) = (4·Q + 1·S) / 5.
Dimensions VBench has but we cannot compute (multiple objects, …) are absent and the weighted means run over the
dimensions present.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from anyflow.data import toy
from anyflow.eval import toy_scorers

# --- VBench constants (scripts/constant.py) -------------------------------------------------------------------------
NORMALIZE_DIC: dict[str, dict[str, float]] = {
    "subject consistency": {"Min": 0.1462, "Max": 1.0},
    "background consistency": {"Min": 0.2615, "Max": 1.0},
    "temporal flickering": {"Min": 0.6293, "Max": 1.0},
    "motion smoothness": {"Min": 0.706, "Max": 0.9975},
    "dynamic degree": {"Min": 0.0, "Max": 1.0},
    "aesthetic quality": {"Min": 0.0, "Max": 1.0},
    "imaging quality": {"Min": 0.0, "Max": 1.0},
    "object class": {"Min": 0.0, "Max": 1.0},
    "multiple objects": {"Min": 0.0, "Max": 1.0},
    "human action": {"Min": 0.0, "Max": 1.0},
    "color": {"Min": 0.0, "Max": 1.0},
    "spatial relationship": {"Min": 0.0, "Max": 1.0},
    "scene": {"Min": 0.0, "Max": 0.8222},
    "appearance style": {"Min": 0.0009, "Max": 0.2855},
    "temporal style": {"Min": 0.0, "Max": 0.364},
    "overall consistency": {"Min": 0.0, "Max": 0.364},
    "direction": {"Min": 0.0, "Max": 1.0},  # ours (toy), not a VBench dimension
    "road scene": {"Min": 0.0, "Max": 1.0},  # ours (driving toy domain): VBench "scene" as an accuracy
}
DIM_WEIGHT: dict[str, float] = {k: 1.0 for k in NORMALIZE_DIC}
DIM_WEIGHT["dynamic degree"] = 0.5
QUALITY_LIST = ("subject consistency", "background consistency", "temporal flickering", "motion smoothness",
                "aesthetic quality", "imaging quality", "dynamic degree")
SEMANTIC_LIST = ("object class", "multiple objects", "human action", "color", "spatial relationship", "scene",
                 "appearance style", "temporal style", "overall consistency", "direction", "road scene")
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0

BG_TOL = 30.0  # RGB L2 distance to the background colour that still counts as clean background
# toy dimension name → VBench dimension name it fills
TOY_TO_VBENCH = {"temporal_flickering": "temporal flickering", "subject_consistency": "subject consistency",
                 "motion_smoothness": "motion smoothness", "dynamic_degree": "dynamic degree",
                 "background_cleanliness": "background consistency", "color": "color", "shape": "object class",
                 "direction": "direction", "road_scene": "road scene", "imaging_quality": "imaging quality",
                 "aesthetic_quality": "aesthetic quality"}
EDGE_BAND = 3  # px around the subject in which the sharpness dimension reads gradients


# --- per-clip dimensions ---------------------------------------------------------------------------------------------
def temporal_flickering(frames: np.ndarray) -> float:
    """VBench: (255 − mean_i mean|x_{i+1} − x_i|) / 255 over consecutive frames (uint8 pixel scale)."""
    x = np.asarray(frames, dtype=np.float64)
    if len(x) < 2:
        return 1.0
    diffs = [np.abs(x[i + 1] - x[i]).mean() for i in range(len(x) - 1)]
    return float((255.0 - np.mean(diffs)) / 255.0)


def frame_features(frames: np.ndarray, crop: int = 12) -> np.ndarray:
    """float (F, 24 + crop²): [unit colour histogram of foreground pixels, unit centred mask crop]; zero if empty."""
    frames = np.asarray(frames)
    mask = toy_scorers.foreground_mask(frames)
    feats = np.zeros((len(frames), 24 + crop * crop), dtype=np.float64)
    for f, (img, m) in enumerate(zip(frames, mask)):
        ys, xs = np.nonzero(m)
        if len(xs) < toy_scorers.MIN_PIXELS:
            continue
        px = img[m].astype(np.int64)
        hist = np.concatenate([np.bincount(px[:, c] // 32, minlength=8) for c in range(3)]).astype(np.float64)
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        pad = np.pad(m, crop)
        window = pad[cy + crop - crop // 2: cy + crop + crop - crop // 2,
                     cx + crop - crop // 2: cx + crop + crop - crop // 2].astype(np.float64).ravel()
        feats[f, :24] = hist / np.linalg.norm(hist)
        feats[f, 24:] = window / max(np.linalg.norm(window), 1e-12)
    return feats


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def subject_consistency(frames: np.ndarray) -> float:
    """VBench formula: mean_{i≥1} (cos(f_i, f_{i−1}) + cos(f_i, f_0)) / 2 on :func:`frame_features`."""
    f = frame_features(frames)
    if len(f) < 2:
        return 1.0
    return float(np.mean([(_cos(f[i], f[i - 1]) + _cos(f[i], f[0])) / 2 for i in range(1, len(f))]))


def motion_smoothness(frames: np.ndarray) -> float:
    """(1 − min(1, rms_residual / (0.25·min(H, W)))) · visible_fraction for the centroid trajectory's residual
    from its least-squares constant-velocity line."""
    frames = np.asarray(frames)
    mask = toy_scorers.refined_mask(frames, toy_scorers.foreground_mask(frames))
    c = toy_scorers.centroids(mask)
    ok = ~np.isnan(c[:, 0])
    visible = float(ok.mean())
    if ok.sum() < 3:
        return visible if ok.sum() == len(c) else 0.0
    t = np.arange(len(c), dtype=np.float64)[ok]
    A = np.stack([t, np.ones_like(t)], 1)
    coef, *_ = np.linalg.lstsq(A, c[ok], rcond=None)
    rms = float(np.sqrt(((A @ coef - c[ok]) ** 2).sum(1).mean()))
    return (1.0 - min(1.0, rms / (0.25 * min(frames.shape[1:3])))) * visible


def is_dynamic(frames: np.ndarray) -> bool:
    """Centroid displacement above ``toy_scorers.STATIC_FRACTION`` of the frame (direction not 'none'/absent)."""
    frames = np.asarray(frames)
    mask = toy_scorers.refined_mask(frames, toy_scorers.foreground_mask(frames))
    return toy_scorers.classify_direction(mask) not in (None, "none")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """bool (F, H, W): per frame the largest 4-connected component of ``mask`` (label propagation: every pixel
    takes the max label of its 4-neighbourhood inside the mask until nothing changes; no scipy needed)."""
    m = np.asarray(mask, bool)
    f, h, w = m.shape
    labels = np.where(m, np.arange(1, f * h * w + 1).reshape(f, h, w), 0)
    while True:
        nb = labels.copy()
        nb[:, 1:] = np.maximum(nb[:, 1:], labels[:, :-1])
        nb[:, :-1] = np.maximum(nb[:, :-1], labels[:, 1:])
        nb[:, :, 1:] = np.maximum(nb[:, :, 1:], labels[:, :, :-1])
        nb[:, :, :-1] = np.maximum(nb[:, :, :-1], labels[:, :, 1:])
        nb = np.where(m, nb, 0)
        if np.array_equal(nb, labels):
            break
        labels = nb
    out = np.zeros_like(m)
    for i in range(f):
        ids, counts = np.unique(labels[i][labels[i] > 0], return_counts=True)
        if len(ids):
            out[i] = labels[i] == ids[np.argmax(counts)]
    return out


def background_cleanliness(frames: np.ndarray, tol: float = BG_TOL) -> float:
    """Fraction of the pixels outside the subject (the largest foreground component, dilated by 1 px) that lie
    within RGB L2 ``tol`` of the background colour. Stray blobs, speckle and tinted backgrounds lower it."""
    frames = np.asarray(frames)
    fg = largest_component(toy_scorers.foreground_mask(frames))
    dil = fg.copy()
    dil[:, 1:] |= fg[:, :-1]
    dil[:, :-1] |= fg[:, 1:]
    dil[:, :, 1:] |= fg[:, :, :-1]
    dil[:, :, :-1] |= fg[:, :, 1:]
    bg = ~dil
    if bg.sum() == 0:
        return 0.0
    dist = np.sqrt(((frames.astype(np.float32) - np.array(toy.BACKGROUND, np.float32)) ** 2).sum(-1))
    return float((dist[bg] <= tol).mean())


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """bool (F, H, W) dilated by ``px`` steps of the 3×3 neighbourhood (a (2px+1)² square)."""
    m = np.asarray(mask, bool).copy()
    for _ in range(px):
        d = m.copy()
        d[:, 1:] |= m[:, :-1]
        d[:, :-1] |= m[:, 1:]
        m = d.copy()
        d[:, :, 1:] |= m[:, :, :-1]
        d[:, :, :-1] |= m[:, :, 1:]
        m = d
    return m


def edge_sharpness_raw(frames: np.ndarray, band: int = EDGE_BAND) -> float:
    """Σ|∇x|² / (C·Σ|∇x|) in the band around the subject (see the module docstring), pooled over the frames in
    which the subject is visible; 0 when it never is."""
    x = np.asarray(frames, np.float64)
    coarse = toy_scorers.foreground_mask(frames)
    fine = toy_scorers.refined_mask(frames, coarse)
    visible = fine.reshape(len(fine), -1).sum(1) >= toy_scorers.MIN_PIXELS
    if not visible.any():
        return 0.0
    contrast = float(np.linalg.norm(np.median(x[coarse if coarse.any() else fine], axis=0)
                                    - np.array(toy.BACKGROUND, np.float64)))
    if contrast <= 0:
        return 0.0
    gx = np.zeros_like(x)
    gy = np.zeros_like(x)
    gx[:, :, :-1] = x[:, :, 1:] - x[:, :, :-1]
    gy[:, :-1] = x[:, 1:] - x[:, :-1]
    g = np.sqrt((gx**2 + gy**2).sum(-1))
    region = _dilate(fine, band) & visible[:, None, None]
    s1 = float(g[region].sum())
    return float((g[region] ** 2).sum() / (contrast * s1)) if s1 > 0 else 0.0


_REFERENCE_SHARPNESS: dict = {}


def imaging_quality(frames: np.ndarray, spec: "toy.Spec") -> float:
    """min(1, :func:`edge_sharpness_raw` / the same on ``toy.render(spec, 0)`` at the clip's geometry) × the
    fraction of frames with a visible subject."""
    frames = np.asarray(frames)
    key = (spec, frames.shape[:3])
    if key not in _REFERENCE_SHARPNESS:
        ref, _ = toy.render(spec, 0, *frames.shape[:3])
        _REFERENCE_SHARPNESS[key] = edge_sharpness_raw(ref)
    fine = toy_scorers.refined_mask(frames, toy_scorers.foreground_mask(frames))
    visible = float(np.mean(fine.reshape(len(fine), -1).sum(1) >= toy_scorers.MIN_PIXELS))
    return min(1.0, edge_sharpness_raw(frames) / _REFERENCE_SHARPNESS[key]) * visible


# --- over a set of videos --------------------------------------------------------------------------------------------
def score_videos(videos: Sequence[np.ndarray], specs: Sequence["toy.Spec"], realism=None) -> dict:
    """Raw toy dimension scores (means over videos) keyed by toy name, plus per-clip semantic records.
    ``realism`` (:class:`anyflow.eval.toy_fvd.Realism`, a learned per-clip score): adds ``aesthetic_quality``.

    Returns ``{"dimensions": {toy_name: score}, "clips": [score_clip(...) + quality dims per clip]}``.
    """
    if len(videos) != len(specs):
        raise ValueError(f"videos ({len(videos)}) and specs ({len(specs)}) differ in length")
    if not videos:
        raise ValueError("videos: empty")
    clips = []
    for v, s in zip(videos, specs):
        rec = toy_scorers.score_clip(v, s)
        rec.update(prompt=s.prompt, temporal_flickering=temporal_flickering(v), subject_consistency=
                   subject_consistency(v), motion_smoothness=motion_smoothness(v), dynamic=int(is_dynamic(v)),
                   background_cleanliness=background_cleanliness(v), imaging_quality=imaging_quality(v, s))
        clips.append(rec)
    if realism is not None:
        for rec, r in zip(clips, realism(list(videos))):
            rec["aesthetic_quality"] = float(r)
    mean = lambda k: float(np.mean([c[k] for c in clips]))  # noqa: E731
    dims = {"temporal_flickering": mean("temporal_flickering"), "subject_consistency": mean("subject_consistency"),
            "motion_smoothness": mean("motion_smoothness"), "dynamic_degree": mean("dynamic"),
            "background_cleanliness": mean("background_cleanliness"), "imaging_quality": mean("imaging_quality"),
            "color": mean("color"),
            "shape": mean("shape"), "direction": mean("direction")}
    if realism is not None:
        dims["aesthetic_quality"] = mean("aesthetic_quality")
    return {"dimensions": dims, "clips": clips}


def vbench_name(name: str) -> str:
    """VBench's name of a dimension: toy names via TOY_TO_VBENCH; VBench's own result keys (``subject_consistency``)
    with spaces; VBench names as they are."""
    return TOY_TO_VBENCH.get(name, name.replace("_", " ") if name.replace("_", " ") in NORMALIZE_DIC else name)


def aggregate(scores: Mapping[str, float], drop: Sequence[str] = (), partial: bool = False) -> dict:
    """VBench aggregation of raw dimension scores keyed by VBench names (or toy names and VBench's result keys,
    mapped by :func:`vbench_name`).

    n_d = (s_d − Min_d)/(Max_d − Min_d); Quality = Σ_{d∈Q} w_d n_d / Σ_{d∈Q} w_d; Semantic likewise over S;
    Total = (4·Quality + 1·Semantic)/5. Returns {"normalized", "quality", "semantic", "total"}; a group without
    any dimension present is None and then so is Total (real VBench's custom_input mode has no semantic dimension).
    ``drop`` (toy or VBench names): dead dimensions left out of the means (the gate's rule,
    :func:`anyflow.eval.gate.dead_dimensions`); when dropping empties a group, Total is the other group alone.
    ``partial``: a group without any dimension is left out and Total is the other group (the gate's prompt-file
    evaluation set for real models, :class:`anyflow.eval.sets.PromptSet`, has quality dimensions only).
    """
    dropped = {vbench_name(k) for k in drop}
    named = {vbench_name(k): float(v) for k, v in scores.items()}
    unknown = sorted(set(named) - set(NORMALIZE_DIC))
    if unknown:
        raise KeyError(f"unknown dimension(s) {unknown}; known: {sorted(NORMALIZE_DIC)}")
    norm = {k: (v - NORMALIZE_DIC[k]["Min"]) / (NORMALIZE_DIC[k]["Max"] - NORMALIZE_DIC[k]["Min"])
            for k, v in named.items()}

    def wmean(names: Sequence[str]) -> float | None:
        present = [k for k in names if k in norm]
        if not present:
            return None
        return sum(DIM_WEIGHT[k] * norm[k] for k in present) / sum(DIM_WEIGHT[k] for k in present)

    live = [k for k in norm if k not in dropped]
    q = wmean([k for k in QUALITY_LIST if k in live])
    s = wmean([k for k in SEMANTIC_LIST if k in live])
    if q is None and s is None:
        raise ValueError(f"no live quality or semantic dimension among {sorted(named)} (dropped {sorted(dropped)})")
    emptied_q = q is None and any(k in norm for k in QUALITY_LIST)
    emptied_s = s is None and any(k in norm for k in SEMANTIC_LIST)
    if emptied_q or emptied_s or (partial and (q is None or s is None)):
        # every dimension of a group was dropped as dead (or, partial, it has none): the other group is the Total
        total = q if q is not None else s
    else:  # a group with no dimension (VBench custom_input mode has no semantic ones) is None, and so is Total
        total = None if q is None or s is None else (QUALITY_WEIGHT * q + SEMANTIC_WEIGHT * s) / (
            QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"normalized": norm, "quality": q, "semantic": s, "total": total}
