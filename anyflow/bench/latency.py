"""``anyflow bench latency``: per-video latency of the exported any-step student vs the teacher (DESIGN §6).

Measures, on CPU at batch 1 with the same thread count for every engine, the wall time of one whole video
(text encode → N flow-map steps → VAE decode):

* the student at N ∈ {1, 2, 4, 8} on ONNX Runtime (``onnx/*.onnx``) and torch eager (``pipeline/``);
* the teacher ``WanPipeline`` at ``gate.teacher_steps`` steps with CFG (2 transformer calls per step: 50×2 NFE).

Each figure is the median of ``--repeats`` runs after one warm-up. Writes ``metrics/bench_latency.json`` (a DVC
metric). Numbers taken on a shared machine are inflated by contention; the file records the thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

from anyflow.config import Config

STEPS = (1, 2, 4, 8)
PROMPT = "a red circle moving left"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", default=None, help="release directory (default: <paths.root>/release)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--no-teacher", action="store_true", help="skip the 50x2-NFE teacher reference")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(cfg: Config, release: Path, repeats: int = 3, threads: int = 1, teacher: bool = True) -> dict:
    import torch

    from anyflow.export.runtime import OnnxBackend, ReleaseInfo, TorchBackend, generate, load_tokenizer
    from anyflow.stages.common import StagePaths

    torch.set_num_threads(threads)
    info = ReleaseInfo.read(release)
    tok = load_tokenizer(release)
    backends = {"onnxruntime": OnnxBackend(release, threads=threads), "torch": TorchBackend.from_release(release)}
    out: dict = {"threads": threads, "repeats": repeats, "batch": 1, "student_seconds": {}, "nfe": {}}
    with torch.no_grad():
        for name, be in backends.items():
            out["student_seconds"][name] = {
                str(n): median_seconds(lambda: generate(be, info, [PROMPT], n, seed=0, tokenizer=tok), repeats)
                for n in STEPS}
        out["nfe"]["student"] = {str(n): n for n in STEPS}
        if teacher:
            from diffusers import WanPipeline

            paths = StagePaths.of(cfg)
            root = Path(cfg.model.pretrained_dir) if cfg.model.source == "local" else paths.teacher
            pipe = WanPipeline.from_pretrained(str(root))
            pipe.set_progress_bar_config(disable=True)
            v = cfg.video
            n = cfg.gate.teacher_steps

            def teacher_video():
                return pipe(PROMPT, height=v.height, width=v.width, num_frames=v.num_frames, num_inference_steps=n,
                            guidance_scale=cfg.gate.teacher_guidance_scale, max_sequence_length=cfg.model.max_text_len,
                            generator=torch.Generator().manual_seed(0), output_type="np")

            out["teacher_seconds"] = median_seconds(teacher_video, max(1, repeats // 2))
            out["nfe"]["teacher"] = 2 * n
            out["speedup_vs_teacher"] = {be: {s: out["teacher_seconds"] / sec for s, sec in d.items()}
                                         for be, d in out["student_seconds"].items()}
    out["onnxruntime_vs_torch"] = {s: out["student_seconds"]["torch"][s] / out["student_seconds"]["onnxruntime"][s]
                                   for s in out["student_seconds"]["torch"]}
    return out


def main(cfg: Config, args) -> int:
    import json

    from anyflow.stages.common import StagePaths
    from anyflow.utils.io import write_json

    paths = StagePaths.of(cfg)
    release = Path(args.release) if getattr(args, "release", None) else paths.release
    result = run(cfg, release, repeats=args.repeats, threads=args.threads, teacher=not args.no_teacher)
    write_json(paths.metric("bench_latency"), result)
    print(json.dumps(result, indent=1))
    return 0
