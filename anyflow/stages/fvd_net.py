"""``anyflow fvd-net``: train the toy FVD's feature network once (DVC stage ``fvd_net``; [J] item 3).

A small 3D-conv network (:class:`anyflow.eval.toy_fvd.VideoNet`) is trained with supervision (colour, object,
motion heads) on ``fvd.train_clips`` procedural clips of both toy domains (half shapes, half driving, at
``cfg.video``'s geometry), deterministically from ``fvd.seed``. Then it is checked:

* accuracy of every head on the training clips and on ``fvd.heldout_clips`` clips of other seeds;
* sanity of its Fréchet distance: a reference set of ``fvd.sanity_clips`` procedural clips against another set of
  the same specs with other seeds (``same``, the small-sample floor) and against that other set blurred
  (``fvd.blur_sigmas``), noised (``fvd.noise_stds``, 0–255 scale) and frozen (``fvd.freeze_fractions``: the last
  fraction of every clip held still); each corruption must give ``same`` < FVD(strength₁) < FVD(strength₂) < …;
* the floor at the gate's size: for each domain, the procedural clips of the gate's held-out specs
  (``gate.num_prompts`` × ``gate.seeds_per_prompt``, the split under ``data.seed``/``data.heldout_fraction``)
  rendered with ``toy_fvd.reference_clips(specs, gate.seed)`` — the reference the gate should use — against the
  same specs rendered with seed ``gate.seed + 1``: what a perfect sampler would score there.

Outputs: ``artifacts/fvd_net/{model.safetensors, report.json}`` (swapped in atomically; the report holds no timings,
so the same code and params give the same bytes) and ``metrics/fvd_net.json`` (accuracies, sanity FVDs, seconds).
Exit 1, after writing everything, when a sanity ordering fails: a feature space that does not rank corruptions
must not feed the gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from anyflow.config import Config
from anyflow.stages.common import StagePaths, use_threads
from anyflow.utils.io import atomic_dir, sha256_file, write_json

log = logging.getLogger(__name__)

OUT = "fvd_net"
TAGS = {"train": 0, "heldout": 1, "reference": 2, "other": 3}  # clip-seed namespaces of toy_fvd.make_clips


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-every", type=int, default=25, help="log the training loss every N steps (default 25)")


def gate_specs(cfg: Config, domain: str) -> list:
    """The gate's held-out specs of ``domain`` (as ``anyflow.stages.gate.eval_set`` draws them)."""
    from anyflow.data import driving, toy

    _, held = (driving if domain == "driving" else toy).split(cfg.data.seed, cfg.data.heldout_fraction)
    g = cfg.gate
    return [held[i % len(held)] for i in range(g.num_prompts) for _ in range(g.seeds_per_prompt)]


def sanity(net, cfg: Config) -> dict:
    """FVDs of clean / corrupted procedural sets against a procedural reference, the ordering checks, and the floor
    at the gate's sample size (see the module docstring)."""
    from anyflow.eval import toy_fvd as T

    f, v = cfg.fvd, cfg.video
    ref = T.make_clips(f.sanity_clips, f.seed, TAGS["reference"], v.num_frames, v.height, v.width).pixels
    other = T.make_clips(f.sanity_clips, f.seed, TAGS["other"], v.num_frames, v.height, v.width).pixels
    f_ref = net.features(ref)
    fvd = lambda videos: T.frechet_distance(f_ref, net.features(videos))  # noqa: E731
    same = fvd(other)
    series = {"blur": {str(s): fvd(T.blur(other, s)) for s in f.blur_sigmas},
              "noise": {str(s): fvd(T.add_noise(other, s, seed=f.seed)) for s in f.noise_stds},
              "freeze": {str(s): fvd(T.freeze(other, s)) for s in f.freeze_fractions}}
    checks = {}
    for name, values in series.items():
        chain = [same, *values.values()]
        checks[f"{name}_increasing"] = all(a < b for a, b in zip(chain, chain[1:]))
    floor = {}
    for domain in ("shapes", "driving"):
        specs = gate_specs(cfg, domain)
        floor[domain] = T.fvd_against(T.reference_clips(specs, cfg.gate.seed, v),
                                      T.reference_clips(specs, cfg.gate.seed + 1, v), net)
    floor["num_samples"] = cfg.gate.num_prompts * cfg.gate.seeds_per_prompt
    return {"num_clips": f.sanity_clips, "same": same, **series, "checks": checks,
            "passed": all(checks.values()), "floor_at_gate_size": floor}


def run(cfg: Config, log_every: int = 25) -> dict:
    """Train, check, write every output; returns the report (``report["sanity"]["passed"]``)."""
    import torch

    paths = StagePaths.of(cfg)
    if cfg.model.source != "toy":
        return not_applicable(cfg, paths)
    # one intra-op thread, as every one-slot stage: the count is part of the weights' bits (use_threads); left at
    # torch's default it followed the CPUs the process could use (2 unpinned, 1 pinned by anyflow repro)
    before = use_threads(1) if not torch.cuda.is_available() else None
    try:
        return _train(cfg, paths, log_every)
    finally:
        if before is not None:
            torch.set_num_threads(before)


def _train(cfg: Config, paths: StagePaths, log_every: int) -> dict:
    import torch

    from anyflow.eval import toy_fvd as T

    t_start = time.perf_counter()
    f, v = cfg.fvd, cfg.video
    seconds = {}
    t0 = time.perf_counter()
    train_set = T.make_clips(f.train_clips, f.seed, TAGS["train"], v.num_frames, v.height, v.width)
    held = T.make_clips(f.heldout_clips, f.seed, TAGS["heldout"], v.num_frames, v.height, v.width)
    seconds["render"] = time.perf_counter() - t0
    progress = lambda step, loss: (step % log_every == 0 or step == f.steps - 1) and log.info(  # noqa: E731
        "fvd-net step %d/%d loss %.4f", step + 1, f.steps, loss)
    net, info = T.train(train_set, f.seed, f.steps, f.batch_size, f.lr, f.width, f.feature_dim, log=progress)
    seconds["train"] = info.pop("seconds")
    t0 = time.perf_counter()
    acc = {"train": T.accuracy(net, train_set), "heldout": T.accuracy(net, held)}
    checks = sanity(net, cfg)
    seconds["eval"] = time.perf_counter() - t0
    params = dataclasses.asdict(f)
    report = {"params": params, "video": dataclasses.asdict(v), "config": net.config,
              "num_parameters": sum(p.numel() for p in net.parameters()), "torch_threads": torch.get_num_threads(),
              "loss": info, "accuracy": acc, "sanity": checks}
    with atomic_dir(paths.root / OUT) as tmp:
        report["model_sha256"] = T.save_fvd_net(net, tmp / T.MODEL_FILE, extra={"params": params,
                                                                                "accuracy": acc["heldout"]})
        write_json(tmp / "report.json", report)
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = seconds
    write_json(paths.metric(OUT), metrics_of(report))
    return report


def not_applicable(cfg: Config, paths: StagePaths) -> dict:
    """A real model (``model.source: local``) has no procedural domain to train the toy FVD on, and its gate
    (:class:`anyflow.eval.sets.PromptSet`) does not use one. The stage still writes its output — a README saying
    so, no ``model.safetensors`` — so one ``dvc.yaml`` runs on every profile (``dvc repro`` on a wan profile would
    otherwise stop here); the gate then reports no toy FVD."""
    reason = (f"not applicable: profile {cfg.profile!r} has model.source {cfg.model.source!r}; the toy FVD is "
              "trained on the procedural toy domains, and the gate of a real model (a prompt set) does not use it")
    with atomic_dir(paths.root / OUT) as tmp:
        (tmp / "README.md").write_text(f"# fvd_net\n\n{reason[0].upper()}{reason[1:]}.\n", encoding="utf-8")
    report = {"skipped": reason}
    write_json(paths.metric(OUT), report)
    return report


def metrics_of(report: dict) -> dict:
    s = report["sanity"]
    return {"train_accuracy": report["accuracy"]["train"], "heldout_accuracy": report["accuracy"]["heldout"],
            "sanity": {k: s[k] for k in ("same", "blur", "noise", "freeze", "checks", "passed",
                                         "floor_at_gate_size")},
            "loss": report["loss"], "num_parameters": report["num_parameters"],
            "torch_threads": report["torch_threads"], "seconds": report["seconds"],
            "model_sha256": report["model_sha256"]}


def main(cfg: Config, args: argparse.Namespace) -> int:
    report = run(cfg, log_every=getattr(args, "log_every", 25))
    if "skipped" in report:
        print(f"fvd-net: {report['skipped']}")
        return 0
    acc, s = report["accuracy"], report["sanity"]
    print(f"fvd-net: held-out accuracy all {acc['heldout']['all']:.3f} (colour {acc['heldout']['color']:.3f}, "
          f"object {acc['heldout']['object']:.3f}, motion {acc['heldout']['motion']:.3f}); FVD same "
          f"{s['same']:.4f}, blur {s['blur']}, noise {s['noise']}, freeze {s['freeze']}; "
          f"train {report['seconds']['train']:.1f} s")
    if not s["passed"]:
        failed = [k for k, ok in s["checks"].items() if not ok]
        print(f"fvd-net: sanity FAILED: {', '.join(failed)} (FVD does not grow with corruption strength)")
        return 1
    return 0
