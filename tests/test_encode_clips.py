"""anyflow encode-clips: a folder of mp4s + captions → shards in the synthesis format whose latents are exactly
encode_video of the (decoded) frames; unreadable clips, wrong sizes and missing captions are errors naming the file."""

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from anyflow.config import build
from anyflow.data import driving, toy
from anyflow.stages import encode_clips as ec


def _write_mp4(path, frames, fps=8):
    import imageio

    imageio.mimwrite(str(path), list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=10)


def _cfg(tmp_path, teacher_path):
    cfg = build({"paths": {"root": str(tmp_path / "artifacts"), "metrics": str(tmp_path / "metrics"),
                           "plots": str(tmp_path / "plots"), "checkpoints": str(tmp_path / "ckpt")},
                 "synthesize": {"samples_per_shard": 2, "threads": 1}})
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "teacher").symlink_to(teacher_path)
    return cfg


def _folder(tmp_path, n=3):
    folder = tmp_path / "clips"
    folder.mkdir()
    specs = driving.all_specs()[:n]
    for i, spec in enumerate(specs):
        frames, _ = driving.render(spec, i)
        _write_mp4(folder / f"clip{i}.mp4", frames)
    # captions: the first two in captions.json, the third in a .txt beside its mp4 (both layouts are accepted)
    (folder / "captions.json").write_text(json.dumps({"clip0.mp4": specs[0].prompt, "clip1.mp4": specs[1].prompt}))
    (folder / "clip2.txt").write_text(specs[2].prompt + "\n")
    return folder, specs


def test_read_folder_errors_name_the_file(tmp_path):
    cfg = build({})
    folder, specs = _folder(tmp_path)
    names, frames, captions = ec.read_folder(folder, cfg)
    assert names == ["clip0.mp4", "clip1.mp4", "clip2.mp4"] and captions == [s.prompt for s in specs]
    # the decoded clip is the rendered one up to H.264 loss (exact colours are not kept, positions are)
    ref, _ = driving.render(specs[0], 0)
    assert frames[0].shape == ref.shape and np.abs(frames[0].astype(float) - ref).mean() < 12

    (folder / "clip2.txt").write_text("something else")
    (folder / "captions.json").write_text(json.dumps({"clip0.mp4": "a", "clip1.mp4": "b", "clip2.mp4": "c"}))
    with pytest.raises(ec.ClipError, match="clip2.mp4.*different captions"):
        ec.read_folder(folder, cfg)
    (folder / "clip2.txt").unlink()
    (folder / "captions.json").write_text(json.dumps({"clip0.mp4": "a", "clip1.mp4": "b"}))
    with pytest.raises(ec.ClipError, match=r"clip2\.mp4: no caption"):
        ec.read_folder(folder, cfg)
    (folder / "clip2.txt").write_text("c")

    (folder / "clip1.mp4").write_bytes(b"this is not an mp4")
    with pytest.raises(ec.ClipError, match=r"clip1\.mp4: unreadable clip"):
        ec.read_folder(folder, cfg)
    frames, _ = driving.render(specs[1], 1)
    _write_mp4(folder / "clip1.mp4", frames[:, :16])  # 9 frames of 16x32
    with pytest.raises(ec.ClipError, match=r"clip1\.mp4: wrong size 9 frames of 16x32"):
        ec.read_folder(folder, cfg)
    _write_mp4(folder / "clip1.mp4", frames[:5])
    with pytest.raises(ec.ClipError, match=r"clip1\.mp4: wrong size 5 frames of 32x32"):
        ec.read_folder(folder, cfg)


@pytest.mark.slow  # the session toy teacher fixture (~30-60 s once)
def test_encode_folder_gives_shards_equal_to_encode_video(tmp_path, toy_teacher_dir):
    from anyflow.data.shards import ShardSet
    from anyflow.models.teacher import encode_prompts, encode_video, latent_shape, load_teacher

    torch.set_num_threads(1)
    _, teacher_path = toy_teacher_dir
    cfg = _cfg(tmp_path, teacher_path)
    folder, specs = _folder(tmp_path)
    names, frames, captions = ec.read_folder(folder, cfg)
    out = ec.run(cfg, folder, progress=False)
    assert out["clips"] == 3
    shards = ShardSet(tmp_path / "artifacts" / "domain_data")  # verifies every sha256
    assert [e["num_samples"] for e in shards.entries] == [2, 1]  # synthesize.samples_per_shard = 2
    data = shards.load_all()
    pipe = load_teacher(teacher_path)
    ref = encode_video(pipe, toy.to_model_space(np.stack(frames)))
    assert data.prompts == captions
    assert torch.allclose(data.latents, ref, atol=1e-5)
    assert torch.allclose(data.prompt_embeds, encode_prompts(pipe, captions, cfg.model.max_text_len))
    seeds = [cfg.domain.seed * 1_000_000 + i for i in range(3)]
    assert torch.equal(data.noise[2], torch.randn(latent_shape(pipe, cfg),
                                                  generator=torch.Generator().manual_seed(seeds[2])))
    assert shards.negative_embeds().shape == (1, cfg.model.max_text_len, data.prompt_embeds.shape[-1])
    assert shards.manifest["meta"]["source"] == "clips" and shards.manifest["meta"]["clips"] == names

    # a bad clip fails before anything is written, and the previous shards stay intact
    before = (tmp_path / "artifacts" / "domain_data" / "manifest.json").read_text()
    (folder / "clip0.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ec.ClipError, match=r"clip0\.mp4"):
        ec.run(cfg, folder, progress=False)
    assert (tmp_path / "artifacts" / "domain_data" / "manifest.json").read_text() == before


def test_cli_names_missing_folder(tmp_path):
    cfg = replace(build({}), domain=replace(build({}).domain, source="clips", clips_dir=None))
    with pytest.raises(ValueError, match="domain.clips_dir"):
        ec.run(cfg, None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ec.read_folder(tmp_path / "nowhere", cfg)


# --------------------------------------------------------------------------------------------- params mode (the stage)
def test_synthetic_clips_are_the_rendered_train_split():
    """Params mode, source synthetic: clip i is the domain's train spec i (cycled) rendered with seed
    domain.seed·10⁶ + i, captioned by its prompt — what `anyflow domain` rendered inline before the stage existed."""
    cfg = build({"domain": {"num_samples": 5, "seed": 3}})
    frames, captions, meta = ec.synthetic_clips(cfg)
    train, _ = driving.split(cfg.data.seed, cfg.data.heldout_fraction)
    specs = [train[i % len(train)] for i in range(5)]
    assert captions == driving.prompts(specs) and meta == {"source": "synthetic", "domain": "driving",
                                                           "clip_seeds": [3_000_000 + i for i in range(5)]}
    v = cfg.video
    for i in (0, 4):
        assert np.array_equal(frames[i], driving.render(specs[i], 3_000_000 + i, v.num_frames, v.height, v.width)[0])
    assert not np.array_equal(frames[0], driving.render(specs[0], 0, v.num_frames, v.height, v.width)[0])


def _inline_reference(pipe, cfg, out):
    """The pre-stage inline path of `anyflow domain` (domain_shards at c7860f5), kept verbatim as the reference."""
    d, v = cfg.domain, cfg.video
    train, _ = driving.split(cfg.data.seed, cfg.data.heldout_fraction)
    specs = [train[i % len(train)] for i in range(d.num_samples)]
    seeds = [d.seed * 1_000_000 + i for i in range(d.num_samples)]
    frames = [driving.render(s, sd, v.num_frames, v.height, v.width)[0] for s, sd in zip(specs, seeds)]
    ec.encode_to_shards(pipe, cfg, frames, driving.prompts(specs), out,
                        meta={"source": "synthetic", "domain": d.domain, "clip_seeds": seeds})


@pytest.mark.slow  # the session toy teacher fixture
def test_params_mode_both_sources_and_domain_reads_the_stage_output(tmp_path, toy_teacher_dir):
    from safetensors import safe_open

    from anyflow.data.shards import ShardSet
    from anyflow.models.teacher import encode_video, load_teacher
    from anyflow.stages import domain
    from anyflow.stages.common import StagePaths

    torch.set_num_threads(1)
    _, teacher_path = toy_teacher_dir
    cfg = _cfg(tmp_path, teacher_path)
    cfg = replace(cfg, domain=replace(cfg.domain, num_samples=5))
    paths = StagePaths.of(cfg)
    out = tmp_path / "artifacts" / "domain_data"
    with pytest.raises(FileNotFoundError, match=r"continued/dvc\.yaml:encode_clips"):
        domain.domain_shards(cfg, paths)

    # synthetic: `anyflow encode-clips` (no DIR) == the inline shards `anyflow domain` wrote before, tensor for tensor
    assert ec.main(cfg, argparse.Namespace(dir=None, out=None)) == 0
    pipe = load_teacher(teacher_path)
    _inline_reference(pipe, cfg, tmp_path / "ref")
    got, ref = ShardSet(out), ShardSet(tmp_path / "ref")
    # same meta and entries (files, prompts, seeds); not the sha256: safetensors 0.8 writes the __metadata__ keys
    # (prompts, seeds) in hash-map order, so two writes of the same shard can differ in header bytes only
    strip = lambda m: {**m, "shards": [{k: v for k, v in e.items() if k != "sha256"} for e in m["shards"]]}  # noqa
    assert strip(got.manifest) == strip(ref.manifest) and len(got.entries) == 3
    for e in got.entries:
        with safe_open(str(out / e["file"]), "pt") as fa, safe_open(str(tmp_path / "ref" / e["file"]), "pt") as fb:
            assert fa.metadata() == fb.metadata()
    a, b = got.load_all(), ref.load_all()
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("latents", "noise", "prompt_embeds"))
    assert a.prompts == b.prompts and len(a.prompts) == 5
    assert domain.domain_shards(cfg, paths) == out
    # stale shards (params now ask for another domain) are refused naming the stage
    toy_cfg = replace(cfg, domain=replace(cfg.domain, domain="shapes"))
    with pytest.raises(ValueError, match=r"stale.*encode_clips"):
        domain.domain_shards(toy_cfg, paths)

    # clips: params mode encodes domain.clips_dir; the shard latents are encode_video of the decoded clips
    folder, specs = _folder(tmp_path)
    clips_cfg = replace(cfg, domain=replace(cfg.domain, source="clips", clips_dir=str(folder)))
    with pytest.raises(ValueError, match="stale"):
        domain.domain_shards(clips_cfg, paths)  # synthetic shards are not the clips the params name
    m = ec.run(clips_cfg, progress=False)
    assert m["clips"] == 3 and m["source"] == "clips"
    shards = ShardSet(out)
    assert shards.manifest["meta"]["clips_dir"] == str(folder) and shards.manifest["meta"]["source"] == "clips"
    _, frames, captions = ec.read_folder(folder, cfg)
    data = shards.load_all()
    assert data.prompts == captions == [s.prompt for s in specs]
    assert torch.allclose(data.latents, encode_video(pipe, toy.to_model_space(np.stack(frames))), atol=1e-5)
    assert domain.domain_shards(clips_cfg, paths) == out
