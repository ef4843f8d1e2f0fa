"""``anyflow gate-sanity``: the scorers behind the gate must rank known-better videos higher (DVC stage
``gate_sanity``, ``metrics/gate_sanity.json``); exit 1 names every broken ordering.

On the held-out specs (every one × ``gate.sanity.seeds_per_prompt`` seeds; seed column s renders the procedural
clips with seed ``sanity.seed + s`` and draws the teacher's noises from ``sanity.seed``):

(a) **step ordering** — procedural (ground-truth) clips ≥ the teacher at ``gate.teacher_steps`` × CFG (the gate's
    reference, ``gate.teacher_guidance_scale``) ≥ the teacher at each of ``sanity.teacher_steps`` × CFG, on Total.
    The spread over seeds: per seed column a Total; for each consecutive pair A ≥ B the paired differences
    d_s = Total_s(A) − Total_s(B) (the same specs and, between teacher rows, the same noises), their mean d̄ and
    standard error SE = sd(d)/√S. The ordering **holds** when d̄ > k·SE, is **broken** when d̄ < −k·SE, and is a
    **tie** in between (k = ``sanity.se_multiple``). Procedural ≥ reference teacher and reference teacher ≥ the
    fewest-step teacher must hold (known gaps the scorer has to resolve); a consecutive pair between teacher step
    counts must not be broken (adjacent step counts of a converged ODE solver may be equal in quality — the scorer
    may call them a tie, never the reverse beyond the noise).
(b) **corruptions** (:mod:`anyflow.eval.corruptions`) of the procedural clips: each must score below the clean
    clips on Total (pooled, and held beyond the spread over seed columns as in (a)) and on the dimension it targets.

Totals drop the dead dimensions (:func:`anyflow.eval.gate.dead_dimensions` over these rows with the gate's
``teacher_accuracy_floor``) exactly as the gate does.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from anyflow.config import Config
from anyflow.stages.common import StagePaths, teacher_dir
from anyflow.utils.io import write_json

PROCEDURAL = "procedural"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, help="teacher WanPipeline directory (default: artifacts/teacher)")
    p.add_argument("--report-only", action="store_true",
                   help="exit 0 whatever the verdict (metrics/gate_sanity.json still says FAILED and names it)")
    p.add_argument("--no-progress", action="store_true")


def paired(a: np.ndarray, b: np.ndarray, k: float) -> dict:
    """Paired comparison of per-seed Totals ``a`` (expected higher) and ``b``: mean difference, its standard error
    and the verdict — ``holds`` (d̄ > k·SE), ``broken`` (d̄ < −k·SE) or ``tie``. A zero SE (every seed the same
    difference) decides on the sign of d̄ alone."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    status = "holds" if mean > k * se and mean > 0 else ("broken" if mean < -k * se and mean < 0 else "tie")
    return {"mean_diff": mean, "se": se, "status": status}


def _scores(videos, specs, columns: int, drop: tuple[str, ...], realism=None) -> dict:
    """Pooled dimensions and Total, plus one Total per seed column (videos are seed-major); ``realism`` as in the
    gate (:class:`anyflow.eval.toy_fvd.Realism`)."""
    from anyflow.eval import vbench_like

    n = len(videos) // columns
    cols = [vbench_like.score_videos(list(videos[i * n:(i + 1) * n]), specs[i * n:(i + 1) * n],
                                     realism=realism)["dimensions"] for i in range(columns)]
    # every dimension is a mean over clips and the columns are equal in size: the pooled score is the columns' mean
    dims = {k: float(np.mean([c[k] for c in cols])) for k in cols[0]}
    per_seed = [vbench_like.aggregate(c, drop=drop)["total"] for c in cols]
    agg = vbench_like.aggregate(dims, drop=drop)
    return {"dimensions": dims, "columns": cols, "total": agg["total"], "quality": agg["quality"],
            "semantic": agg["semantic"], "per_seed_total": per_seed, "total_mean": float(np.mean(per_seed)),
            "total_sd": float(np.std(per_seed, ddof=1)) if columns > 1 else 0.0}


def _rescore(r: dict, drop: tuple[str, ...]) -> dict:
    from anyflow.eval import vbench_like

    per_seed = [vbench_like.aggregate(c, drop=drop)["total"] for c in r["columns"]]
    agg = vbench_like.aggregate(r["dimensions"], drop=drop)
    return {"total": agg["total"], "quality": agg["quality"], "semantic": agg["semantic"],
            "per_seed_total": per_seed, "total_mean": float(np.mean(per_seed)),
            "total_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0}


def evaluate(rows: dict, specs, columns: int, teacher_name: str, step_names: list[str], floor: float, k: float,
             corrupted: dict, realism=None) -> dict:
    """The sanity table from decoded clips: ``rows`` {name: videos} (procedural first, then the reference teacher,
    then ``step_names`` in decreasing steps), ``corrupted`` {corruption: videos of the procedural clips}."""
    from anyflow.eval import corruptions, vbench_like
    from anyflow.eval.gate import dead_dimensions

    scored = {name: _scores(v, specs, columns, (), realism) for name, v in rows.items()}
    raw = {name: r["dimensions"] for name, r in scored.items()}
    dead = dead_dimensions(raw[teacher_name], [d for name, d in raw.items() if name != teacher_name], floor)
    drop = tuple(dead)
    for r in scored.values():  # the Totals without the dead dimensions, as the gate computes them
        r.update(_rescore(r, drop))
    chain = [PROCEDURAL, teacher_name, *step_names]
    must_hold = {(PROCEDURAL, teacher_name), (teacher_name, step_names[-1])} if step_names else {
        (PROCEDURAL, teacher_name)}
    pairs = [(a, b) for a, b in zip(chain, chain[1:])] + ([(teacher_name, step_names[-1])]
                                                          if len(step_names) > 1 else [])
    orderings = []
    for a, b in pairs:
        p = paired(scored[a]["per_seed_total"], scored[b]["per_seed_total"], k)
        required = "holds" if (a, b) in must_hold else "not broken"
        ok = p["status"] == "holds" if required == "holds" else p["status"] != "broken"
        orderings.append({"better": a, "worse": b, "total_better": scored[a]["total"],
                          "total_worse": scored[b]["total"], **p, "required": required, "passed": ok})
    clean = scored[PROCEDURAL]
    corr = []
    for name, videos in corrupted.items():
        target = corruptions.TARGETS[name]
        s = _scores(videos, specs, columns, drop, realism)
        p = paired(clean["per_seed_total"], s["per_seed_total"], k)
        t_ok = s["total"] < clean["total"] and p["status"] == "holds"
        d_ok = s["dimensions"][target] < clean["dimensions"][target]
        corr.append({"corruption": name, "total": s["total"], "clean_total": clean["total"], **p,
                     "target": target, "target_score": s["dimensions"][target],
                     "clean_target_score": clean["dimensions"][target], "passed": bool(t_ok and d_ok),
                     "dimensions": s["dimensions"]})
    failed = [f"order:{o['better']}>{o['worse']}" for o in orderings if not o["passed"]] + [
        f"corruption:{c['corruption']}" for c in corr if not c["passed"]]
    return {"passed": not failed, "failed": failed, "dead_dimensions": dead, "se_multiple": k,
            "seeds": columns, "samples_per_row": len(specs),
            "rows": {name: {kk: v for kk, v in r.items() if kk != "columns"} for name, r in scored.items()},
            "orderings": orderings, "corruptions": corr}


def run(cfg: Config, teacher: str | None = None, progress: bool = True) -> dict:
    import torch

    from anyflow.data import toy
    from anyflow.eval import corruptions
    from anyflow.models.teacher import decode_latents, encode_prompts, latent_shape, load_teacher, negative_embeds
    from anyflow.stages.gate import _batched, teacher_samples
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    g, sc, shift = cfg.gate, cfg.gate.sanity, cfg.model.flow_shift
    if cfg.model.source == "local":
        raise ValueError("gate-sanity: needs the toy domain's procedural ground truth (model.source toy)")
    paths = StagePaths.of(cfg)
    _, held = toy.split(cfg.data.seed, cfg.data.heldout_fraction)
    columns = sc.seeds_per_prompt
    specs = [s for _ in range(columns) for s in held]  # seed-major: column c is specs[c·|held| : (c+1)·|held|]
    v = cfg.video
    procedural = np.stack([toy.render(s, sc.seed + i // len(held), v.num_frames, v.height, v.width)[0]
                           for i, s in enumerate(specs)])
    pipe = load_teacher(teacher_dir(cfg, paths, teacher))
    emb = encode_prompts(pipe, toy.prompts(specs), cfg.model.max_text_len)
    neg = negative_embeds(pipe, cfg.synthesize.negative_prompt, cfg.model.max_text_len)
    noise = torch.randn((len(specs), *latent_shape(pipe, cfg)), generator=torch.Generator().manual_seed(sc.seed))
    steps = [g.teacher_steps, *sc.teacher_steps]
    bar = tqdm(total=-(-len(specs) // 16) * 2 * len(steps), desc="gate_sanity", disable=not progress)
    rows = {PROCEDURAL: procedural}
    names = []
    for n in steps:
        with torch.no_grad():
            x = teacher_samples(pipe, noise, emb, neg, n, g.teacher_guidance_scale, shift, bar, f"teacher {n}",
                                cfg.model.guidance_min_t)
            frames = toy.to_pixels(_batched(lambda i, j: decode_latents(pipe, x[i:j]), len(specs), bar, "decode"))
        names.append(f"teacher_{n}xcfg")
        rows[names[-1]] = np.asarray(frames)
    bar.close()
    corrupted = {c: np.stack([corruptions.corrupt(c, clip, s, i) for i, (clip, s) in enumerate(zip(procedural, specs))])
                 for c in corruptions.CORRUPTIONS}
    from anyflow.stages.gate import ToyFVD

    fvd = ToyFVD.load(paths.root, specs, sc.seed, v)  # the realism dimension, as in the gate
    out = evaluate(rows, specs, columns, names[0], names[1:], g.policy.teacher_accuracy_floor, sc.se_multiple,
                   corrupted, realism=fvd.realism if fvd is not None else None)
    out["realism"] = fvd is not None
    out.update(teacher_guidance_scale=g.teacher_guidance_scale, guidance_convention="u + w·(c − u)",
               guidance_min_t=cfg.model.guidance_min_t,
               seconds=time.perf_counter() - t_start)
    write_json(paths.metric("gate_sanity"), out)
    return out


def table(out: dict) -> str:
    """The sanity table as text (what the stage prints)."""
    lines = [f"gate sanity {'PASSED' if out['passed'] else 'FAILED'} ({out['samples_per_row']} clips per row, "
             f"{out['seeds']} seed columns, ordering holds when mean paired ΔTotal > {out['se_multiple']:g}·SE)"]
    if out["dead_dimensions"]:
        lines.append("dropped: " + "; ".join(f"{d} ({why})" for d, why in out["dead_dimensions"].items()))
    lines.append(f"{'row':<22}{'Total':>8}{'±sd/seed':>10}")
    for name, r in out["rows"].items():
        lines.append(f"{name:<22}{r['total']:>8.4f}{r['total_sd']:>10.4f}")
    lines.append(f"{'ordering':<40}{'ΔTotal':>9}{'SE':>8}  status  required")
    for o in out["orderings"]:
        lines.append(f"{o['better'] + ' ≥ ' + o['worse']:<40}{o['mean_diff']:>9.4f}{o['se']:>8.4f}  "
                     f"{o['status']:<7} {o['required']}{'' if o['passed'] else '  ← FAILED'}")
    lines.append(f"{'corruption':<20}{'Total':>8}{'clean':>8}{'SE':>8}  {'target':<22}{'score':>7}{'clean':>7}")
    for c in out["corruptions"]:
        lines.append(f"{c['corruption']:<20}{c['total']:>8.4f}{c['clean_total']:>8.4f}{c['se']:>8.4f}  "
                     f"{c['target']:<22}{c['target_score']:>7.3f}{c['clean_target_score']:>7.3f}"
                     f"{'' if c['passed'] else '  ← FAILED'}")
    return "\n".join(lines)


def main(cfg: Config, args) -> int:
    out = run(cfg, getattr(args, "teacher", None), not getattr(args, "no_progress", False))
    print(table(out))
    if out["passed"]:
        return 0
    print("gate sanity FAILED: " + ", ".join(out["failed"]))
    return 0 if getattr(args, "report_only", False) else 1
