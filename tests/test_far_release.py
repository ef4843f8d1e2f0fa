"""FAR (causal) releases: ``anyflow export`` of a FAR adapter and ``anyflow generate`` from it — text-to-video,
image-to-video and video-to-video chunk by chunk with the KV cache — against ``far_generate`` on the unmerged
adapter model; the pluggable chunk step; clear errors for bad inputs. Tiny random teacher and adapter built here."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from export_fixtures import tiny_config, tiny_teacher_pipeline

PROMPTS = ["a red circle moving left", "a blue square moving up"]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def far_release(tmp_path_factory):
    """(cfg, teacher pipe, adapter path, release dir): a random FAR adapter (non-zero LoRA, metadata architecture
    far) on the tiny teacher, exported with ``anyflow export``. Built once per session for this module and
    tests/test_far_release_onnx.py (``shared_build``, ~2.5 min on 2 cores); read-only."""
    from conftest import shared_build

    from anyflow.models.student import add_lora, save_adapter, student_from_teacher
    from anyflow.stages.export import ADAPTER, run

    def export(root):
        cfg = tiny_config(root)
        pipe = tiny_teacher_pipeline(0)
        pipe.save_pretrained(str(root / "artifacts" / "teacher"))
        scfg = replace(cfg.student, architecture="far", chunk_partition=(1, 2, 2))
        model = student_from_teacher(pipe.transformer, scfg)
        add_lora(model, scfg, ADAPTER)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        adapter = save_adapter(model, root / "artifacts" / "far_stage1" / "ema_adapter.safetensors", ADAPTER,
                               metadata={"architecture": "far", "chunk_partition": "1,2,2", "paradigm": "flowmap"})
        run(cfg, adapter=str(adapter), out=str(root / "artifacts" / "release_far"))

    root = shared_build(tmp_path_factory, "far_release", export)
    return (tiny_config(root), tiny_teacher_pipeline(0), root / "artifacts" / "far_stage1" / "ema_adapter.safetensors",
            root / "artifacts" / "release_far")


def reference(far_release, noise, prompts, partition=None, context=None, steps=4):
    """far_generate on the *unmerged* adapter model (LoRA active) with the teacher pipeline's text encoding."""
    from anyflow.models.far import far_generate
    from anyflow.models.student import load_student
    from anyflow.models.teacher import encode_prompts

    cfg, pipe, adapter, _ = far_release
    model = load_student(pipe.transformer, replace(cfg.student, architecture="far", chunk_partition=(1, 2, 2)),
                         adapter)
    text = encode_prompts(pipe, prompts, cfg.model.max_text_len)
    return far_generate(model, noise, text, steps, cfg.model.flow_shift, chunk_partition=partition, context=context)


def seeded_noise(b, f, seed):
    return torch.randn((b, 8, f, 8, 8), generator=torch.Generator().manual_seed(seed))


def backend_info(release):
    from anyflow.export.runtime import ReleaseInfo, TorchBackend

    return TorchBackend.from_release(release), ReleaseInfo.read(release)


def test_far_export_manifest_and_round_trip(far_release):
    """The release records architecture far + chunk_partition, has per-chunk transformer graphs under onnx/far/ (no
    onnx/transformer.onnx, with a note) and a VAE encoder graph per context length, and generate
    (torch, any N per chunk, any length) equals far_generate on the adapter model for the same noise and text."""
    from anyflow.export.far_runtime import generate_far
    from anyflow.export.manifest import verify_release
    from anyflow.export.runtime import generate

    _, _, adapter, release = far_release
    manifest = verify_release(release)
    assert manifest["architecture"] == "far" and manifest["chunk_partition"] == [1, 2, 2]
    assert manifest["runtime"]["architecture"] == "far" and manifest["runtime"]["temporal_factor"] == 2
    paths = {e["path"] for e in manifest["files"]}
    far = json.loads((release / "onnx" / "far" / "far_onnx.json").read_text())
    graphs = {f"onnx/far/{g}" for g in far["graphs"].values()} | {"onnx/far/far_onnx.json"}
    assert {f"chunk_{k}" for k in range(3)} <= set(far["graphs"]) and far["chunk_partition"] == [1, 2, 2]
    assert "onnx/transformer.onnx" not in paths and graphs | {
        "onnx/text_encoder.onnx", "onnx/vae_decoder_first.onnx", "onnx/vae_decoder_step.onnx",
        "onnx/vae_encoder_first.onnx", "onnx/vae_encoder_step.onnx"} <= paths
    assert "onnx/far/chunk_{k}.onnx" in manifest["notes"][0]
    assert manifest["components"] == ["transformer", "text_encoder", "vae_decoder", "vae_encoder"]
    assert manifest["parity"]["far_generate_4step"]["latents"]["max_abs"] <= 1e-5
    assert manifest["adapter"] == str(adapter)

    backend, info = backend_info(release)
    for steps, seed in ((4, 3), (2, 5)):
        gen = generate(backend, info, PROMPTS, steps, seed=seed)
        ref = reference(far_release, seeded_noise(2, 5, seed), PROMPTS, steps=steps)
        assert float(ref.abs().max()) > 0.5
        torch.testing.assert_close(gen.latents.permute(0, 2, 1, 3, 4), ref, rtol=0, atol=1e-4)
        assert gen.frames.shape == (2, 9, 32, 32, 3)
    long = generate_far(backend, info, PROMPTS[:1], 3, seed=7, num_chunks=5)  # 1+2+2+2+2 latent frames
    ref = reference(far_release, seeded_noise(1, 9, 7), PROMPTS[:1], partition=[1, 2, 2, 2, 2], steps=3)
    torch.testing.assert_close(long.latents.permute(0, 2, 1, 3, 4), ref, rtol=0, atol=1e-4)
    assert long.frames.shape == (1, 17, 32, 32, 3)


def write_png(path, seed=0, size=32):
    import imageio.v3 as iio

    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 30, np.uint8)
    img[8:20, 10:22] = rng.integers(100, 255, 3, dtype=np.uint8)  # a coloured block on a dark background
    iio.imwrite(path, img)
    return path


def write_clip(path, frames=9, seed=0, size=32):
    from anyflow.stages.generate import write_mp4

    rng = np.random.default_rng(seed)
    clip = np.full((frames, size, size, 3), 30, np.uint8)
    colour = rng.integers(100, 255, 3, dtype=np.uint8)
    for i in range(frames):
        clip[i, 10:20, 2 + 2 * i:12 + 2 * i] = colour
    return write_mp4(Path(path), clip, 8)


def test_image_to_video_keeps_the_given_first_frame(far_release, tmp_path):
    """--image: latent frame 0 is exactly the VAE encoding of the image, the later chunks are far_generate with it
    as context, and the decoded first frame is the image's VAE round trip (the causal VAE decodes frame 0 from
    latent frame 0 alone); the CLI writes that video."""
    import imageio.v3 as iio

    from anyflow.cli import main
    from anyflow.export.far_runtime import generate_far
    from anyflow.export.runtime import to_frames
    from anyflow.stages.generate import read_image

    *_, release = far_release
    backend, info = backend_info(release)
    png = write_png(tmp_path / "first.png")
    img = torch.from_numpy(read_image(png, info)).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    gen = generate_far(backend, info, PROMPTS, 3, seed=2, context_video=img)
    enc = backend.encode_video(img)
    assert enc.shape == (1, 8, 1, 8, 8)
    assert torch.equal(gen.latents[:, 0], enc[:, :, 0].expand(2, -1, -1, -1))
    ref = reference(far_release, seeded_noise(2, 5, 2), PROMPTS, context=enc.expand(2, -1, -1, -1, -1), steps=3)
    torch.testing.assert_close(gen.latents.permute(0, 2, 1, 3, 4), ref, rtol=0, atol=1e-4)
    round_trip = to_frames(backend.decode(enc))[0, 0]
    assert np.abs(gen.frames[:, 0].astype(int) - round_trip.astype(int)).max() <= 1
    t2v = generate_far(backend, info, PROMPTS, 3, seed=2)
    assert float((t2v.latents[:, 1:] - gen.latents[:, 1:]).abs().max()) > 1e-3  # the image conditions the rest

    out = tmp_path / "i2v.mp4"
    rc = main(["generate", "--release", str(release), "--backend", "torch", "--steps", "3", "--seed", "2",
               "--prompt", PROMPTS[0], "--image", str(png), "--out", str(out)])
    strip = iio.imread(out.with_suffix(".png"))
    assert rc == 0 and strip.shape == (32, 9 * 32, 3)
    assert np.abs(strip.astype(int) - np.concatenate(list(gen.frames[0]), axis=1).astype(int)).max() <= 1


def test_video_to_video_keeps_the_context_and_conditions_the_continuation(far_release, tmp_path):
    """--video: a 9-frame clip gives 5 context frames (latents 1+2, the last boundary before the last chunk); those
    latents are exactly the clip's encoding, the last chunk is far_generate's continuation, and another clip
    changes the continuation (causal conditioning)."""
    from anyflow.export.far_runtime import context_latent_frames, generate_far
    from anyflow.stages.generate import read_clip

    assert [context_latent_frames(n, [1, 2, 2], 2) for n in (1, 4, 5, 8, 9, 40)] == [1, 1, 3, 3, 3, 3]
    assert context_latent_frames(9, [1, 2, 2, 2, 2], 2) == 5 and context_latent_frames(0, [1, 2, 2], 2) == 0
    *_, release = far_release
    backend, info = backend_info(release)
    gens, encs = [], []
    for seed in (0, 1):
        frames = read_clip(write_clip(tmp_path / f"clip{seed}.mp4", seed=seed), info, [1, 2, 2])
        assert frames.shape == (5, 32, 32, 3)
        video = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
        gen = generate_far(backend, info, PROMPTS[:1], 4, seed=9, context_video=video)
        enc = backend.encode_video(video)
        assert enc.shape == (1, 8, 3, 8, 8)
        assert torch.equal(gen.latents[:, :3], enc.permute(0, 2, 1, 3, 4))
        ref = reference(far_release, seeded_noise(1, 5, 9), PROMPTS[:1], context=enc)
        torch.testing.assert_close(gen.latents.permute(0, 2, 1, 3, 4), ref, rtol=0, atol=1e-4)
        gens.append(gen)
    assert float((gens[0].latents[:, 3:] - gens[1].latents[:, 3:]).abs().max()) > 1e-3


def test_bad_inputs_give_errors_naming_the_file(far_release, tmp_path, capsys):
    from anyflow.cli import main
    from anyflow.export.runtime import ReleaseInfo
    from anyflow.stages.generate import read_clip, read_image

    *_, release = far_release
    info = ReleaseInfo.read(release)
    small = write_png(tmp_path / "small.png", size=16)
    with pytest.raises(ValueError, match=f"{small}.*16×16.*32×32"):
        read_image(small, info)
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match=f"{junk}: --image could not be read"):
        read_image(junk, info)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png", info)
    clip = write_clip(tmp_path / "small.mp4", size=16)
    with pytest.raises(ValueError, match=f"{clip}.*16×16"):
        read_clip(clip, info, [1, 2, 2])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=f"{bad}: --video could not be read"):
        read_clip(bad, info, [1, 2, 2])
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--release", str(release), "--backend", "torch", "--prompt", "x", "--image", str(small),
               "--out", str(out)])
    assert rc != 0 and not out.exists() and f"{small}: frames are 16×16" in capsys.readouterr().err


def test_onnxruntime_runs_a_far_release_through_any_plugged_chunk_step(far_release, monkeypatch):
    """TensorRT refuses a FAR release naming the way out; the ORT backend samples through whatever
    ``anyflow.export.far_onnx.chunk_step`` returns (here the torch step) and then matches torch (its text encoder and
    VAE decoder are the ONNX graphs) — the chunk step is the only FAR-specific part of the backend."""
    import sys
    import types

    from anyflow.export.far_runtime import TorchFarStep
    from anyflow.export.runtime import make_backend

    *_, release = far_release
    import anyflow.export

    def plug(module):  # the package attribute too: `from anyflow.export import far_onnx` reads it first
        monkeypatch.setitem(sys.modules, "anyflow.export.far_onnx", module)
        monkeypatch.setattr(anyflow.export, "far_onnx", module, raising=False)

    with pytest.raises(NotImplementedError, match="--backend torch"):
        make_backend("tensorrt", release)
    torch_be, info = backend_info(release)
    plugged = types.ModuleType("anyflow.export.far_onnx")
    plugged.chunk_step = lambda root, providers, threads: TorchFarStep(torch_be.pipeline.transformer)
    plug(plugged)
    from anyflow.export.runtime import generate

    ort = generate(make_backend("onnxruntime", release), info, PROMPTS, 2, seed=4)
    ref = generate(torch_be, info, PROMPTS, 2, seed=4)
    torch.testing.assert_close(ort.latents, ref.latents, rtol=0, atol=1e-4)
    assert np.abs(ort.frames.astype(int) - ref.frames.astype(int)).max() <= 1


def test_conditioning_flags_need_a_far_release(tmp_path, capsys):
    """--image / --video / --length-chunks on a bidirectional release: a clear error before any model loads."""
    import json

    from anyflow.cli import main

    rel = tmp_path / "release"
    rel.mkdir()
    (rel / "manifest.json").write_text(json.dumps({"files": [], "git_sha": "", "dvc_lock_digest": "", "gate": {},
                                                   "runtime": {"flow_shift": 5.0, "max_text_len": 16, "fps": 8,
                                                               "latent_shape": [8, 5, 8, 8]}}))
    png = write_png(tmp_path / "a.png")
    for extra, flag in ((["--image", str(png)], "--image"), (["--length-chunks", "4"], "--length-chunks")):
        rc = main(["generate", "--release", str(rel), "--no-verify", "--backend", "torch", "--prompt", "x",
                   "--out", str(tmp_path / "v.mp4"), *extra])
        err = capsys.readouterr().err
        assert rc != 0 and f"{flag}: {rel} is a bidirectional release" in err, err
    from anyflow.export.runtime import ReleaseInfo
    from anyflow.stages.generate import context_video

    args = type("A", (), {"image": str(png), "video": None, "length_chunks": None})()
    with pytest.raises(ValueError, match="bidirectional release"):
        context_video(args, ReleaseInfo.read(rel))
