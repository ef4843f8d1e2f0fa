"""Latent-statistics distances between student samples and the teacher's (model-free; stage 1/2 evaluation).

* ``latent_fd`` — Fréchet distance between Gaussian fits of per-sample latent statistics (per-channel mean, std
  and mean |frame difference|; 3·C features);
* ``channel_fd`` — Fréchet distance of the per-position channel vectors (C-dimensional);
* ``paired_mse`` — mean squared error to the teacher sample from the same noise (trajectory fidelity).
"""

from __future__ import annotations

import torch


def gaussian_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (rows are samples):
    ``‖μa − μb‖² + Tr(Σa + Σb − 2·(Σa^½ Σb Σa^½)^½)``, in float64 with symmetric eigendecompositions."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    ev, evec = torch.linalg.eigh(sa)
    sa_half = evec @ torch.diag(ev.clamp_min(0).sqrt()) @ evec.T
    inner = torch.linalg.eigvalsh(sa_half @ sb @ sa_half).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(sa) + torch.trace(sb) - 2 * inner)


def latent_features(x_BCFHW: torch.Tensor) -> torch.Tensor:
    """Per-sample statistics (B, 3C): per-channel mean, std and mean |x_{f+1} − x_f| over (F, H, W)."""
    flat = x_BCFHW.flatten(2)
    feats = [flat.mean(-1), flat.std(-1)]
    if x_BCFHW.shape[2] > 1:
        feats.append((x_BCFHW[:, :, 1:] - x_BCFHW[:, :, :-1]).abs().flatten(2).mean(-1))
    return torch.cat(feats, dim=1)


def channel_vectors(x_BCFHW: torch.Tensor) -> torch.Tensor:
    """Per-position channel vectors (B·F·H·W, C)."""
    return x_BCFHW.movedim(1, -1).reshape(-1, x_BCFHW.shape[1])


def distribution_metrics(samples: torch.Tensor, teacher_all: torch.Tensor, teacher_paired: torch.Tensor) -> dict:
    return {
        "latent_fd": gaussian_frechet(latent_features(samples), latent_features(teacher_all)),
        "channel_fd": gaussian_frechet(channel_vectors(samples), channel_vectors(teacher_all)),
        "paired_mse": float((samples - teacher_paired).square().mean()),
    }
