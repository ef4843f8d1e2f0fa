"""TensorRT engine building: clean refusal without a GPU/tensorrt; real build + parity where both exist."""

import pytest
import torch

NO_TRT = "TensorRT engines need an NVIDIA GPU and the tensorrt package; neither is installable on this machine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU refusal path")
def test_build_without_gpu_exits_nonzero_and_keeps_engines(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("tensorrt_build",
                                                  Path(__file__).parents[1] / "deploy" / "tensorrt_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    engines = tmp_path / "release" / "tensorrt"
    engines.mkdir(parents=True)
    (engines / "transformer.engine").write_bytes(b"previous engine")
    rc = mod.main(["--release", str(tmp_path / "release")])
    assert rc == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert (engines / "transformer.engine").read_bytes() == b"previous engine"
    assert sorted(p.name for p in engines.parent.iterdir()) == ["tensorrt"]


def test_tensorrt_backend_refuses_clearly_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    from anyflow.export.runtime import make_backend
    from anyflow.export.trt import TensorRTUnavailable

    with pytest.raises(TensorRTUnavailable, match="no CUDA GPU"):
        make_backend("tensorrt", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_TRT)
def test_engine_matches_onnxruntime(tiny_release):
    pytest.importorskip("tensorrt", reason=NO_TRT)
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("tensorrt_build",
                                                  Path(__file__).parents[1] / "deploy" / "tensorrt_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg, root, out = tiny_release
    assert mod.main(["--release", str(out.release), "--precision", "fp32", "--atol", "1e-3"]) == 0
    report = json.loads((out.release / "tensorrt" / "parity.json").read_text())
    assert all(c["max_abs"] < 1e-3 for c in report["components"].values())
