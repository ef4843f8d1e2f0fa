"""``anyflow bench derivative``: cost of one stage-1 training step with dF/dt by central difference vs exact JVP.

Central difference (the reference) costs two extra no-grad forward passes on the r ≠ t samples; the JVP one
forward-mode pass (about the cost of 1.5–3 forwards, and it must run attention on the math SDPA kernel). The
step also carries the graded forward + backward and the no-grad unconditional branch of fused guidance.
Writes ``metrics/bench_derivative.json`` (seconds per step, median over repeats, and the ratio jvp/central).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import replace

from anyflow.bench.simulation import bench_model, toy_latent_shape
from anyflow.config import Config
from anyflow.stages.common import StagePaths
from anyflow.utils.io import write_json

log = logging.getLogger(__name__)

METHODS = ("central", "jvp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method (default 5)")
    p.add_argument("--batch-size", type=int, default=None, help="default: stage1.batch_size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def run_bench(cfg: Config, repeats: int = 5, batch_size: int | None = None) -> dict:
    import torch

    from anyflow.data.shards import Batch
    from anyflow.objectives.flowmap import stage1_loss

    model = bench_model(cfg)
    b = batch_size or cfg.stage1.batch_size
    g = torch.Generator().manual_seed(0)
    shape = (b, *toy_latent_shape(cfg))
    batch = Batch(latents=torch.randn(shape, generator=g), noise=torch.randn(shape, generator=g),
                  prompt_embeds=torch.randn(b, cfg.model.max_text_len, cfg.model.text_d_model, generator=g),
                  prompts=[""] * b, index=torch.arange(b))
    negative = torch.zeros(1, cfg.model.max_text_len, cfg.model.text_d_model)
    out: dict = {"setup": {"batch_size": b, "latent_shape": list(shape[1:]), "repeats": repeats,
                           "threads": torch.get_num_threads(), "time_split": list(cfg.stage1.time_split)}}
    for method in METHODS:
        c = replace(cfg, stage1=replace(cfg.stage1, derivative=method))
        times = []
        for i in range(repeats + 1):  # first is warm-up
            t0 = time.perf_counter()
            stage1_loss(model, c, batch, negative, torch.Generator().manual_seed(i)).backward()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        out[method] = {"seconds_per_step": statistics.median(times[1:])}
        log.info("%s: %.4f s/step", method, out[method]["seconds_per_step"])
    out["ratio_jvp_over_central"] = out["jvp"]["seconds_per_step"] / out["central"]["seconds_per_step"]
    return out


def main(cfg: Config, args) -> int:
    import torch

    torch.set_num_threads(getattr(args, "threads", 1))
    res = run_bench(cfg, getattr(args, "repeats", 5), getattr(args, "batch_size", None))
    write_json(StagePaths.of(cfg).metric("bench_derivative"), res)
    print({m: round(res[m]["seconds_per_step"], 4) for m in METHODS}, "jvp/central =",
          round(res["ratio_jvp_over_central"], 3))
    return 0
