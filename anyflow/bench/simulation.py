"""``anyflow bench simulation``: cost of backward simulation, flow map vs consistency (paper Table 4's shape).

Seconds per training iteration (rollout forward + backward of a scalar loss on the rollout) at N = 4 and N = 16
on the student (base + LoRA ``student``), with the exit step k cycled over [0, N) — the expectation over k that
training draws:

* flow map (:func:`~anyflow.objectives.simulation.flowmap_backward_simulation`): three jumps with gradients,
  whatever N — expected ratio time(16)/time(4) ≈ 1;
* consistency (:func:`~anyflow.objectives.simulation.consistency_backward_simulation`): k + 1 sequential
  x0-predict / re-noise steps, gradient through the exit step — grows with N.

Writes ``metrics/bench_simulation.json`` and ``plots/bench_simulation.csv``. Timings are wall-clock on whatever
machine runs it (one CPU thread by default); compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from anyflow.config import Config
from anyflow.stages.common import StagePaths
from anyflow.utils.io import atomic_write_text, write_json

log = logging.getLogger(__name__)

METHODS = ("flowmap", "consistency")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, nargs="+", default=[4, 16], help="step budgets N (default: 4 16)")
    p.add_argument("--repeats", type=int, default=3, help="passes over k in [0, N) per cell (default 3)")
    p.add_argument("--batch-size", type=int, default=None, help="default: stage2.batch_size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def toy_latent_shape(cfg: Config) -> tuple[int, int, int, int]:
    """(C, F, H, W) of the toy latents: 2× temporal and 4× spatial VAE compression (tests/conftest.py geometry)."""
    v = cfg.video
    return cfg.model.vae_z_dim, (v.num_frames - 1) // 2 + 1, v.height // 4, v.width // 4


def bench_model(cfg: Config, seed: int = 0):
    """A student for timing: random toy-sized Wan → AnyFlow + ``student`` LoRA (cost does not depend on weights);
    for ``model.source: local`` the real transformer from ``model.pretrained_dir``."""
    import torch
    from diffusers import WanTransformer3DModel

    from anyflow.models.student import add_lora, student_from_teacher

    m = cfg.model
    torch.manual_seed(seed)
    if m.source == "local":
        teacher = WanTransformer3DModel.from_pretrained(m.pretrained_dir, subfolder="transformer")
    else:
        teacher = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=m.num_heads,
                                        attention_head_dim=m.head_dim, in_channels=m.vae_z_dim,
                                        out_channels=m.vae_z_dim, text_dim=m.text_d_model, freq_dim=m.freq_dim,
                                        ffn_dim=m.ffn_dim, num_layers=m.num_layers, cross_attn_norm=True)
    model = student_from_teacher(teacher, cfg.student)
    add_lora(model, cfg.student, "student")
    return model


def time_iteration(method: str, u, noise, num_steps: int, k: int, shift: float, generator) -> float:
    """Wall-clock seconds of one rollout + backward."""
    from anyflow.objectives.simulation import consistency_backward_simulation, flowmap_backward_simulation

    t0 = time.perf_counter()
    if method == "flowmap":
        x_hat = flowmap_backward_simulation(u, noise, num_steps, k, shift)
    else:
        x_hat = consistency_backward_simulation(u, noise, num_steps, k, shift, generator)
    x_hat.square().mean().backward()
    return time.perf_counter() - t0


def run_bench(cfg: Config, steps=(4, 16), repeats: int = 3, batch_size: int | None = None) -> dict:
    import torch

    from anyflow.models.student import student_velocity

    model = bench_model(cfg)
    b = batch_size or cfg.stage2.batch_size
    g = torch.Generator().manual_seed(0)
    shape = (b, *toy_latent_shape(cfg))
    text = torch.randn(b, cfg.model.max_text_len, cfg.model.text_d_model, generator=g)
    u = lambda z, t, r: student_velocity(model, z, t, r, text)  # noqa: E731
    noise = torch.randn(shape, generator=g)
    time_iteration("flowmap", u, noise, 4, 1, cfg.model.flow_shift, g)  # warm-up
    cells = {}
    for method in METHODS:
        for n in steps:
            times = [time_iteration(method, u, noise, n, k, cfg.model.flow_shift, g)
                     for _ in range(repeats) for k in range(n)]
            model.zero_grad(set_to_none=True)
            # expectation over k ∈ [0, N): mean over k of the per-k median across repeats
            per_k = [statistics.median(times[k::n]) for k in range(n)]
            cells[(method, n)] = sum(per_k) / n
            log.info("%s N=%d: %.4f s/iter", method, n, cells[(method, n)])
    out = {"setup": {"batch_size": b, "latent_shape": list(shape[1:]), "repeats": repeats,
                     "threads": torch.get_num_threads(), "k": "uniform over [0, N)"}}
    for method in METHODS:
        out[method] = {f"seconds_per_iter_N{n}": cells[(method, n)] for n in steps}
        if len(steps) >= 2:
            out[method][f"ratio_N{steps[-1]}_N{steps[0]}"] = cells[(method, steps[-1])] / cells[(method, steps[0])]
    if len(steps) >= 2:  # the paper's claim (Table 4): flow-map cost flat in N, consistency cost growing
        key = f"ratio_N{steps[-1]}_N{steps[0]}"
        out["expectation"] = {"flowmap_ratio_le_1.2": out["flowmap"][key] <= 1.2,
                              "consistency_ratio_ge_2": out["consistency"][key] >= 2.0}
    return out


def main(cfg: Config, args) -> int:
    import torch

    torch.set_num_threads(getattr(args, "threads", 1))
    steps = tuple(getattr(args, "steps", (4, 16)))
    res = run_bench(cfg, steps, getattr(args, "repeats", 3), getattr(args, "batch_size", None))
    paths = StagePaths.of(cfg)
    write_json(paths.metric("bench_simulation"), res)
    rows = ["method,num_steps,seconds_per_iter"]
    rows += [f"{m},{n},{res[m][f'seconds_per_iter_N{n}']:.6f}" for m in METHODS for n in steps]
    atomic_write_text(paths.plots / "bench_simulation.csv", "\n".join(rows) + "\n")
    for m in METHODS:
        print(m, {k: round(v, 4) for k, v in res[m].items()})
    return 0
