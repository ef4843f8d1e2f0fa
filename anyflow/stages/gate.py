"""``anyflow gate``: quality of a student across step budgets against the teacher (DESIGN §5), DVC stage ``gate``.

On a fixed held-out prompt set (``gate.num_prompts`` prompts cycled over the domain's held-out split, each with
``gate.seeds_per_prompt`` noises drawn from ``gate.seed``) it samples

* the teacher: ``gate.teacher_steps`` Euler steps with CFG ``gate.teacher_guidance_scale`` (2 NFE per step;
  convention ``u + w·(c − u)``, w = 1 is unguided) — the reference the report names (``teacher.guidance_scale``);
* the teacher at the same budget (``teacher_at_budget``): for every NFE N in ``gate.nfes``, N Euler steps × CFG from
  the same noises. Decision: "N NFE" for the teacher means N CFG steps (2N network evaluations), the paper's
  Fig. 1 x-axis (steps) — the stronger baseline of the two readings (N/2 CFG steps would give it half the compute
  and no row at 1 NFE); the policy requires the student to beat it at every NFE ≤ ``beat_teacher_up_to_nfe``;
* the candidate student at every NFE in ``gate.nfes`` (one call per step, guidance fused), with the sampler of its
  paradigm (read from the adapter file's metadata; ``--paradigm`` overrides);
* optionally baselines (``--compare``, e.g. the consistency student: the paper's Fig. 1 in one command),

decodes every sample with the teacher's VAE and scores the pixels (:mod:`anyflow.eval.vbench_like`: VBench-style
quality and semantic dimensions → Quality / Semantic / Total) and the latents (:mod:`anyflow.eval.fidelity`:
RMS distance to the teacher's sample from the same noise, Fréchet distance in a fixed feature space). Dead dimensions
(:func:`anyflow.eval.gate.dead_dimensions`: constant over every row, or a semantic accuracy the teacher cannot do)
are dropped from every Quality / Semantic / Total in the report, with the reason (``dead_dimensions``). The policy
(:mod:`anyflow.eval.gate`, ``gate.policy``) is applied to the candidate only.

Outputs (``--out NAME``, default ``gate``; the directory is swapped in atomically, metrics are written before the
exit code): ``artifacts/<NAME>/{report.json, summary.md, step_scaling.png, previews/grid.{gif,mp4,png}}``,
``metrics/<NAME>.json`` (``passed``, ``failed``, Totals) and ``plots/<NAME>_steps.csv``. Exit 1 names the failed
criteria; nothing is promoted from a failed gate (export copies the verdict into the release manifest).

Causal students (AnyFlow-FAR): every adapter is built for the architecture in its metadata, so a FAR candidate
(``--candidate artifacts/far_stage1/ema_adapter.safetensors``) and bidirectional baselines (``--compare``) are
scored in one report on the same noises and prompts; a FAR student samples chunk by chunk with the KV cache, N steps
per chunk (NFE is per chunk). FAR entries also get ``drift``: videos twice the training length (``long_partition``)
at ``--drift-nfes``, the Total of the first and the last training-length window of frames and the per-chunk latent
RMS. ``--report-only`` writes everything and exits 0 whatever the verdict (the FAR sub-pipeline promotes nothing).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from anyflow.config import Config
from anyflow.stages import gate_reference
from anyflow.stages.common import StagePaths, resolve_adapter, teacher_dir
from anyflow.utils.io import atomic_dir, atomic_write_text, write_json

log = logging.getLogger(__name__)

BATCH = 16
DRIFT_NFES = (4, 16)
GUIDANCE_CONVENTION = "u + w·(c − u)"  # what gate.teacher_guidance_scale = w means (anyflow.models.teacher)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidate", default="auto",
                   help="student adapter: auto (stage2, else stage1), stage2, stage1, stage1_consistency or a path")
    p.add_argument("--paradigm", choices=("flowmap", "consistency"), default=None,
                   help="sampler of the candidate (default: the adapter's metadata, else student.paradigm)")
    p.add_argument("--compare", action="append", default=[], metavar="ADAPTER",
                   help="also evaluate this adapter (same choices as --candidate) as a baseline; repeatable")
    p.add_argument("--out", default="gate", help="output name: artifacts/<out>, metrics/<out>.json (default gate)")
    p.add_argument("--drift-nfes", type=int, nargs="*", default=list(DRIFT_NFES),
                   help="FAR adapters: NFEs per chunk of the drift check on videos twice the training length "
                        "(none: skip)")
    p.add_argument("--report-only", action="store_true",
                   help="exit 0 whatever the verdict (a report, not a gate: nothing downstream is promoted)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="the teacher rows from `anyflow gate-reference` (e.g. artifacts/gate_reference; checked to "
                        "be of this teacher and these gate settings); default: compute them here")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="the --compare adapters' rows from `anyflow gate-baseline` (e.g. artifacts/gate_baseline; "
                        "checked to be of these adapters and this reference); default: compute them here")
    p.add_argument("--no-progress", action="store_true")


def eval_set(cfg: Config, domain: str = "shapes"):
    """The fixed held-out specs (prompt i of ``num_prompts`` cycles the held-out split, ``seeds_per_prompt`` each)
    of toy ``domain`` (``shapes``: :mod:`anyflow.data.toy`, ``driving``: :mod:`anyflow.data.driving`)."""
    from anyflow.eval.sets import for_config

    return for_config(replace(cfg, model=replace(cfg.model, source="toy")), domain=domain).specs


def evaluation_set(cfg: Config, root: Optional[Path] = None):
    """The gate's evaluation set (:mod:`anyflow.eval.sets`): the toy shapes held-out specs with the toy FVD from
    ``<root>/fvd_net`` where trained, or, for ``model.source: local``, the prompts of ``data.prompts_file``; with
    ``gate.use_vbench``, VBench's own dimensions merged into every row (``vbench_adapter.VBenchScorer``)."""
    import torch

    from anyflow.eval.sets import for_config
    from anyflow.eval.vbench_adapter import VBenchScorer, VBenchUnavailable, check_available, weights_dir

    root = root if root is not None else StagePaths.of(cfg).root
    vbench = None
    if cfg.gate.use_vbench:  # fail before an hour of sampling, not after
        try:
            check_available(weights_dir())
        except VBenchUnavailable as err:
            raise RuntimeError(f"gate.use_vbench is true but {err}. Install vbench with its weights, or set "
                               "gate.use_vbench=false to gate on the dimensions that need no weights") from err
        vbench = VBenchScorer(root / "vbench", cfg.video.fps, "cuda" if torch.cuda.is_available() else "cpu")
    return for_config(cfg, lambda specs: ToyFVD.load(root, specs, cfg.gate.seed, cfg.video), vbench=vbench)


def paradigm_of(adapter: Path, cfg: Config, override: Optional[str] = None) -> str:
    from anyflow.models.student import adapter_metadata

    p = override or adapter_metadata(adapter).get("paradigm") or cfg.student.paradigm
    if p not in ("flowmap", "consistency"):
        raise ValueError(f"{adapter}: metadata paradigm {p!r} is not flowmap | consistency")
    return p


def architecture_of(adapter: Path) -> str:
    """The student architecture an adapter was trained for (metadata ``architecture``; adapters written before the
    causal student existed carry none and are bidirectional)."""
    from anyflow.models.student import adapter_metadata

    a = adapter_metadata(adapter).get("architecture", "bidirectional")
    if a not in ("bidirectional", "far"):
        raise ValueError(f"{adapter}: metadata architecture {a!r} is not bidirectional | far")
    return a


def long_partition(partition, factor: int = 2) -> list[int]:
    """A chunk partition for videos ``factor`` times the training length: the training chunks after the first
    repeated until the latent frames reach at least ``factor·(F − 1) + 1`` (pixel frames ≈ factor × training)."""
    partition = list(partition)
    target = factor * (sum(partition) - 1) + 1
    tail, out, i = partition[1:] or partition, list(partition), 0
    while sum(out) < target:
        out.append(tail[i % len(tail)])
        i += 1
    return out


def drift(model, paradigm: str, noise_fn, emb, nfe: int, shift: float, partition, num_frames: int, es, decode,
          seed: int) -> dict:
    """FAR drift: videos twice the training length (:func:`long_partition`), chunk by chunk with the KV cache;
    the toy VBench-style Total of the first and of the last training-length window of pixel frames, and the
    per-chunk RMS of the latents (a collapsing or exploding tail shows there first). Toy caveat: a ground-truth clip
    covers its whole travel in ``num_frames``, so a continuation at the same speed nears the border in the last
    window — read the Quality delta (per-frame/temporal quality) apart from the Semantic one (direction, motion)."""
    import torch

    from anyflow.sampling import sample_student

    noise = noise_fn(sum(partition))
    t0 = time.perf_counter()
    with torch.no_grad():
        x = torch.cat([sample_student(model, paradigm, noise[i:i + BATCH], emb[i:i + BATCH], nfe, shift,
                                      torch.Generator().manual_seed(seed + i), chunk_partition=partition)
                       for i in range(0, noise.shape[0], BATCH)])
    seconds = time.perf_counter() - t0
    frames = decode(x)  # (B, F, H, W, 3)
    out = {"nfe": nfe, "chunk_partition": partition, "frames": int(frames.shape[1]), "sampling_seconds": seconds,
           "seconds_per_chunk": seconds / (-(-noise.shape[0] // BATCH) * len(partition)), "batch": BATCH}
    for name, window in (("first", frames[:, :num_frames]), ("last", frames[:, -num_frames:])):
        out[name] = es.window(window)
    out["delta_total"] = out["last"]["total"] - out["first"]["total"]
    bounds = [sum(partition[:k]) for k in range(len(partition) + 1)]
    out["chunk_rms"] = [float(x[:, :, a:b].pow(2).mean().sqrt()) for a, b in zip(bounds, bounds[1:])]
    return out


def _batched(fn, n: int, progress, desc: str):
    """torch.cat of ``fn(i, j)`` over batches [i, j) of ``n`` items."""
    import torch

    out = []
    for i in range(0, n, BATCH):
        out.append(fn(i, min(n, i + BATCH)))
        progress.update(1)
    progress.set_postfix_str(desc)
    return torch.cat(out)


class ToyFVD:
    """The toy FVD of the gate's samples (:mod:`anyflow.eval.toy_fvd`, DVC stage ``fvd_net``): Fréchet distance in
    the trained video network's features to the procedural clips of the gate's specs (``procedural``: distance to
    the data) and to the teacher's reference samples (``teacher``: distance to what the student distils); and the
    per-clip realism dimension (:class:`anyflow.eval.toy_fvd.Realism`, VBench's aesthetic-quality slot)."""

    def __init__(self, net, specs, seed: int, video):
        from anyflow.eval import toy_fvd

        self.net = net
        self.reference = net.features(toy_fvd.reference_clips(specs, seed=seed, video=video))
        self.teacher = None
        # the realism dimension's reference: other renders of the same specs than the FVD's
        self.realism = toy_fvd.Realism.fit(net, specs, seed + 1, video)

    @classmethod
    def load(cls, root: Path, specs, seed: int, video) -> Optional["ToyFVD"]:
        """From ``<root>/fvd_net`` (the pipeline's dependency); None, with a warning, where it was never trained."""
        from anyflow.eval import toy_fvd

        if not (root / "fvd_net" / "model.safetensors").is_file():
            log.warning("gate: no %s — the toy FVD is not reported (train it: anyflow fvd-net)",
                        root / "fvd_net" / "model.safetensors")
            return None
        return cls(toy_fvd.load_fvd_net(root / "fvd_net"), specs, seed, video)

    def __call__(self, frames) -> dict:
        from anyflow.eval import toy_fvd

        f = self.net.features(frames)
        out = {"procedural": toy_fvd.frechet_distance(self.reference, f)}
        if self.teacher is not None:
            out["teacher"] = toy_fvd.frechet_distance(self.teacher, f)
        return out


def score(frames, specs, x, x_teacher, teacher_feats, domain: str = "shapes",
          fvd: Optional[ToyFVD] = None) -> dict:
    """VBench-style dimensions + aggregation + fidelity for one set of toy samples (``domain`` picks the scorers;
    ``fvd``: the toy FVD beside them, under ``fidelity.fvd``): :meth:`anyflow.eval.sets.ToySet.score`."""
    from anyflow.eval.sets import ToySet

    return ToySet(domain, list(specs), fvd).score(frames, x, x_teacher, teacher_feats)


def setup(cfg: Config, progress: bool, desc: str, extra_batches: int = 0):
    """What the gate and this stage share: the teacher pipeline, the evaluation set (:mod:`anyflow.eval.sets`), its
    text embeddings, the noises, a progress bar over ``extra_batches`` batches, and the batched decoder."""
    import torch
    from tqdm.auto import tqdm

    from anyflow.data import toy
    from anyflow.models.teacher import decode_latents, encode_prompts, latent_shape, load_teacher, negative_embeds

    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as in training: the toy model is too small for intra-op threads to pay
    g, paths = cfg.gate, StagePaths.of(cfg)
    pipe = load_teacher(teacher_dir(cfg, paths))
    es = evaluation_set(cfg, paths.root)
    n = len(es.prompts)
    emb = encode_prompts(pipe, es.prompts, cfg.model.max_text_len)
    neg = negative_embeds(pipe, cfg.synthesize.negative_prompt, cfg.model.max_text_len)
    noise = torch.randn((n, *latent_shape(pipe, cfg)), generator=torch.Generator().manual_seed(g.seed))
    bar = tqdm(total=-(-n // BATCH) * extra_batches, desc=desc, disable=not progress)
    decode = lambda x: toy.to_pixels(_batched(lambda i, j: decode_latents(pipe, x[i:j]), n, bar, "decode"))  # noqa
    return pipe, es, emb, neg, noise, bar, decode


def teacher_samples(pipe, noise, emb, neg, steps: int, guidance_scale: float, shift: float, progress, desc: str,
                    guidance_min_t: float = 0.0):
    """The teacher's Euler ODE samples (``steps`` steps, CFG ``guidance_scale`` at t > ``guidance_min_t``) from
    ``noise``, batched."""
    from anyflow.models.teacher import teacher_ode_sample

    return _batched(lambda i, j: teacher_ode_sample(pipe.transformer, noise[i:j], emb[i:j], neg, steps,
                                                    guidance_scale, shift, guidance_min_t=guidance_min_t),
                    noise.shape[0], progress, desc)


def cfg_nfe(steps: int, guidance_scale: float, shift: float = 1.0, guidance_min_t: float = 0.0) -> int:
    """Network evaluations of ``steps`` Euler steps: 2 per step with CFG, 1 without (w = 1, or a step at or below
    the guidance interval's ``guidance_min_t`` on the ``shift`` grid)."""
    from anyflow.models.teacher import teacher_nfe

    return teacher_nfe(steps, guidance_scale, shift, guidance_min_t)


def drop_dead(report: dict, floor: float, es=None) -> dict:
    """Find the dead dimensions over every row of ``report`` (teacher, teacher at budget, candidate, baselines)
    and re-aggregate every row's Quality / Semantic / Total without them (with the aggregation of evaluation set
    ``es``; default the toy one); returns ``{dim: reason}``."""
    from anyflow.eval import gate as policy, vbench_like

    aggregate = es.aggregate if es is not None else vbench_like.aggregate

    entries = [report["teacher_at_budget"], report["candidate"], *report["baselines"].values()]
    rows = [r for e in entries for r in e["by_nfe"].values()]
    dead = policy.dead_dimensions(report["teacher"]["dimensions"], [r["dimensions"] for r in rows], floor)
    for r in [report["teacher"], *rows]:
        agg = aggregate(r["dimensions"], drop=tuple(dead))
        r.update(total=agg["total"], quality=agg["quality"], semantic=agg["semantic"], normalized=agg["normalized"])
    return dead




def adapter_names(cfg: Config, candidate: Optional[str], compare: tuple[str, ...]) -> dict[str, Path]:
    """``{"student": candidate, <baseline name>: path, ...}``: a baseline is named by its paradigm ("consistency")
    or, for another any-step student, by its directory (a repeated name gets its position appended)."""
    paths = StagePaths.of(cfg)
    adapters = {"student": resolve_adapter(paths, candidate)} if candidate is not None else {}
    for c in compare:
        path = resolve_adapter(paths, c)
        name = "consistency" if paradigm_of(path, cfg) == "consistency" else path.parent.name
        adapters[name if name not in adapters else f"{name}_{len(adapters)}"] = path
    return adapters


def adapter_rows(cfg: Config, name: str, path: Path, paradigm: str, arch: str, pipe, es, emb, noise, bar, decode,
                 x_teacher, teacher_feats, drift_nfes: tuple[int, ...], previews: Optional[dict] = None) -> dict:
    """One adapter's gate entry: sampled at every gate NFE from the gate's noises, decoded, scored against the
    teacher's samples (``by_nfe``), plus the drift check for a FAR adapter; the candidate's first clips go to
    ``previews``. The gate and `anyflow gate-baseline` both call it, so a stored baseline is this entry."""
    import torch

    from anyflow.models.student import load_student
    from anyflow.sampling import sample_student

    g, shift, n = cfg.gate, cfg.model.flow_shift, len(es.prompts)
    model = load_student(pipe.transformer, replace(cfg.student, architecture=arch), path)
    by_nfe = {}
    for nfe in g.nfes:
        t0 = time.perf_counter()
        with torch.no_grad():
            x = _batched(lambda i, j: sample_student(model, paradigm, noise[i:j], emb[i:j], nfe, shift,
                                                     torch.Generator().manual_seed(g.seed + 1000 * nfe + i)),
                         n, bar, f"{name} N={nfe}")
        sampling = time.perf_counter() - t0
        frames = decode(x)
        by_nfe[str(nfe)] = es.score(frames, x, x_teacher, teacher_feats)
        by_nfe[str(nfe)]["sampling_seconds"] = sampling
        if previews is not None:
            previews[f"N={nfe}"] = frames[:g.num_previews]
    entry = {"adapter": str(path), "paradigm": paradigm, "architecture": arch, "by_nfe": by_nfe}
    if arch == "far" and drift_nfes:
        partition = long_partition(model.config.chunk_partition)
        noise_fn = lambda f: torch.randn((n, noise.shape[1], f, *noise.shape[3:]),  # noqa: E731
                                         generator=torch.Generator().manual_seed(g.seed + 7))
        entry["drift"] = {str(k): drift(model, paradigm, noise_fn, emb, k, shift, partition, cfg.video.num_frames,
                                        es, decode, g.seed + 2000 * k) for k in drift_nfes}
    del model
    return entry


def run(cfg: Config, candidate: str = "auto", paradigm: Optional[str] = None, compare: tuple[str, ...] = (),
        out_name: str = "gate", progress: bool = True, drift_nfes: tuple[int, ...] = DRIFT_NFES,
        reference: Optional[str | Path] = None, baseline: Optional[str | Path] = None) -> dict:
    """Evaluate, apply the policy, write every output; returns the report (``report["passed"]``). Adapters are
    built for the architecture in their metadata (a FAR adapter samples chunk by chunk with the KV cache, N steps
    per chunk, and also gets the drift check at ``drift_nfes``: videos twice the training length). ``reference``:
    a directory of ``anyflow gate-reference`` with the teacher rows (else they are computed here, the same way);
    ``baseline``: one of ``anyflow gate-baseline`` with the ``compare`` adapters' rows (checked to be of these
    adapters, this teacher reference and these settings; else they are computed here, the same way)."""
    from anyflow.eval import gate as policy
    from anyflow.eval.report import summary_markdown, write_previews, write_step_plot, write_steps_csv
    from anyflow.stages import gate_baseline

    t_start = time.perf_counter()
    g = cfg.gate
    paths = StagePaths.of(cfg)
    adapters = adapter_names(cfg, candidate, compare)
    paradigms = {name: paradigm_of(path, cfg, paradigm if name == "student" else None)
                 for name, path in adapters.items()}
    archs = {name: architecture_of(path) for name, path in adapters.items()}

    stored = sum(name != "student" for name in adapters) if baseline else 0
    student_batches = 2 * len(g.nfes) * (len(adapters) - stored)
    pipe, es, emb, neg, noise, bar, decode = setup(
        cfg, progress, out_name, student_batches + (0 if reference else gate_reference.teacher_batches(cfg)))
    n = len(es.prompts)
    fvd = getattr(es, "fvd", None)

    seconds: dict = {}
    t0 = time.perf_counter()
    if reference:  # the teacher rows of `anyflow gate-reference` (checked to be of this teacher and these settings)
        ref = gate_reference.load(Path(reference), cfg, es)
        if fvd is not None:
            fvd.teacher = ref.fvd_teacher
    else:
        ref = gate_reference.compute(cfg, pipe, es, emb, neg, noise, bar, decode)
    seconds["teacher_rows"] = time.perf_counter() - t0
    x_teacher, teacher_feats, teacher, budget = ref.x_teacher, ref.teacher_features, ref.teacher, ref.budget

    previews = {f"teacher {teacher['nfe']}": ref.previews}
    loaded = {}
    if baseline:  # the baselines' rows of `anyflow gate-baseline`, checked against what they would be computed from
        loaded = gate_baseline.load(Path(baseline), cfg, es, ref.fingerprint,
                                    {k: v for k, v in adapters.items() if k != "student"}, paradigms, archs,
                                    drift_nfes)
    results: dict = {}
    for name, path in adapters.items():
        results[name] = loaded[name] if name in loaded else adapter_rows(
            cfg, name, path, paradigms[name], archs[name], pipe, es, emb, noise, bar, decode, x_teacher,
            teacher_feats, drift_nfes, previews if name == "student" else None)
    bar.close()

    report = {"candidate": results.pop("student"), "teacher": teacher, "baselines": results,
              "teacher_at_budget": {"steps": "N Euler steps × CFG at gate NFE N (2N network evaluations; N plus "
                                             "the guided steps under a guidance interval)",
                                    "guidance_scale": g.teacher_guidance_scale,
                                    "guidance_min_t": cfg.model.guidance_min_t,
                                    "guidance_convention": GUIDANCE_CONVENTION, "by_nfe": budget},
              "prompts": es.prompts, "evaluation_set": es.kind, "num_samples": n, "seed": g.seed,
              "policy": _policy_dict(g.policy)}
    report["dead_dimensions"] = drop_dead(report, g.policy.teacher_accuracy_floor, es)
    report["live_dimensions"] = sorted(d for d in teacher["dimensions"] if d not in report["dead_dimensions"])
    report["criteria"] = policy.check(report, g.policy)
    report["failed"] = [c["name"] for c in report["criteria"] if not c["passed"]]
    report["passed"] = not report["failed"]
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = seconds

    with atomic_dir(paths.root / out_name) as tmp:
        write_json(tmp / "report.json", without_timings(report))  # timings go to the metrics only
        atomic_write_text(tmp / "summary.md", summary_markdown(report))
        write_step_plot(report, tmp / "step_scaling.png")
        write_previews(previews, tmp / "previews", fps=cfg.video.fps)
    write_steps_csv(report, paths.plots / f"{out_name}_steps.csv")
    write_json(paths.metric(out_name), metrics_of(report))
    return report


TIMING_KEYS = frozenset({"seconds", "sampling_seconds", "seconds_per_chunk"})


def without_timings(obj):
    """``obj`` without its timing keys: the report is a DVC output and must be the same bytes on every run of the
    same code, params and seeds; how long it took is run-to-run noise and lives in ``metrics/<gate>.json``."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def _policy_dict(p) -> dict:
    return {"total_tolerance": p.total_tolerance, "monotone_tolerance": p.monotone_tolerance,
            "monotone_from_nfe": p.monotone_from_nfe, "semantic_floors": dict(p.semantic_floors),
            "fidelity_metric": p.fidelity_metric, "fidelity_rel_tolerance": p.fidelity_rel_tolerance,
            "beat_teacher_up_to_nfe": p.beat_teacher_up_to_nfe, "teacher_accuracy_floor": p.teacher_accuracy_floor}


def _delta(first, last):
    """last − first; None where a score is absent (a prompt set has no semantic score)."""
    return None if first is None or last is None else last - first


def metrics_of(report: dict) -> dict:
    """The compact DVC metrics: verdict, failed criteria, Totals per NFE, fidelity at 4 NFE, timings."""
    from anyflow.eval.gate import fidelity_value

    metric = report.get("policy", {}).get("fidelity_metric", "latent_distance")  # reports of older versions lack it

    def series(entry: dict) -> dict:
        return {k: {n: r[k] for n, r in entry["by_nfe"].items()} for k in ("total", "semantic")} | {
            "latent_distance": {n: r["fidelity"]["latent_distance"] for n, r in entry["by_nfe"].items()},
            "fidelity": {n: fidelity_value(r, metric) for n, r in entry["by_nfe"].items()}} | fvd_series(entry)

    def fvd_series(entry: dict) -> dict:
        rows = entry["by_nfe"]
        if not all("fvd" in r["fidelity"] for r in rows.values()):
            return {}
        return {"fvd": {n: r["fidelity"]["fvd"]["procedural"] for n, r in rows.items()},
                "fvd_to_teacher": {n: r["fidelity"]["fvd"].get("teacher") for n, r in rows.items()}}

    t, budget = report["teacher"], report.get("teacher_at_budget")
    drift = {name: {n: {"first": d["first"]["total"], "last": d["last"]["total"], "delta": d["delta_total"],
                        **{f"delta_{k}": _delta(d["first"][k], d["last"][k]) for k in ("quality", "semantic")},
                        "seconds_per_chunk": d.get("seconds_per_chunk")} for n, d in entry["drift"].items()}
             for name, entry in [("candidate", report["candidate"]), *report["baselines"].items()]
             if entry.get("drift")}
    return {"passed": report["passed"], "failed": report["failed"], **({"drift": drift} if drift else {}),
            "teacher": {"total": t["total"], "quality": t["quality"], "semantic": t["semantic"], "nfe": t["nfe"],
                        "guidance_scale": t.get("guidance_scale")},
            **({"teacher_fvd": t["fidelity"]["fvd"]["procedural"]} if "fvd" in t.get("fidelity", {}) else {}),
            **({"teacher_at_budget": {"total": {n: r["total"] for n, r in budget["by_nfe"].items()},
                                      **fvd_series(budget)}} if budget else {}),
            "dead_dimensions": sorted(report.get("dead_dimensions", {})), "fidelity_metric": metric,
            "candidate": {"paradigm": report["candidate"]["paradigm"], **series(report["candidate"])},
            "baselines": {k: {"paradigm": v["paradigm"], **series(v)} for k, v in report["baselines"].items()},
            "num_samples": report["num_samples"], "seconds": report["seconds"]}


def main(cfg: Config, args) -> int:
    report = run(cfg, args.candidate, args.paradigm, tuple(args.compare), args.out, not args.no_progress,
                 tuple(getattr(args, "drift_nfes", DRIFT_NFES)), getattr(args, "reference", None),
                 getattr(args, "baseline", None))
    t = report["teacher"]
    interval = f" at t > {t['guidance_min_t']:g}" if t.get("guidance_min_t") else ""
    print(f"teacher {t['steps']} steps × CFG w={t['guidance_scale']:g}{interval} ({t['guidance_convention']}), "
          f"{t['nfe']} NFE: "
          f"Total {t['total']:.4f} (semantic "
          f"{'dropped: every semantic dimension dead' if t['semantic'] is None else format(t['semantic'], '.3f')})")
    row = "  ".join(f"{n}:{r['total']:.4f}" for n, r in report["teacher_at_budget"]["by_nfe"].items())
    print(f"teacher N steps × CFG Total by N  {row}")
    for dim, why in report["dead_dimensions"].items():
        print(f"dropped dimension {dim}: {why}")
    for name, entry in [("student", report["candidate"]), *report["baselines"].items()]:
        row = "  ".join(f"{n}:{r['total']:.4f}" for n, r in entry["by_nfe"].items())
        print(f"{name} ({entry['paradigm']}, {entry.get('architecture', 'bidirectional')}) Total by NFE  {row}")
        for nfe, d in (entry.get("drift") or {}).items():
            print(f"  drift @{nfe}/chunk, {d['frames']} frames: first window {d['first']['total']:.4f}, last "
                  f"{d['last']['total']:.4f} (Δ {d['delta_total']:+.4f}; quality Δ "
                  f"{d['last']['quality'] - d['first']['quality']:+.4f})"
                  + (f", {d['seconds_per_chunk']:.3f} s/chunk" if "seconds_per_chunk" in d else ""))
    if report["passed"]:
        print(f"gate PASSED ({len(report['criteria'])} criteria)")
        return 0
    print("gate FAILED: " + ", ".join(report["failed"]))
    return 0 if getattr(args, "report_only", False) else 1
