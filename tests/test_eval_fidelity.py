"""Fréchet distance: identical sets ≈ 0, closed forms for Gaussians; latent distance; fixed features."""

import numpy as np
import pytest
import torch

from anyflow.data import toy
from anyflow.eval import fidelity as FD


def test_frechet_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1 = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    mu1, mu2 = torch.zeros(6, dtype=torch.float64), torch.arange(6, dtype=torch.float64)
    # Σ₂ = c Σ₁: tr(Σ₁ + cΣ₁ − 2√c Σ₁) = tr(Σ₁)(1 − √c)²
    c = 2.25
    expect = float((mu1 - mu2).pow(2).sum() + torch.trace(s1) * (1 - c**0.5) ** 2)
    assert FD.frechet_from_moments(mu1, s1, mu2, c * s1) == pytest.approx(expect, rel=1e-9)
    # diagonal covariances: Σ (√a − √b)²
    da, db = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    assert FD.frechet_from_moments(torch.zeros(3), torch.diag(da), torch.zeros(3), torch.diag(db)) == pytest.approx(2.0)
    # non-commuting pair: symmetric in its arguments
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s2 = b @ b.T
    assert FD.frechet_from_moments(mu1, s1, mu2, s2) == pytest.approx(FD.frechet_from_moments(mu2, s2, mu1, s1),
                                                                      rel=1e-8)


def test_frechet_on_samples():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert FD.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    y = 2.0 * torch.randn(4000, 3, generator=g, dtype=torch.float64) + 1.0
    assert FD.frechet_distance(x, y) == pytest.approx(3 * 1.0 + 3 * (2 - 1) ** 2, rel=0.1)


def test_latent_distance_and_features():
    z = torch.zeros(2, 4, 3)
    assert FD.latent_distance(z, z + 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        FD.latent_distance(z, torch.zeros(2, 3))
    specs = toy.all_specs()
    vids = [toy.render(s, i)[0] for i, s in enumerate(specs)]
    f1 = FD.video_features(vids)
    assert torch.equal(f1, FD.video_features(vids))  # fixed feature space
    same = FD.frechet_distance(f1[:24], f1[:24])
    shifted = [np.clip(v.astype(int) + 60, 0, 255).astype(np.uint8) for v in vids]
    assert same < 1e-9 < FD.frechet_distance(f1, FD.video_features(shifted))
