"""``anyflow domain``: adapt the distilled any-step student to a new domain without re-distilling ([G]).

The flow-map student keeps the instantaneous flow field (r = t), so it can keep training on domain data with the
stage-1 objective. This stage

1. reads the domain shards the ``encode_clips`` stage (``anyflow encode-clips``) wrote to ``artifacts/domain_data``
   — ``domain.source: synthetic``: ``domain.num_samples`` rendered clips of the toy domain ``domain.domain``;
   ``domain.source: clips``: the clips of ``domain.clips_dir`` — and names that stage when they are absent/stale;
2. continues training the base student's EMA adapter (``artifacts/stage2/ema_adapter.safetensors``, else stage 1's;
   ``--base``) with :class:`anyflow.train.stage1.FlowMapTrainer` (the stage-1 loss, ``stage1.*`` loss settings,
   ``domain.optim``/``batch_size``/``max_steps``; checkpoints in ``checkpoints/domain/last.pt``, exact resume),
   a ``domain.base_mix`` fraction of every batch drawn from the base shards (``artifacts/data``) against forgetting;
   with ``domain.distill_weight`` > 0 the rows ``domain.distill_rows`` picks regress onto the frozen base adapter
   instead (:mod:`anyflow.train.selfdistill`: the stage-1 objective alone undoes stage 2's few-step quality);
3. evaluates the base and the adapted student at every ``gate.nfes`` on held-out prompts of BOTH domains with the
   gate's sampling and scoring (:mod:`anyflow.stages.gate`: ``eval_set``/``score``; teacher 50×CFG as the fidelity
   reference) and applies the domain gate (:mod:`anyflow.eval.domain_gate`).

Outputs: ``artifacts/domain/{adapter,ema_adapter}.safetensors`` (metadata ``paradigm=flowmap``, ``domain``,
``base_adapter``), ``artifacts/domain/report.json`` (``passed``, ``failed``, ``criteria``, ``candidate.adapter``:
the EMA adapter judged — what ``anyflow export --gate`` checks), ``metrics/domain.json`` (``passed``, ``failed``,
per-NFE table base vs domain on both domains, training summary) and ``plots/domain_loss.csv``. Exit 1 names the failed
criteria (metrics are written first). ``--evaluate-only`` re-evaluates existing adapters; ``--no-eval`` trains only.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from anyflow.config import Config
from anyflow.stages.common import StagePaths

log = logging.getLogger(__name__)

BASE_DOMAIN = "shapes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="auto", help="base student adapter: auto (stage2, else stage1), stage2, stage1 "
                                                 "or a path")
    p.add_argument("--max-steps", type=int, default=None, help="override domain.max_steps")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--evaluate-only", action="store_true", help="evaluate the existing artifacts/domain adapter")
    p.add_argument("--no-eval", action="store_true", help="train only (no evaluation, no domain gate)")
    p.add_argument("--no-progress", action="store_true")


def domain_module(name: str):
    from anyflow.data import driving, toy

    return driving if name == "driving" else toy


def out_dir(paths: StagePaths) -> Path:
    return paths.root / "domain"


ENCODE_STAGE = "continued/dvc.yaml:encode_clips"


def domain_shards(cfg: Config, paths: StagePaths, pipe=None, progress: bool = False) -> Path:
    """The domain shard directory the ``encode_clips`` stage wrote (``artifacts/domain_data``, either source).

    FileNotFoundError naming the stage when it is absent; ValueError when it holds another source's / domain's
    shards than params ask for (stale: re-run the stage). ``pipe``/``progress`` are unused (kept for callers)."""
    from anyflow.stages.encode_clips import default_out
    from anyflow.utils.io import read_json

    d = cfg.domain
    root = default_out(cfg)
    run_it = f"run `dvc repro {ENCODE_STAGE}` (or `anyflow encode-clips`) first"
    if not (root / "manifest.json").exists():
        raise FileNotFoundError(f"{root}/manifest.json: no domain shards (domain.source: {d.source}); {run_it}")
    meta = read_json(root / "manifest.json").get("meta", {})
    want = {"source": d.source, **({"domain": d.domain, "num_samples": d.num_samples}
                                   if d.source == "synthetic" else {})}
    found = {k: meta.get(k) for k in want}
    if found != want:
        raise ValueError(f"{root}/manifest.json: domain shards of {found}, params ask for {want} (stale); {run_it}")
    return root


@dataclass
class DomainOutputs:
    adapter: Optional[Path]
    ema_adapter: Optional[Path]
    steps: int
    training: dict


def train(cfg: Config, pipe, base_adapter: Path, max_steps: Optional[int] = None, fresh: bool = False,
          progress: bool = True, stop_after: Optional[int] = None) -> DomainOutputs:
    """Continue training ``base_adapter`` on the domain shards (+ ``base_mix`` of the base shards)."""
    import torch

    from anyflow.data.shards import Batch, ShardSet
    from anyflow.models.student import STUDENT, load_student, save_adapter, state_to_peft_keys
    from anyflow.train.common import write_loss_csv
    from anyflow.train.stage1 import LOSS_COLUMNS, FlowMapTrainer

    d, paths = cfg.domain, StagePaths.of(cfg)
    t0 = time.perf_counter()
    dom_set = ShardSet(domain_shards(cfg, paths, pipe, progress))
    dom = dom_set.load_all()
    n_base = int(round(d.base_mix * d.batch_size))
    base = ShardSet(paths.shards).load_all() if n_base else None
    data_seconds = time.perf_counter() - t0

    def data_fn(g: torch.Generator) -> Batch:
        i = torch.randint(dom.latents.shape[0], (d.batch_size - n_base,), generator=g)
        parts = [(dom, i)] + ([(base, torch.randint(base.latents.shape[0], (n_base,), generator=g))] if n_base else [])
        lat = torch.cat([s.latents[k] for s, k in parts])
        noise = torch.cat([s.noise[k] for s, k in parts])
        emb = torch.cat([s.prompt_embeds[k] for s, k in parts])
        texts = [s.prompts[int(j)] for s, k in parts for j in k]
        perm = torch.randperm(d.batch_size, generator=g)  # mix base rows over the (t, r) split by position
        return Batch(latents=lat[perm], noise=noise[perm], prompt_embeds=emb[perm],
                     prompts=[texts[int(j)] for j in perm], index=perm)

    model = load_student(pipe.transformer, cfg.student, base_adapter)
    ckpt = paths.ckpt("domain")
    if fresh and (ckpt / "last.pt").exists():
        (ckpt / "last.pt").unlink()
    args = (model, cfg, data_fn, dom_set.negative_embeds(), d.optim, ckpt, d.ckpt_every, d.seed)
    kw = dict(batch_size=d.batch_size, log_every=d.log_every, desc="domain",
              velocity_target="data")  # the teacher does not know the new domain
    if d.distill_weight > 0:  # keep the base's few-step flow map: regress onto the frozen base adapter
        from anyflow.train.selfdistill import SelfDistillTrainer, add_frozen_base

        add_frozen_base(model, cfg.student, base_adapter)
        n_dom = d.batch_size - n_base
        trainer = SelfDistillTrainer(*args, **kw, is_base=lambda b: b.index >= n_dom, mode=d.distill_rows,
                                     weight=d.distill_weight)
    else:
        trainer = FlowMapTrainer(*args, **kw)
    resumed = trainer.maybe_resume()
    steps = max_steps if max_steps is not None else d.max_steps
    t1 = time.perf_counter()
    trainer.train(steps, progress=progress, stop_after=stop_after)
    train_seconds = time.perf_counter() - t1
    if trainer.state.step < steps:  # interrupted on purpose: keep the checkpoint, write nothing
        trainer.save_checkpoint()
        return DomainOutputs(None, None, trainer.state.step, {})
    out = out_dir(paths)
    meta = {"steps": trainer.state.step, "paradigm": "flowmap", "lora_rank": cfg.student.lora_rank,
            "domain": d.domain, "base_adapter": str(base_adapter)}
    adapter, ema = out / "adapter.safetensors", out / "ema_adapter.safetensors"
    save_adapter(model, adapter, STUDENT, metadata=meta)
    save_adapter(model, ema, STUDENT, state=state_to_peft_keys(model, trainer.ema_state()), metadata=meta)
    hist = trainer.state.history
    write_loss_csv(paths.plots / "domain_loss.csv", hist, LOSS_COLUMNS + ["distill"])
    tail = hist[-max(1, len(hist) // 10):]
    training = {"steps": trainer.state.step, "resumed": resumed, "base_adapter": str(base_adapter),
                "domain_samples": int(dom.latents.shape[0]), "base_rows_per_batch": n_base,
                "distill": {"weight": d.distill_weight, "rows": d.distill_rows if d.distill_weight > 0 else None},
                "final": {k: sum(r.get(k, 0.0) for r in tail) / len(tail)
                          for k in ("loss", "mse_r_eq_t", "mse_r_eq_0", "mse_free", "distill")},
                "first": {k: hist[0].get(k) for k in ("loss", "mse_r_eq_t")} if hist else {},
                "seconds": {"data": data_seconds, "train": train_seconds,
                            "per_step": train_seconds / max(1, len(hist))}}
    trainer.clear_checkpoint()
    return DomainOutputs(adapter, ema, trainer.state.step, training)


def evaluate(cfg: Config, pipe, adapters: dict[str, Path], progress: bool = True) -> dict:
    """Per student, per domain: gate-style ``{"by_nfe": {nfe: score}}`` at ``gate.nfes`` on the held-out prompts;
    plus the teacher's scores per domain. Same noises, prompts and sampler seeds as ``anyflow gate``."""
    import torch
    from tqdm.auto import tqdm

    from anyflow.data import toy
    from anyflow.eval import fidelity
    from anyflow.models.student import load_student
    from anyflow.models.teacher import (decode_latents, encode_prompts, latent_shape, negative_embeds,
                                        teacher_ode_sample)
    from anyflow.sampling import model_velocity, sample
    from anyflow.stages.gate import BATCH, eval_set, score

    g, shift = cfg.gate, cfg.model.flow_shift
    domains = [BASE_DOMAIN] + ([cfg.domain.domain] if cfg.domain.domain != BASE_DOMAIN else [])
    neg = negative_embeds(pipe, cfg.synthesize.negative_prompt, cfg.model.max_text_len)
    students = {name: load_student(pipe.transformer, cfg.student, path) for name, path in adapters.items()}
    out: dict = {"teacher": {}, **{name: {} for name in adapters}}
    bar = tqdm(total=len(domains) * (1 + len(adapters) * len(g.nfes)), desc="domain eval", disable=not progress)

    def batched(fn, n):
        return torch.cat([fn(i, min(n, i + BATCH)) for i in range(0, n, BATCH)])

    for dom in domains:
        specs = eval_set(cfg, dom)
        n = len(specs)
        emb = encode_prompts(pipe, domain_module(dom).prompts(specs), cfg.model.max_text_len)
        noise = torch.randn((n, *latent_shape(pipe, cfg)), generator=torch.Generator().manual_seed(g.seed))
        decode = lambda x: toy.to_pixels(batched(lambda i, j: decode_latents(pipe, x[i:j]), n))  # noqa: E731
        x_t = batched(lambda i, j: teacher_ode_sample(pipe.transformer, noise[i:j], emb[i:j], neg, g.teacher_steps,
                                                      g.teacher_guidance_scale, shift,
                                                      guidance_min_t=cfg.model.guidance_min_t), n)
        frames_t = decode(x_t)
        feats = fidelity.video_features(list(frames_t))
        out["teacher"][dom] = score(frames_t, specs, x_t, x_t, feats, domain=dom)
        bar.update(1)
        for name, model in students.items():
            by_nfe = {}
            for nfe in g.nfes:
                with torch.no_grad():
                    x = batched(lambda i, j: sample("flowmap", model_velocity(model, emb[i:j]), noise[i:j], nfe, shift,
                                                    torch.Generator().manual_seed(g.seed + 1000 * nfe + i)), n)
                by_nfe[str(nfe)] = score(decode(x), specs, x, x_t, feats, domain=dom)
                bar.update(1)
            out[name][dom] = {"adapter": str(adapters[name]), "by_nfe": by_nfe}
    bar.close()
    out["prompts"] = {dom: domain_module(dom).prompts(eval_set(cfg, dom)) for dom in domains}
    return out


def table(evaluation: dict) -> dict:
    """{domain: {nfe: {"base": {total, semantic}, "domain": {total, semantic}}}} for metrics/domain.json."""
    keys = ("total", "semantic", "quality")
    return {dom: {n: {who: {k: evaluation[who][dom]["by_nfe"][n][k] for k in keys} for who in ("base", "domain")}
                  for n in evaluation["base"][dom]["by_nfe"]}
            for dom in evaluation["base"]}


def run(cfg: Config, base: str = "auto", max_steps: Optional[int] = None, fresh: bool = False,
        evaluate_only: bool = False, no_eval: bool = False, progress: bool = True,
        stop_after: Optional[int] = None) -> dict:
    """Train (unless ``evaluate_only``), evaluate and gate (unless ``no_eval``); returns the metrics written."""
    import torch

    from anyflow.eval import domain_gate
    from anyflow.models.student import adapter_metadata
    from anyflow.models.teacher import load_teacher
    from anyflow.stages.common import resolve_adapter, teacher_dir
    from anyflow.utils.io import read_json, write_json

    t_start = time.perf_counter()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as stage 1: the toy model is too small for intra-op threads to pay
    paths = StagePaths.of(cfg)
    base_adapter = resolve_adapter(paths, base)
    paradigm = adapter_metadata(base_adapter).get("paradigm", "flowmap")
    if paradigm != "flowmap":
        raise ValueError(f"{base_adapter}: paradigm {paradigm!r}; continued training needs a flow-map student")
    pipe = load_teacher(teacher_dir(cfg, paths))
    metrics_path = paths.metric("domain")
    if evaluate_only:
        ema = out_dir(paths) / "ema_adapter.safetensors"
        if not ema.is_file():
            raise FileNotFoundError(f"{ema}: no domain adapter to evaluate (run `anyflow domain`)")
        training = read_json(metrics_path).get("training", {}) if metrics_path.exists() else {}
    else:
        outs = train(cfg, pipe, base_adapter, max_steps, fresh, progress, stop_after)
        if outs.ema_adapter is None:
            return {"steps": outs.steps, "interrupted": True}
        ema, training = outs.ema_adapter, outs.training
    metrics = {"domain": cfg.domain.domain, "source": cfg.domain.source, "training": training}
    if not no_eval:
        t0 = time.perf_counter()
        ev = evaluate(cfg, pipe, {"base": base_adapter, "domain": ema}, progress)
        crit = domain_gate.check(ev["base"], ev["domain"], cfg.gate.policy, cfg.domain.forgetting_tolerance,
                                 cfg.domain.domain, BASE_DOMAIN)
        failed = [c["name"] for c in crit if not c["passed"]]
        # ``candidate.adapter`` (as in the stage-2 gate report) names the adapter this verdict judged: `anyflow
        # export --gate` refuses to ship another adapter under it
        write_json(out_dir(paths) / "report.json",
                   {**ev, "passed": not failed, "criteria": crit, "failed": failed,
                    "candidate": {"adapter": str(ema), "base_adapter": str(base_adapter), "paradigm": "flowmap"}})
        teacher = {dom: {k: ev["teacher"][dom][k] for k in ("total", "semantic", "quality")} for dom in ev["teacher"]}
        metrics.update(passed=not failed, failed=failed, criteria=crit, table=table(ev), teacher=teacher,
                       eval_seconds=time.perf_counter() - t0)
    metrics["seconds_total"] = time.perf_counter() - t_start
    write_json(metrics_path, metrics)
    return metrics


def main(cfg: Config, args) -> int:
    m = run(cfg, args.base, args.max_steps, args.fresh, args.evaluate_only, args.no_eval, not args.no_progress)
    if m.get("interrupted") or "table" not in m:
        return 0
    for dom, rows in m["table"].items():
        print(f"{dom}: NFE  base Total/Semantic   domain Total/Semantic")
        for n, r in rows.items():
            print(f"  {n:>4}  {r['base']['total']:.4f}/{r['base']['semantic']:.3f}      "
                  f"{r['domain']['total']:.4f}/{r['domain']['semantic']:.3f}")
    if m["passed"]:
        print(f"domain gate PASSED ({len(m['criteria'])} criteria)")
        return 0
    print("domain gate FAILED: " + ", ".join(m["failed"]))
    return 1
