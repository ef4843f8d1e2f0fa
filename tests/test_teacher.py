"""Toy teacher: the saved WanPipeline dir reloads offline and reproduces latents; the VAE keeps colour and
position; the ODE sampler follows the shifted schedule; wan-* profiles never download."""

import numpy as np
import pytest
import torch

from anyflow.config import build
from anyflow.data import toy
from anyflow.models.teacher import (decode_latents, encode_prompts, encode_video, latent_shape, load_teacher,
                                    negative_embeds, ode_schedule, shift_time, teacher_ode_sample)

pytestmark = pytest.mark.slow


def _sample(pipe, cfg, seed):
    emb = encode_prompts(pipe, ["a red circle moving left", "a blue square moving up"], cfg.model.max_text_len)
    neg = negative_embeds(pipe, "", cfg.model.max_text_len)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((2, *latent_shape(pipe, cfg)), generator=g)
    return teacher_ode_sample(pipe.transformer, noise, emb, neg, steps=4, guidance_scale=3.0, shift=5.0)


def test_reload_reproduces_latents(toy_teacher_dir):
    from diffusers import WanPipeline

    cfg, path = toy_teacher_dir
    direct = WanPipeline.from_pretrained(str(path), local_files_only=True)  # plain diffusers load works offline
    assert direct.vae.config.z_dim == cfg.model.vae_z_dim
    a = _sample(load_teacher(path), cfg, seed=5)
    b = _sample(load_teacher(path), cfg, seed=5)
    c = _sample(load_teacher(path), cfg, seed=6)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert latent_shape(direct, cfg) == (cfg.model.vae_z_dim, 5, 8, 8)


def test_latents_normalised_to_unit_scale(toy_teacher_dir):
    cfg, path = toy_teacher_dir
    pipe = load_teacher(path)
    train, _ = toy.split()
    frames, _ = toy.sample_batch(train, 8, np.random.default_rng(1), 9, 32, 32)
    z = encode_video(pipe, toy.to_model_space(frames))
    per_channel_std = z.std(dim=(0, 2, 3, 4))
    assert z.mean().abs() < 0.5 and (per_channel_std > 0.3).all() and (per_channel_std < 2.0).all()


def test_vae_keeps_colour_and_position(toy_teacher_dir):
    cfg, path = toy_teacher_dir
    pipe = load_teacher(path)
    _, held = toy.split()
    for spec, seed in zip(held[:4], range(4)):
        frames, gt = toy.render(spec, seed)
        rec = toy.to_pixels(decode_latents(pipe, encode_video(pipe, toy.to_model_space(frames))))[0]
        target = np.array(toy.COLORS[spec.color], np.float32)
        for f in (0, 4, 8):
            mask = (frames[f] == target).all(-1)
            dist = np.abs(rec[f].astype(np.float32) - target).sum(-1)
            fg = dist < 120  # reconstructed pixels close to the prompted colour
            assert fg.sum() > 0.5 * mask.sum(), (spec, f)
            ys, xs = np.nonzero(fg)
            ys0, xs0 = np.nonzero(mask)
            assert abs(xs.mean() - xs0.mean()) < 2.0 and abs(ys.mean() - ys0.mean()) < 2.0, (spec, f)


def test_ode_schedule_and_exact_velocity():
    """With the exact velocity of a point-mass data distribution, Euler on the PF-ODE lands on x0 exactly."""
    ts = ode_schedule(7, 5.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    assert torch.allclose(ts, shift_time(torch.linspace(1, 0, 8), 5.0))
    x0 = torch.randn(1, 2, 3, 4, 4)

    class PointMass(torch.nn.Module):  # v(z, t) = (z − x0)/t  for data = δ(x0): straight paths
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            t = (timestep / 1000).view(-1, 1, 1, 1, 1)
            cond = (encoder_hidden_states.abs().sum((1, 2)) > 0).float().view(-1, 1, 1, 1, 1)
            return ((hidden_states - x0) / t * cond,)

    noise = torch.randn(1, 2, 3, 4, 4)
    out = teacher_ode_sample(PointMass(), noise, torch.ones(1, 2, 3), torch.zeros(1, 2, 3), 7, 1.0, 5.0)
    assert torch.allclose(out, x0, atol=1e-5)
    # CFG u + w(c − u) with u = 0 scales the conditional velocity by w
    out_w = teacher_ode_sample(PointMass(), noise, torch.ones(1, 2, 3), torch.zeros(1, 2, 3), 1, 2.0, 5.0)
    assert torch.allclose(out_w, noise - 2 * (noise - x0), atol=1e-5)


def test_wan_profile_missing_dir_is_clear_error(tmp_path):
    from anyflow.stages.teacher import verify_local

    cfg = build({"model": {"source": "local", "pretrained_dir": str(tmp_path / "nope")},
                 "data": {"prompts_file": "vbench"}})  # a local source needs a prompt source too (as the wan profiles)
    with pytest.raises(FileNotFoundError, match="model.pretrained_dir .*nope"):
        verify_local(cfg)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    cfg = build({"model": {"source": "local", "pretrained_dir": str(tmp_path / "half")},
                 "data": {"prompts_file": "vbench"}})
    with pytest.raises(FileNotFoundError, match="missing transformer"):
        verify_local(cfg)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_teacher(tmp_path / "nope")


def test_vae_training_clips_mix_in_the_other_domain():
    """teacher.vae_other_fraction: 0 gives exactly the shapes clips; otherwise that share of the clips are driving
    scenes (lane markings, road colour) and the rest are the shapes clips the same stream would give."""
    from anyflow.eval import driving_scorers as ds
    from anyflow.models.toy_teacher import _clips, _vae_clips

    cfg = build({})
    specs, _ = toy.split(0, 0.25)
    plain, _ = _clips(specs, 16, np.random.default_rng(3), cfg)
    assert torch.equal(_vae_clips(specs, 16, np.random.default_rng(3), cfg, 0.0), plain)
    mixed = _vae_clips(specs, 64, np.random.default_rng(4), cfg, 0.5)
    pixels = toy.to_pixels(mixed)
    is_road = np.array([ds.lane_markings(p) == 1.0 for p in pixels])
    assert 0.3 < is_road.mean() < 0.7  # ~Binomial(64, 0.5)
    ref, _ = _clips(specs, 64, np.random.default_rng(4), cfg)
    kept = ~is_road
    assert torch.equal(mixed[torch.from_numpy(kept)], ref[torch.from_numpy(kept)])


def test_single_frame_convs_give_the_same_reconstruction_and_gradients():
    """The VAE's image phase convolves with the newest temporal tap only (toy_teacher.single_frame_convs): the same
    reconstruction and the same gradient for every parameter (older taps: exactly 0 either way) as the stock causal
    convs with their two zero frames — older taps made non-zero so a dropped tap would show — a clip of several
    frames goes through untouched, and the stock forward is back after the block."""
    from anyflow.models import toy_teacher

    cfg = build(profile="toy")
    vae = toy_teacher.build(cfg, seed=0).vae
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=g))

    def step(x):
        vae.zero_grad(set_to_none=True)
        rec = toy_teacher.decode_unclamped(vae, vae.encode(x).latent_dist.mean)
        (rec - x).pow(2).mean().backward()
        return rec.detach(), {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}

    for frames in (1, 5):
        x = torch.randn(2, 3, frames, 32, 32, generator=g)
        stock_rec, stock_grads = step(x)
        with toy_teacher.single_frame_convs(vae):
            rec, grads = step(x)
        torch.testing.assert_close(rec, stock_rec, rtol=1e-5, atol=1e-6)
        assert grads.keys() == stock_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], stock_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    assert not any("forward" in vars(m) for m in vae.modules())
    older = [m.weight.grad[:, :, :-1] for m in vae.modules()
             if isinstance(m, torch.nn.Conv3d) and m.weight.grad is not None and m.kernel_size[0] == 3]
    assert older and any(t.abs().max() > 0 for t in older)  # the 5-frame clip trained the older taps (last step)


def test_low_time_rows_are_drawn_below_their_bound_and_fraction_zero_is_the_earlier_teacher():
    """``teacher.low_time_fraction``: that share of every batch trains at t ~ U(0, low_time_max) (shift 5's
    logit-normal puts 0.7 % of its draws below t = 0.3); at 0 the draws, hence the weights, are the earlier ones."""
    import torch

    from anyflow.models.toy_teacher import train_transformer

    class Probe(torch.nn.Module):  # records the timesteps it is trained at; a linear map, so it has gradients
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            self.seen.append(timestep.detach() / 1000.0)
            return (hidden_states * self.w,)

    z0, emb = torch.randn(8, 2, 1, 2, 2), torch.randn(8, 3, 4)

    def times(low):
        probe = Probe()
        train_transformer(probe, z0, emb, torch.zeros(1, 3, 4), 50, 16, 1e-3, 0.1, 5.0, 0, progress=False,
                          low_time=low)
        return torch.stack(probe.seen), probe.w.detach()

    base, w_base = times((0.0, 0.4))
    again, w_again = times((0.0, 0.9))  # the bound is unused at fraction 0
    assert torch.equal(base, again) and torch.equal(w_base, w_again)
    assert float((base < 0.3).float().mean()) < 0.03
    low, _ = times((0.25, 0.4))
    assert torch.equal(low[0, :12], base[0, :12])  # the other rows keep the law (and, at the first step, the draws)
    assert float((low[:, :12] < 0.3).float().mean()) < 0.03
    assert float(low[:, 12:].max()) < 0.4 and float(low[:, 12:].mean()) == pytest.approx(0.2, abs=0.03)
