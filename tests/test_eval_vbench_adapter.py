"""VBench adapter: custom_input file layout round-trips the prompts; aggregation of VBench-shaped results;
a clear refusal without the package (never fake scores)."""

import re
from pathlib import Path

import imageio.v2 as imageio
import pytest

from anyflow.data import toy
from anyflow.eval import vbench_adapter as A
from anyflow.eval import vbench_like as V


def test_custom_input_layout(tmp_path):
    specs = [toy.Spec("red", "circle", "left"), toy.Spec("red", "circle", "left"), toy.Spec("blue", "square", "up")]
    paths = A.write_custom_input([toy.render(s, i)[0] for i, s in enumerate(specs)], [s.prompt for s in specs],
                                 tmp_path)
    assert sorted(p.name for p in paths) == ["a blue square moving up-0.mp4", "a red circle moving left-0.mp4",
                                             "a red circle moving left-1.mp4"]
    # VBench's get_prompt_from_filename: stem without a trailing -<digits>
    assert [re.sub(r"-\d+$", "", Path(p).stem) for p in paths] == [s.prompt for s in specs]
    frames = imageio.mimread(paths[0])
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)


def test_aggregate_results_matches_offline_aggregation():
    res = {"temporal_flickering": [0.97, [0.97]], "subject_consistency": [0.9, [0.9]], "color": 0.8}
    assert A.aggregate_results(res) == V.aggregate({"temporal flickering": 0.97, "subject consistency": 0.9,
                                                    "color": 0.8})


def test_unavailable_message(tmp_path):
    with pytest.raises(A.VBenchUnavailable, match="real VBench unavailable"):
        A.check_available(tmp_path / "missing")


FAKE_VBENCH = (
    "import json, os\n"
    "CALLS = []\n"
    "class VBench:\n"
    "    def __init__(self, device, full_info_dir, output_path):\n"
    "        self.out = output_path; CALLS.append(('init', device, os.path.basename(full_info_dir)))\n"
    "    def evaluate(self, videos_path, name, dimension_list, local, mode):\n"
    "        files = sorted(os.listdir(videos_path))\n"
    "        CALLS.append(('evaluate', files, dimension_list, local, mode))\n"
    "        size = sum(os.path.getsize(os.path.join(videos_path, f)) for f in files)\n"
    "        score = SCORE if SCORE is not None else 0.5 + (size % 997) / 2000  # depends on the clips\n"
    "        res = {d: [score, [{'video_path': 'x', 'video_results': score}]] for d in dimension_list}\n"
    "        json.dump(res, open(os.path.join(self.out, name + '_eval_results.json'), 'w'))\n")


def install_fake_vbench(tmp_path, monkeypatch, score=None):
    """A stand-in ``vbench`` package with VBench's interface (``VBench(device, full_info, out).evaluate(...)``) that
    records its calls and writes a results file in VBench's format: every dimension scores ``score``, or, with
    None, a number that depends on the clips' bytes. Weights dir: ``tmp_path`` (exists). Returns the module."""
    import importlib
    import sys

    pkg = tmp_path / "site" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "VBench_full_info.json").write_text("[]")
    (pkg / "__init__.py").write_text(f"SCORE = {score!r}\n" + FAKE_VBENCH)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.delitem(sys.modules, "vbench", raising=False)
    importlib.invalidate_caches()
    return importlib.import_module("vbench")


def test_run_vbench_feeds_custom_input_and_aggregates(tmp_path, monkeypatch):
    """A stand-in ``vbench`` package with VBench's interface records the call and writes a results file in VBench's
    format; run_vbench must call it in custom_input mode with local weights and aggregate what it wrote."""
    import sys

    install_fake_vbench(tmp_path, monkeypatch, score=0.9)
    specs = [toy.Spec("red", "circle", "left"), toy.Spec("blue", "square", "up")]
    A.write_custom_input([toy.render(s, i)[0] for i, s in enumerate(specs)], [s.prompt for s in specs],
                         tmp_path / "videos")
    dims = ("temporal_flickering", "subject_consistency")
    out = A.run_vbench(tmp_path / "videos", tmp_path / "results", "student_N4", dimensions=dims, device="cpu")
    calls = sys.modules["vbench"].CALLS
    assert calls[0] == ("init", "cpu", "VBench_full_info.json")
    assert calls[1] == ("evaluate", ["a blue square moving up-0.mp4", "a red circle moving left-0.mp4"], list(dims),
                        True, "custom_input")
    assert out == V.aggregate({"temporal flickering": 0.9, "subject consistency": 0.9})
    assert out["quality"] == pytest.approx(((0.9 - 0.6293) / (1 - 0.6293) + (0.9 - 0.1462) / (1 - 0.1462)) / 2)
    with pytest.raises(ValueError, match=r"'color'\] are not available in custom_input mode"):
        A.run_vbench(tmp_path / "videos", tmp_path / "r2", "x", dimensions=("color",), device="cpu")
