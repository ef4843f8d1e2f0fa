"""``anyflow ablate``: issue [I]'s per-change ablation of the training math, as the pipeline ``ablation/dvc.yaml``.

Each *variant* reverts one fix of issue [I] (or all of them) and trains what that change touches — stage 1 and
stage 2 for a stage-1 change, stage 2 alone (from the pipeline's stage-1 adapter) for a stage-2 change — with the
same code, data, teacher and seeds as the root pipeline; ``final`` is the root pipeline's own stage-1 and stage-2
adapters. Every adapter is scored by the gate's own function (:func:`anyflow.stages.gate.adapter_rows`: the gate's
held-out prompts and noises, NFE ``gate.nfes``) against the teacher rows of ``artifacts/gate_reference``.

``anyflow ablate --variant NAME`` writes ``artifacts/ablation/NAME.json`` (its training runs in
``artifacts/ablation_work/NAME``: every run trains afresh, a killed one resumes from stage 1's or stage 2's
checkpoint); ``anyflow ablate --table`` joins them into ``metrics/ablation.json`` and
``artifacts/ablation/table.md`` (README's table): per variant, stage and NFE, the gate Total (the gate's dead
dimensions dropped), the paired latent distance to the teacher's 50×CFG sample and the latent Fréchet distance, with
the teacher at N steps × CFG as the reference line. :data:`CHOICES` are variants of the project's own measured
choices made after issue [I] (the guidance interval, stage 2's length and stage-1 weight), each set back to the
reference's or the earlier toy's value.

FAR's far context ([I] 8) is not a variant here: before the fix FAR training refused a partition longer than its
limit, so there is no "before" to train; README compares the FAR pipeline's runs with and without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from anyflow.config import Config, with_overrides
from anyflow.stages.common import StagePaths
from anyflow.utils.io import atomic_write_text, read_json, write_json

OUT = "ablation"
WORK = "ablation_work"

# name → (what it reverts, the params that revert it, whether stage 1 is retrained). The earlier behaviour of each
# fix is a param of its own (stage1.weight_time, stage1.adaptive_on, stage2.fake_times, stage2.dmd_weight; the real
# score's w and the EMA warm-up were params already); "w+1" is the real score at stage 1's fused w + 1, the
# reference's c + w·(c − u).
VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "final": ("every fix ([I] 1-6), the root pipeline's adapters", {}, False),
    "fake_times_unshifted": ("1: fake score trained at unshifted logit-normal t", {"stage2.fake_times":
                                                                                   "logit_normal"}, False),
    "real_score_w_plus_1": ("2: real score at CFG w + 1 (c + w·(c − u))", {"stage2.real_guidance_scale": "w+1"},
                            False),
    "lambda_unshifted": ("3: λ(t) at the unshifted draw", {"stage1.weight_time": "unshifted"}, True),
    "adaptive_unweighted": ("4: adaptive weight on the bare MSE", {"stage1.adaptive_on": "unweighted"}, True),
    "dmd_half_mse": ("5: DMD loss ½·MSE", {"stage2.dmd_weight": 0.5}, False),
    "no_ema_warmup": ("6: no EMA warm-up", {"stage1.optim.ema_warmup_steps": 0,
                                            "stage2.optim.ema_warmup_steps": 0}, True),
}
VARIANTS["before_all"] = ("1-6 reverted together (the code before issue [I])",
                          {k: v for _, o, _ in VARIANTS.values() for k, v in o.items()}, True)
# the project's own measured choices after issue [I] (not fixes of it, so not in before_all): each reverted to what the
# reference / the earlier toy did
CHOICES: dict[str, tuple[str, dict, bool]] = {
    "guidance_everywhere": ("CFG at every t, as the reference (model.guidance_min_t 0; the toy's is 0.8)",
                            {"model.guidance_min_t": 0.0}, True),
    "stage2_300_steps_weight_1": ("stage 2 for 300 steps with the stage-1 term × 1 (the toy's: 150 steps, × 4)",
                                  {"stage2.max_steps": 300, "stage2.stage1_weight": 1.0}, False),
}
VARIANTS.update(CHOICES)
# the final code at other training seeds (stage 1 and stage 2): the spread a difference must exceed to mean anything
SEEDS = (1, 2)
for _seed in SEEDS:
    VARIANTS[f"seed_{_seed}"] = (f"the final code at training seed {_seed} (stage 1 and 2): seed spread",
                                 {"stage1.seed": _seed, "stage2.seed": _seed}, True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--variant", choices=sorted(VARIANTS), help="train and score one variant")
    g.add_argument("--table", action="store_true", help="join the variants into metrics/ablation.json and table.md")
    p.add_argument("--reference", default="artifacts/gate_reference", help="the gate's teacher rows")
    p.add_argument("--no-progress", action="store_true")


def variant_overrides(cfg: Config, name: str) -> dict:
    """The dotted params of variant ``name`` for ``cfg`` ("w+1" resolved against stage 1's fused w)."""
    if name not in VARIANTS:
        raise ValueError(f"ablate: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
    return {k: (cfg.stage1.guidance_scale + 1 if v == "w+1" else v) for k, v in VARIANTS[name][1].items()}


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        raise FileExistsError(f"{link}: exists and is not a link to {target}")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)


def train_variant(cfg: Config, name: str, progress: bool) -> tuple[Config, dict[str, Path]]:
    """Train what variant ``name`` changes in ``artifacts/ablation_work/<name>``; returns its config and the EMA
    adapters to score (``final``: the root pipeline's)."""
    from anyflow.stages import stage1, stage2

    paths = StagePaths.of(cfg)
    _, overrides, retrain_stage1 = VARIANTS[name]
    if name == "final":
        return cfg, {"stage1": paths.stage1 / "ema_adapter.safetensors",
                     "stage2": paths.stage2 / "ema_adapter.safetensors"}
    work = paths.root / WORK / name
    vcfg = with_overrides(cfg, {**variant_overrides(cfg, name), "paths.root": str(work),
                                "paths.metrics": str(work / "metrics"), "paths.plots": str(work / "plots"),
                                "paths.checkpoints": str(work / "checkpoints")})
    for part in ("teacher", "data") + (() if retrain_stage1 else ("stage1",)):
        _link(Path(os.path.relpath(paths.root / part, work)), work / part)
    vpaths = StagePaths.of(vcfg)
    # DVC runs this stage because an input changed, so adapters a previous run finished here are stale: train again
    # (a killed run resumes from the stages' own checkpoints, which are keyed by their params, weights and data)
    for out in ((vpaths.stage1,) if retrain_stage1 else ()) + (vpaths.stage2,):
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
    if retrain_stage1:
        stage1.run(vcfg, eval_samples=0, progress=progress)
    stage2.run(vcfg, eval_samples=0, progress=progress)
    return vcfg, {"stage1": vpaths.stage1 / "ema_adapter.safetensors",
                  "stage2": vpaths.stage2 / "ema_adapter.safetensors"}


def score_variant(cfg: Config, adapters: dict[str, Path], reference: Path, progress: bool) -> dict:
    """Each adapter's gate rows (the gate's function, prompts, noises and NFEs) against the stored teacher rows."""
    from anyflow.stages import gate_reference
    from anyflow.stages.gate import adapter_rows, setup

    pipe, es, emb, neg, noise, bar, decode = setup(cfg, progress, "ablate", 2 * len(cfg.gate.nfes) * len(adapters))
    ref = gate_reference.load(reference, cfg, es)
    if getattr(es, "fvd", None) is not None:
        es.fvd.teacher = ref.fvd_teacher
    entries = {k: adapter_rows(cfg, k, p, "flowmap", "bidirectional", pipe, es, emb, noise, bar, decode,
                               ref.x_teacher, ref.teacher_features, ()) for k, p in adapters.items()}
    bar.close()
    return {"entries": entries, "teacher": ref.teacher, "teacher_at_budget": ref.budget}


def run_variant(cfg: Config, name: str, reference: Path, progress: bool = True) -> Path:
    from anyflow.stages.gate import without_timings

    t0 = time.perf_counter()
    _, adapters = train_variant(cfg, name, progress)
    scored = score_variant(cfg, adapters, reference, progress)
    out = {"variant": name, "reverts": VARIANTS[name][0], "overrides": variant_overrides(cfg, name),
           "retrained_stage1": VARIANTS[name][2], **without_timings(scored), "seconds": time.perf_counter() - t0}
    return write_json(StagePaths.of(cfg).root / OUT / f"{name}.json", out)


COLUMNS = (("total", "gate Total", "higher"), ("latent_distance", "paired latent distance", "lower"),
           ("frechet", "latent Fréchet", "lower"))


def table(cfg: Config) -> dict:
    """Join every variant's rows; the gate's dead-dimension rule is applied over all of them at once, so every Total
    is over the same dimensions."""
    from anyflow.stages.gate import drop_dead

    root = StagePaths.of(cfg).root / OUT
    missing = [n for n in VARIANTS if not (root / f"{n}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: no rows for {', '.join(missing)} (run `anyflow ablate --variant NAME`)")
    runs = {n: read_json(root / f"{n}.json") for n in VARIANTS}
    first = runs["final"]
    report = {"teacher": first["teacher"], "teacher_at_budget": {"by_nfe": first["teacher_at_budget"]},
              "candidate": runs["final"]["entries"]["stage2"],
              "baselines": {f"{n}/{k}": e for n, r in runs.items() for k, e in r["entries"].items()}}
    dead = drop_dead(report, cfg.gate.policy.teacher_accuracy_floor)

    def pick(row: dict, key: str) -> float:
        return float(row[key] if key == "total" else row["fidelity"][key])

    nfes = [str(n) for n in cfg.gate.nfes]
    rows = {}
    for n, r in runs.items():
        for stage in ("stage1", "stage2"):
            e = report["baselines"][f"{n}/{stage}"]
            rows[f"{n}/{stage}"] = {k: {nfe: pick(e["by_nfe"][nfe], k) for nfe in nfes} for k, _, _ in COLUMNS}
    teacher = {k: {nfe: pick(report["teacher_at_budget"]["by_nfe"][nfe], k) for nfe in nfes} for k, _, _ in COLUMNS}
    seeded = ["final", *(f"seed_{s}" for s in SEEDS)]
    spread = {stage: {k: {nfe: max(rows[f"{n}/{stage}"][k][nfe] for n in seeded) -
                          min(rows[f"{n}/{stage}"][k][nfe] for n in seeded) for nfe in nfes} for k, _, _ in COLUMNS}
              for stage in ("stage1", "stage2")}
    return {"nfes": nfes, "dead_dimensions": dead, "seed_spread": spread, "variants": {n: {"reverts": r["reverts"],
                                                                    "overrides": r["overrides"],
                                                                    "retrained_stage1": r["retrained_stage1"]}
                                                                for n, r in runs.items()},
            "rows": rows, "teacher_n_steps": teacher, "teacher_total": report["teacher"]["total"],
            "teacher_guidance_scale": cfg.gate.teacher_guidance_scale}


def markdown(t: dict) -> str:
    """README's ablation table: one block per measure, a row per variant and stage, a column per NFE."""
    lines = []
    for key, title, better in COLUMNS:
        lines += [f"**{title}** ({better} is better)", "",
                  "| variant | stage | " + " | ".join(f"NFE {n}" for n in t["nfes"]) + " |",
                  "| --- | --- | " + " | ".join("---:" for _ in t["nfes"]) + " |"]
        for name, row in t["rows"].items():
            variant, stage = name.split("/")
            lines.append(f"| {variant} | {stage} | " + " | ".join(f"{row[key][n]:.3f}" for n in t["nfes"]) + " |")
        for stage, sp in t["seed_spread"].items():
            lines.append(f"| *seed spread (max − min, seeds 0, {', '.join(map(str, SEEDS))})* | {stage} | "
                         + " | ".join(f"*{sp[key][n]:.3f}*" for n in t["nfes"]) + " |")
        lines.append("| teacher N steps × CFG | | " + " | ".join(f"{t['teacher_n_steps'][key][n]:.3f}"
                                                         for n in t["nfes"]) + " |")
        lines.append("")
    lines.append("Variants: " + "; ".join(f"`{n}` = {v['reverts']}" for n, v in t["variants"].items()) + ".")
    if t["dead_dimensions"]:
        lines.append("Dropped from Total (dead): " + "; ".join(f"{d} ({why})" for d, why in
                                                              t["dead_dimensions"].items()) + ".")
    return "\n".join(lines) + "\n"


def main(cfg: Config, args) -> int:
    paths = StagePaths.of(cfg)
    if args.table:
        t = table(cfg)
        write_json(paths.metric(OUT), t)
        atomic_write_text(paths.root / OUT / "table.md", markdown(t))
        print(markdown(t))
        return 0
    out = run_variant(cfg, args.variant, Path(args.reference), progress=not args.no_progress)
    r = read_json(out)
    print(f"ablate {args.variant}: " + json.dumps({k: {n: round(x["total"], 3) for n, x in e["by_nfe"].items()}
                                                   for k, e in r["entries"].items()}))
    return 0

