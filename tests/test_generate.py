"""``anyflow generate`` writes an mp4 and a PNG strip from an exported release; backends agree."""

import pytest

pytestmark = pytest.mark.slow


def test_generate_cli_onnxruntime_writes_video_and_strip(tiny_release, tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from anyflow.cli import main
    from anyflow.export.runtime import ReleaseInfo, TorchBackend, generate

    cfg, root, out = tiny_release
    mp4 = tmp_path / "v.mp4"
    rc = main(["generate", "--release", str(out.release), "--backend", "onnxruntime", "--steps", "4",
               "--prompt", "a red circle moving left", "--seed", "5", "--out", str(mp4)])
    assert rc == 0
    video = iio.imread(mp4)
    assert video.shape == (9, 32, 32, 3)
    strip = iio.imread(mp4.with_suffix(".png"))
    ref = generate(TorchBackend.from_release(out.release), ReleaseInfo.read(out.release),
                   ["a red circle moving left"], 4, seed=5)
    assert strip.shape == (32, 9 * 32, 3)
    assert np.abs(strip.astype(int) - np.concatenate(list(ref.frames[0]), axis=1).astype(int)).max() <= 1
    assert np.abs(video.astype(int) - ref.frames[0].astype(int)).mean() < 12  # lossy H.264 on 32×32 frames


def test_generate_refuses_a_tampered_release(tiny_release, tmp_path):
    import shutil

    from anyflow.cli import main

    cfg, root, out = tiny_release
    copy = tmp_path / "release"
    shutil.copytree(out.release, copy)
    p = copy / "onnx" / "transformer.onnx"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))
    rc = main(["generate", "--release", str(copy), "--backend", "onnxruntime", "--steps", "1",
               "--prompt", "x", "--out", str(tmp_path / "v.mp4")])
    assert rc != 0 and not (tmp_path / "v.mp4").exists()


def test_unknown_steps_rejected():
    from anyflow.export.runtime import flow_map_schedule

    with pytest.raises(ValueError, match="--steps"):
        flow_map_schedule(0, 5.0)
    s = flow_map_schedule(4, 5.0)
    shift = lambda x: 5 * x / (1 + 4 * x)  # noqa: E731
    assert s.tolist() == pytest.approx([shift(1.0), shift(0.75), shift(0.5), shift(0.25), 0.0])


def test_cli_backend_choices_match_runtime():
    from anyflow.export.runtime import BACKENDS
    from anyflow.stages import generate

    assert generate.BACKENDS == BACKENDS
