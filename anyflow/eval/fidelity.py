"""Model-free fidelity to the teacher.

* :func:`latent_distance` — RMS distance between the candidate's latents and the teacher's ODE solution from the
  same initial noise: sqrt(mean((z − z_teacher)²)) per sample, averaged over samples.
* :func:`frechet_distance` — Fréchet distance between Gaussians fitted to two feature sets,
  d² = |μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{½} Σ₂ Σ₁^{½})^{½}); the matrix square roots are taken with ``torch.linalg.eigh``
  on symmetric PSD matrices (Σ₁^{½} Σ₂ Σ₁^{½} is symmetric PSD, and its trace-sqrt equals tr((Σ₁Σ₂)^{½})), so no
  scipy is needed.
* :func:`video_features` — a fixed, weight-free feature space: each frame average-pooled to ``pool×pool`` RGB,
  flattened over the clip and projected by a fixed Gaussian matrix drawn from ``torch.Generator(seed)`` and
  scaled by 1/sqrt(in_dim) (a Johnson–Lindenstrauss projection: distances preserved in expectation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def latent_distance(z: torch.Tensor, z_teacher: torch.Tensor) -> float:
    """Mean over the batch of per-sample RMS(z − z_teacher); shapes must match (B, ...)."""
    if z.shape != z_teacher.shape:
        raise ValueError(f"latent_distance: shapes differ {tuple(z.shape)} vs {tuple(z_teacher.shape)}")
    d = (z.double() - z_teacher.double()).flatten(1)
    return float(d.pow(2).mean(1).sqrt().mean())


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Principal square root of a symmetric PSD matrix via eigh (negative round-off eigenvalues clamped to 0)."""
    a = (a + a.T) / 2
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_from_moments(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """d² between N(μ₁, Σ₁) and N(μ₂, Σ₂) (see module docstring), in float64."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    r1 = sqrtm_psd(s1)
    cross = sqrtm_psd(r1 @ s2 @ r1)
    d2 = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(cross)
    return float(d2.clamp_min(0))


def frechet_distance(feats1: torch.Tensor | np.ndarray, feats2: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance (d², as FID/FVD report it) between Gaussians fitted to (N, D) feature sets (unbiased cov)."""
    a, b = (torch.as_tensor(np.asarray(f) if not torch.is_tensor(f) else f).double() for f in (feats1, feats2))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: need (N≥2, D) sets of equal D, got {tuple(a.shape)}, {tuple(b.shape)}")
    return frechet_from_moments(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1), b.mean(0),
                                torch.cov(b.T).reshape(b.shape[1], -1))


def video_features(videos: Sequence[np.ndarray], dim: int = 32, pool: int = 8, seed: int = 0) -> torch.Tensor:
    """float64 (N, dim): fixed random projection of pooled pixels in [0, 1] (see module docstring)."""
    x = torch.as_tensor(np.stack([np.asarray(v) for v in videos])).double() / 255.0  # (N, F, H, W, 3)
    n, f, h, w, c = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(n * f, c, h, w)
    x = torch.nn.functional.adaptive_avg_pool2d(x, pool).reshape(n, -1)
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(x.shape[1], dim, generator=g, dtype=torch.float64) / x.shape[1] ** 0.5
    return x @ proj
