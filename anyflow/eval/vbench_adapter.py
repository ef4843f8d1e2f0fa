"""Real VBench on exported mp4s (GPU hosts with the ``vbench`` package and its weights staged locally).

Layout fed to ``VBench.evaluate(..., mode="custom_input")``: one flat directory of ``<prompt>-<i>.mp4`` files;
VBench's custom-input mode recovers the prompt from the file stem with a trailing ``-<digits>`` removed
(``vbench.utils.get_prompt_from_filename``). VBench's per-dimension results (``{dim: [mean, per_video]}``) are
aggregated by :func:`anyflow.eval.vbench_like.aggregate`, the same code as the offline scorer. Nothing is
downloaded and no score is ever invented: without the package or the weights this raises with one clear line.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from anyflow.eval import vbench_like


# VBench's custom_input mode supports only these (the semantic dimensions need VBench's own prompt suite); of them
# the weight-hungry ones need the pretrained models staged under VBENCH_CACHE_DIR (default ~/.cache/vbench).
CUSTOM_INPUT_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                           "aesthetic_quality", "imaging_quality", "temporal_flickering")


def weights_dir() -> Path:
    """Where VBench (``local=True``) reads its pretrained models: ``$VBENCH_CACHE_DIR`` or ``~/.cache/vbench``."""
    return Path(os.environ.get("VBENCH_CACHE_DIR", Path.home() / ".cache" / "vbench"))


class VBenchUnavailable(RuntimeError):
    """The vbench package or its locally staged weights are missing."""


def video_filename(prompt: str, index: int) -> str:
    """``<prompt>-<index>.mp4`` (VBench custom_input strips the ``-<index>`` suffix to get the prompt)."""
    if "/" in prompt:
        raise ValueError(f"prompt {prompt!r}: '/' cannot appear in a VBench custom_input file name")
    return f"{prompt}-{index}.mp4"


def write_custom_input(videos: Sequence[np.ndarray], prompts: Sequence[str], out_dir: str | Path, fps: int = 8
                       ) -> list[Path]:
    """Write uint8 (F, H, W, 3) clips as mp4 (imageio-ffmpeg) in the custom_input layout; returns the paths."""
    import imageio.v2 as imageio

    if len(videos) != len(prompts):
        raise ValueError(f"videos ({len(videos)}) and prompts ({len(prompts)}) differ in length")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    paths = []
    for v, p in zip(videos, prompts):
        i = counts.get(p, 0)
        counts[p] = i + 1
        path = out / video_filename(p, i)
        imageio.mimwrite(path, list(np.asarray(v, np.uint8)), fps=fps, macro_block_size=1)
        paths.append(path)
    return paths


def check_available(weights_dir: str | Path | None) -> None:
    """Raise :class:`VBenchUnavailable` with one line unless ``vbench`` imports and ``weights_dir`` exists."""
    if importlib.util.find_spec("vbench") is None:
        raise VBenchUnavailable("real VBench unavailable: the 'vbench' package is not installed (offline "
                                "VBench-style scores in anyflow.eval.vbench_like are used instead)")
    if not weights_dir or not Path(weights_dir).is_dir():
        raise VBenchUnavailable(f"real VBench unavailable: weights dir {weights_dir!r} not found (stage VBench's "
                                "pretrained models locally; nothing is downloaded)")


def raw_results(results: Mapping[str, object]) -> dict[str, float]:
    """VBench results ``{dim_with_underscores: [mean, per_video] | mean}`` → ``{dim_with_underscores: mean}`` (the
    names the gate's rows use for their dimensions)."""
    return {dim: float(val[0] if isinstance(val, (list, tuple)) else val) for dim, val in results.items()}


def aggregate_results(results: Mapping[str, object]) -> dict:
    """VBench results ``{dim_with_underscores: [mean, per_video] | mean}`` → :func:`vbench_like.aggregate`."""
    return vbench_like.aggregate({dim.replace("_", " "): v for dim, v in raw_results(results).items()})


def run_vbench(videos_dir: str | Path, out_dir: str | Path, name: str,
               dimensions: Sequence[str] = CUSTOM_INPUT_DIMENSIONS, device: str = "cuda", aggregate: bool = True
               ) -> dict:
    """Real VBench on a custom_input directory (:func:`write_custom_input`), local weights only; returns
    :func:`aggregate_results` of ``<out_dir>/<name>_eval_results.json`` (the file VBench writes), or with
    ``aggregate=False`` the raw per-dimension means (:func:`raw_results`)."""
    import json

    check_available(weights_dir())
    bad = sorted(set(dimensions) - set(CUSTOM_INPUT_DIMENSIONS))
    if bad:
        raise ValueError(f"VBench dimensions {bad} are not available in custom_input mode "
                         f"(available: {list(CUSTOM_INPUT_DIMENSIONS)})")
    from vbench import VBench  # the real package; nothing here downloads

    full_info = Path(importlib.util.find_spec("vbench").origin).parent / "VBench_full_info.json"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    VBench(device, str(full_info), str(out_dir)).evaluate(videos_path=str(videos_dir), name=name,
                                                           dimension_list=list(dimensions), local=True,
                                                           mode="custom_input")
    results_path = Path(out_dir) / f"{name}_eval_results.json"
    if not results_path.is_file():
        raise RuntimeError(f"{results_path}: VBench finished without writing its results file")
    results = json.loads(results_path.read_text())
    return aggregate_results(results) if aggregate else raw_results(results)


@dataclass(frozen=True)
class VBenchScorer:
    """VBench's own dimensions as a scorer of the gate's evaluation set (``gate.use_vbench``;
    :mod:`anyflow.eval.sets`): the clips as mp4s in ``<root>/clips_<sha256>/videos`` (custom_input layout), VBench's
    results beside them; returns the raw per-dimension means, which the set merges into the row, so they count in
    Quality and Total and are gated like the rest."""

    root: Path
    fps: int
    device: str

    def __call__(self, frames, prompts) -> dict[str, float]:
        import hashlib

        name = "clips_" + hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()[:16]
        videos = Path(self.root) / name / "videos"
        write_custom_input(list(frames), list(prompts), videos, fps=self.fps)
        return run_vbench(videos, Path(self.root) / name / "results", name, device=self.device, aggregate=False)
