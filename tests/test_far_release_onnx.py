"""FAR (causal) releases on ONNX Runtime (issue [H] deliverables 4 + 6): ``anyflow export`` of a FAR adapter writes
the per-chunk transformer graphs (onnx/far/) and VAE encoder graphs, listed and hashed in the manifest; generation
on ONNX Runtime (T2V, I2V, V2V) equals the torch runtime on the same noise and text and scores alike; missing or
corrupt graphs give errors naming the file. Reuses the tiny FAR release of tests/test_far_release.py."""

import hashlib
import shutil

import numpy as np
import pytest
import torch

from test_far_release import PROMPTS, backend_info, far_release, write_clip, write_png  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


def ort_backend(release):
    from anyflow.export.runtime import make_backend

    return make_backend("onnxruntime", release, threads=1)


def test_export_lists_the_far_graphs_and_records_ort_parity(far_release):
    """Every onnx/far and vae_encoder file is in the manifest with its sha256; the export's ORT-vs-torch check
    (4 steps per chunk) and the encoder parity are recorded, and both videos were scored."""
    from anyflow.export.manifest import verify_release

    *_, release = far_release
    manifest = verify_release(release)
    entries = {e["path"]: e for e in manifest["files"]}
    onnx = sorted(p.relative_to(release).as_posix() for p in (release / "onnx").rglob("*") if p.is_file())
    assert any(p.startswith("onnx/far/chunk_") for p in onnx)
    assert {"onnx/vae_encoder_first.onnx", "onnx/vae_encoder_step.onnx"} <= set(onnx)
    for rel in onnx:
        assert entries[rel]["sha256"] == hashlib.sha256((release / rel).read_bytes()).hexdigest(), rel
    parity = manifest["parity"]
    gen = parity["far_onnx_generate_4step"]
    assert gen["latents"]["ref_scale"] > 0.5 and gen["latents"]["max_abs"] <= 1e-4
    assert gen["frames_max_uint8_diff"] <= 1
    assert set(parity["vae_encoder"]) == {"frames=1", "frames=5"}
    assert max(v["max_abs"] for v in parity["vae_encoder"].values()) <= 1e-5
    scores = parity["scores"]["generate_4step"]
    assert scores["total_diff"] <= 0.01 and scores["torch"]["total"] > 0


def test_onnxruntime_t2v_equals_torch_and_scores_alike(far_release, tmp_path):
    """T2V on ONNX Runtime (chunk graphs with the KV cache as tensors) == the torch runtime at N = 4 and 2 steps per
    chunk; the videos score alike with the gate's scorer; the CLI writes the same video."""
    import imageio.v3 as iio

    from anyflow.cli import main
    from anyflow.export.far_onnx import GraphChunkStep
    from anyflow.export.runtime import generate
    from anyflow.stages.export import rate_alike

    *_, release = far_release
    torch_be, info = backend_info(release)
    ort = ort_backend(release)
    assert isinstance(ort.chunk_step(), GraphChunkStep)
    for steps in (4, 2):
        got = generate(ort, info, PROMPTS, steps, seed=6)
        ref = generate(torch_be, info, PROMPTS, steps, seed=6)
        assert float(ref.latents.abs().max()) > 0.5
        torch.testing.assert_close(got.latents, ref.latents, rtol=0, atol=1e-4)
        assert np.abs(got.frames.astype(int) - ref.frames.astype(int)).max() <= 1
    scores = rate_alike(ref.frames, got.frames, PROMPTS)
    assert scores["total_diff"] <= 0.01 and scores["max_dimension_diff"] <= 0.02

    out = tmp_path / "t2v.mp4"
    rc = main(["generate", "--release", str(release), "--backend", "onnxruntime", "--threads", "1", "--steps", "2",
               "--seed", "6", "--prompt", PROMPTS[0], "--out", str(out)])
    strip = iio.imread(out.with_suffix(".png"))
    assert rc == 0 and np.abs(strip.astype(int) - np.concatenate(list(ref.frames[0]), axis=1)).max() <= 1


def test_onnxruntime_i2v_and_v2v_equal_torch(far_release, tmp_path):
    """--image / --video on ONNX Runtime: the ONNX VAE encoder gives the torch encoding, and the continuation equals
    the torch runtime's (context kept exactly, later chunks conditioned on it)."""
    from anyflow.cli import main
    from anyflow.export.far_runtime import generate_far
    from anyflow.stages.generate import read_clip, read_image

    *_, release = far_release
    torch_be, info = backend_info(release)
    ort = ort_backend(release)
    img = read_image(write_png(tmp_path / "first.png"), info)
    clip = read_clip(write_clip(tmp_path / "clip.mp4"), info, [1, 2, 2])
    for frames, n_ctx in ((img, 1), (clip, 3)):
        video = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
        enc = ort.encode_video(video)
        torch.testing.assert_close(enc, torch_be.encode_video(video), rtol=0, atol=1e-5)
        got = generate_far(ort, info, PROMPTS, 3, seed=2, context_video=video)
        ref = generate_far(torch_be, info, PROMPTS, 3, seed=2, context_video=video)
        assert torch.equal(got.latents[:, :n_ctx], enc.permute(0, 2, 1, 3, 4).expand(2, -1, -1, -1, -1))
        torch.testing.assert_close(got.latents, ref.latents, rtol=0, atol=1e-4)
        assert np.abs(got.frames.astype(int) - ref.frames.astype(int)).max() <= 1
    rc = main(["generate", "--release", str(release), "--backend", "onnxruntime", "--threads", "1", "--prompt", "x",
               "--image", str(tmp_path / "first.png"), "--out", str(tmp_path / "i2v.mp4")])
    assert rc == 0 and (tmp_path / "i2v.mp4").is_file()


def test_longer_than_the_chunk_graphs_is_refused_shorter_runs_on_onnxruntime(far_release):
    """Longer than the exported chunk graphs: refused, naming the graphs and the way out. Shorter: the transformer's
    chunk graphs cover it and the streaming VAE decoder has no fixed length (the unrolled decoder graph refused a
    2-chunk video), so ONNX Runtime generates it and equals the torch runtime."""
    from anyflow.export.far_runtime import generate_far

    *_, release = far_release
    torch_backend, info = backend_info(release)
    with pytest.raises(ValueError, match=r"onnx/far.*\[1, 2, 2\].*--backend torch"):
        generate_far(ort_backend(release), info, PROMPTS[:1], 2, seed=0, num_chunks=4)
    got = generate_far(ort_backend(release), info, PROMPTS[:1], 2, seed=0, num_chunks=2)
    ref = generate_far(torch_backend, info, PROMPTS[:1], 2, seed=0, num_chunks=2)
    assert got.frames.shape == ref.frames.shape and got.frames.shape[1] == 5  # 3 latent frames, temporal factor 2
    torch.testing.assert_close(got.latents, ref.latents, rtol=0, atol=1e-4)
    assert np.abs(got.frames.astype(int) - ref.frames.astype(int)).max() <= 1


def test_missing_or_corrupt_graphs_name_the_file(far_release, tmp_path, capsys):
    from anyflow.cli import main
    from anyflow.export.manifest import ReleaseVerificationError, verify_release

    *_, release = far_release
    corrupt = shutil.copytree(release, tmp_path / "corrupt")
    (corrupt / "onnx" / "far" / "chunk_1.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ReleaseVerificationError, match="onnx/far/chunk_1.onnx"):
        verify_release(corrupt)
    with pytest.raises(ValueError, match=r"chunk_1.onnx: ONNX Runtime cannot load"):
        ort_backend(corrupt)
    rc = main(["generate", "--release", str(corrupt), "--backend", "onnxruntime", "--prompt", "x",
               "--out", str(tmp_path / "v.mp4")])
    assert rc != 0 and "onnx/far/chunk_1.onnx" in capsys.readouterr().err

    missing = shutil.copytree(release, tmp_path / "missing")
    (missing / "onnx" / "far" / "chunk_2.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="chunk_2.onnx"):
        ort_backend(missing)
    (missing / "onnx" / "vae_encoder_step.onnx").unlink()
    shutil.rmtree(missing / "onnx" / "far")
    with pytest.raises(FileNotFoundError, match="onnx/far/far_onnx.json"):
        ort_backend(missing)
    _, info = backend_info(release)
    ort = ort_backend(release)
    ort.root = missing  # the encoder's step graph is gone
    with pytest.raises(NotImplementedError, match="vae_encoder_step.onnx.*--backend torch"):
        ort.encode_video(torch.zeros(1, 3, 5, 32, 32))


@pytest.mark.parametrize("frames", [1, 3, 5, 9, 13])
def test_streaming_vae_encoder_equals_diffusers_at_any_length(far_release, frames):
    """The release's VAE encoder graphs (vae_encoder_first, then one 4-frame chunk per call) encode any context
    length as ``AutoencoderKLWan.encode`` does — a partial last chunk (3 frames) is left out by both."""
    from diffusers import AutoencoderKLWan

    from anyflow.export import onnx_export as ox

    *_, release = far_release
    vae = AutoencoderKLWan.from_pretrained(str(release / "pipeline" / "vae")).eval()
    video = torch.rand((1, 3, frames, 32, 32), generator=torch.Generator().manual_seed(frames)) * 2 - 1
    err = ox.encoder_parity(release / "onnx", vae, video)
    assert err.ref_scale > 0.1 and err.max_abs < 1e-5, err
