"""Toy FVD ([J] item 3): the Fréchet distance against closed forms, and a tiny in-test feature network that ranks
clean < blurred < more blurred, clean < noised / frozen, trains deterministically and round-trips through
safetensors."""

import numpy as np
import pytest
import torch

from anyflow.data import driving, toy
from anyflow.eval import fidelity
from anyflow.eval import toy_fvd as T

TINY = dict(steps=20, batch_size=16, lr=3e-3, width=8, feature_dim=32)


def exact_samples(mu: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples whose empirical mean is μ and unbiased covariance Σ exactly (whitened, then coloured)."""
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    return z @ torch.linalg.cholesky(cov).T + mu


def closed_form(mu1, s1, mu2, s2) -> float:
    """|μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 Σ √λ(Σ₁Σ₂) (the eigenvalues of Σ₁Σ₂ are real and ≥ 0)."""
    lam = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0)
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * lam.sqrt().sum())


def test_frechet_matches_gaussian_closed_form():
    assert T.frechet_distance is fidelity.frechet_distance  # one implementation, re-exported
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    s1, s2 = a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64), b @ b.T + 0.2 * torch.eye(5, dtype=torch.float64)
    mu1, mu2 = torch.zeros(5, dtype=torch.float64), torch.linspace(-1, 2, 5, dtype=torch.float64)
    x, y = exact_samples(mu1, s1, 300, 1), exact_samples(mu2, s2, 400, 2)
    assert T.frechet_distance(x, y) == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=1e-8)
    # N(0, I) vs N(m, 4I) in 3-D: |m|² + 3·(2 − 1)²
    eye = torch.eye(3, dtype=torch.float64)
    m = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    assert T.frechet_distance(exact_samples(0 * m, eye, 50, 3), exact_samples(m, 4 * eye, 60, 4)) == \
        pytest.approx(9.0 + 3.0, rel=1e-9)
    assert T.frechet_distance(x.numpy(), x.numpy()) == pytest.approx(0.0, abs=1e-8)


def test_labels_cover_both_domains():
    assert T.label_of(toy.Spec("blue", "triangle", "up")) == {"color": 2, "object": 2, "motion": 2}
    assert T.label_of(driving.Spec("red", "truck", "right")) == {"color": 0, "object": 4, "motion": 5}
    clips = T.make_clips(8, seed=0, tag=0, num_frames=9, height=32, width=32)
    assert clips.pixels.shape == (8, 9, 32, 32, 3) and clips.pixels.dtype == np.uint8
    assert [type(s) for s in clips.specs[:2]] == [toy.Spec, driving.Spec]
    other = T.make_clips(8, seed=0, tag=1, num_frames=9, height=32, width=32)
    assert not set(clips.seeds) & set(other.seeds)


def test_corruptions():
    v = T.make_clips(2, 0, 0, 9, 32, 32).pixels
    assert np.array_equal(T.blur(v, 1e-3), v)  # σ → 0: identity
    assert T.blur(v, 2.0).astype(int).std() < v.astype(int).std()
    assert np.array_equal(T.add_noise(v, 8.0, seed=1), T.add_noise(v, 8.0, seed=1))
    still = T.freeze(v, 1.0)
    assert (still == still[:, :1]).all()
    half = T.freeze(v, 0.5)
    assert np.array_equal(half[:, :4], v[:, :4]) and (half[:, 4:] == v[:, 4:5]).all()


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(123)  # the global RNG must not matter (init comes from the seed)
    clips = T.make_clips(96, seed=0, tag=0, num_frames=9, height=32, width=32)
    net, info = T.train(clips, seed=0, **TINY)
    assert info["loss_last"] < info["loss_first"]
    return net


def test_tiny_net_ranks_corruptions(tiny_net):
    # measured (20 steps, 48 clips): same 0.002, blur σ1 0.22, σ2 0.37, noise σ48 0.012, still 0.014
    ref = T.make_clips(48, 0, 2, 9, 32, 32).pixels
    clean = T.make_clips(48, 0, 3, 9, 32, 32).pixels
    f_ref = tiny_net.features(ref)
    assert f_ref.shape == (48, TINY["feature_dim"]) and f_ref.dtype == torch.float64
    fvd = lambda v: T.frechet_distance(f_ref, tiny_net.features(v))  # noqa: E731
    same = fvd(clean)
    b1, b2 = fvd(T.blur(clean, 1.0)), fvd(T.blur(clean, 2.0))
    assert same < b1 < b2, (same, b1, b2)
    assert same < fvd(T.add_noise(clean, 48.0, seed=0)), same
    assert same < fvd(T.freeze(clean, 1.0)), same
    # fvd_against takes pixels as an array, a list of clips or model-space tensors alike
    assert T.fvd_against(ref, clean, tiny_net) == pytest.approx(same)
    assert T.fvd_against(list(ref), toy.to_model_space(clean), tiny_net) == pytest.approx(same)
    with pytest.raises(ValueError, match="trained on 9"):
        tiny_net.features(ref[:, :5])


def test_training_is_deterministic():
    clips = T.make_clips(16, seed=0, tag=0, num_frames=9, height=32, width=32)
    kw = dict(TINY, steps=2, batch_size=8)
    a, _ = T.train(clips, seed=5, **kw)
    torch.manual_seed(999)
    b, _ = T.train(clips, seed=5, **kw)
    c, _ = T.train(clips, seed=6, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_load_roundtrip(tiny_net, tmp_path):
    sha = T.save_fvd_net(tiny_net, tmp_path / "fvd" / T.MODEL_FILE, extra={"seed": 0})
    assert sha == T.save_fvd_net(tiny_net, tmp_path / "again.safetensors", extra={"seed": 0})  # canonical bytes
    net = T.load_fvd_net(tmp_path / "fvd")  # the directory or the file
    assert net.config == tiny_net.config and not net.training
    v = T.make_clips(4, 0, 4, 9, 32, 32).pixels
    assert torch.equal(net.features(v), tiny_net.features(v))
    with pytest.raises(FileNotFoundError, match="anyflow fvd-net"):
        T.load_fvd_net(tmp_path / "missing")
    from anyflow.utils.io import write_safetensors

    write_safetensors(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"format": "something-else"})
    with pytest.raises(ValueError, match="not a toy FVD network"):
        T.load_fvd_net(tmp_path / "other.safetensors")


@pytest.mark.slow
def test_fvd_net_stage(tmp_path):
    """``anyflow fvd-net`` with tiny settings: outputs, metrics, a loadable net; the report is the same bytes on a
    re-run (no timings in it)."""
    from anyflow.config import build
    from anyflow.stages import fvd_net

    cfg = build({"paths": {k: str(tmp_path / k) for k in ("root", "metrics", "plots", "checkpoints")},
                 "fvd": {"train_clips": 128, "heldout_clips": 32, "steps": 30, "batch_size": 16, "width": 8,
                         "feature_dim": 32, "sanity_clips": 64, "noise_stds": [16.0, 48.0]},
                 "gate": {"num_prompts": 4, "seeds_per_prompt": 4}})
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = fvd_net.run(cfg)
    finally:
        torch.set_num_threads(before)
    out = tmp_path / "root" / "fvd_net"
    assert (out / T.MODEL_FILE).is_file() and (out / "report.json").is_file()
    metrics = __import__("json").loads((tmp_path / "metrics" / "fvd_net.json").read_text())
    assert set(metrics["heldout_accuracy"]) >= {"color", "object", "motion", "all"}
    assert metrics["sanity"]["floor_at_gate_size"]["num_samples"] == 16
    assert report["sanity"]["passed"], report["sanity"]
    first = (out / "report.json").read_bytes()
    # the same bytes whatever the process's thread count (it trains on one intra-op thread, and leaves the count)
    torch.set_num_threads(2)
    try:
        fvd_net.run(cfg)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert (out / "report.json").read_bytes() == first and report["torch_threads"] == 1
    net = T.load_fvd_net(out)
    assert net.config["feature_dim"] == 32


def test_realism_scores_procedural_clips_above_atypical_ones(tiny_net):
    """The realism dimension (VBench's aesthetic-quality slot): clips from the fitted distribution (other renders of
    the same specs) score ~1; clips whose pixels no procedural clip has — the subject desaturated to grey, a washed-out
    background, heavy noise — score lower, the further off the lower. (On the real net and the toy teacher the
    one-step sample scores 0.27 against 0.93 at 50 steps: README, "Scorer sanity".)"""
    specs = [toy.Spec(c, s, d) for c in list(toy.COLORS)[:2] for s in toy.SHAPES for d in list(toy.DIRECTIONS)[:2]]
    video = type("V", (), {"num_frames": 9, "height": 32, "width": 32})
    realism = T.Realism.fit(tiny_net, specs, seed=11, video=video)
    clean = T.reference_clips(specs * 2, seed=12, video=video)
    px = clean.astype(np.float64)
    grey = np.repeat(px.mean(-1, keepdims=True), 3, -1).astype(np.uint8)
    washed = (px + 60).clip(0, 255).astype(np.uint8)
    r = {"clean": realism(clean), "grey": realism(grey), "noise": realism(T.add_noise(clean, 48.0)),
         "washed": realism(washed)}
    assert r["clean"].shape == (len(clean),) and all(((0 < v) & (v <= 1)).all() for v in r.values())
    m = {k: float(v.mean()) for k, v in r.items()}
    assert m["clean"] > 0.95 and m["grey"] < m["clean"] - 0.15 and m["noise"] < m["grey"], m
    assert m["washed"] < 0.1, m


def test_fvd_net_stage_on_a_real_model_profile_writes_why_and_exits_0(tmp_path):
    """One dvc.yaml for every profile: on ``model.source: local`` the toy FVD has no domain to train on and the gate
    (a prompt set) does not use it, so the stage writes a README saying so, no network, and succeeds — `dvc repro`
    of a wan profile stopped here before (`make wan-smoke` found it)."""
    import argparse

    from anyflow.config import build
    from anyflow.stages import fvd_net
    from anyflow.utils.io import read_json

    cfg = build({"model": {"pretrained_dir": str(tmp_path / "wan")}, "data": {"prompts_file": "p.txt"},
                 "paths": {"root": str(tmp_path / "artifacts"), "metrics": str(tmp_path / "metrics")}},
                profile="wan-1.3b")
    assert fvd_net.main(cfg, argparse.Namespace()) == 0
    out = tmp_path / "artifacts" / "fvd_net"
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]
    assert "not applicable" in (out / "README.md").read_text().lower()
    assert "model.source 'local'" in read_json(tmp_path / "metrics" / "fvd_net.json")["skipped"]
