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
