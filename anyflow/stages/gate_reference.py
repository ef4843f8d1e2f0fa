"""``anyflow gate-reference``: the gate's teacher rows, computed once (DVC stage ``gate_reference``).

Every gate run compares its students with the same teacher samples: on the gate's held-out specs and noises
(``gate.seed``), the teacher at ``gate.teacher_steps`` × CFG (the reference every fidelity number is measured to) and
at N steps × CFG for every gate NFE N (``teacher_at_budget``). They depend on the teacher, the gate's sampling
settings and the toy FVD network only — not on any student — yet they were 7 of the gate's 19 sample sets and about
half its time (2026-12-02, 2-core CPU: 125 s of teacher sampling of 364 s, plus their decoding and scoring). This
stage computes them once, right after the teacher, so under ``anyflow repro --jobs 2`` they run beside stage 1 and
stage 2 instead of on the critical path, and a re-run of the gate after a student change does not redo them.

Outputs (swapped in atomically; no timings, so the same inputs give the same bytes):
``artifacts/gate_reference/reference.safetensors`` (the teacher's latents, pixel features, toy-FVD features and
preview frames; metadata ``fingerprint``) and ``rows.json`` (the scored teacher rows, exactly as the gate writes them
into its report), ``metrics/gate_reference.json`` (seconds).

``anyflow gate --reference artifacts/gate_reference`` uses them; without ``--reference`` the gate computes the
same rows itself (the same function, tests/test_gate_reference.py checks the two reports are equal). The
``fingerprint`` (sha256 of the teacher directory and of the toy FVD network, and every setting the rows depend on)
is checked on load: a reference of another teacher or other gate settings is an error naming what differs, never
silently used. Scorer code is not in the fingerprint: in the DVC pipeline the stage lists the scorer modules as
dependencies, so an edit to them re-runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from anyflow.config import Config
from anyflow.stages.common import StagePaths, teacher_dir
from anyflow.utils.io import (_json_default, atomic_dir, atomic_write_text, read_json, sha256_file, sha256_tree,
                              write_json, write_safetensors)

log = logging.getLogger(__name__)

OUT = "gate_reference"
FILE = "reference.safetensors"
ROWS = "rows.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true")


@dataclass
class Reference:
    """The teacher side of a gate report (see module docstring)."""

    x_teacher: "torch.Tensor"  # noqa: F821  latents of the teacher at gate.teacher_steps × CFG
    teacher_features: "torch.Tensor"  # noqa: F821  fidelity.video_features of its frames
    fvd_teacher: Optional["torch.Tensor"]  # noqa: F821  toy-FVD features of its frames (None without fvd_net)
    previews: "np.ndarray"  # noqa: F821  its first gate.num_previews clips, uint8 (N, F, H, W, 3)
    teacher: dict  # its scored row
    budget: dict  # nfe (str) → the scored row of the teacher at N steps × CFG
    fingerprint: dict


def fingerprint(cfg: Config, es) -> dict:
    """What the teacher rows depend on: the teacher's and the FVD network's bytes, the evaluation set (its kind and
    prompts), the gate's sampling settings."""
    g, paths = cfg.gate, StagePaths.of(cfg)
    fvd = paths.root / "fvd_net" / "model.safetensors"
    return {"teacher_sha256": sha256_tree(teacher_dir(cfg, paths)),
            "fvd_net_sha256": sha256_file(fvd) if fvd.is_file() and getattr(es, "fvd", None) is not None else None,
            "evaluation_set": es.fingerprint(),
            "gate": {"seed": g.seed, "nfes": list(g.nfes), "teacher_steps": g.teacher_steps,
                     "teacher_guidance_scale": g.teacher_guidance_scale, "num_prompts": g.num_prompts,
                     "seeds_per_prompt": g.seeds_per_prompt, "num_previews": g.num_previews},
            "data": {"seed": cfg.data.seed, "heldout_fraction": cfg.data.heldout_fraction},
            "model": {"flow_shift": cfg.model.flow_shift, "max_text_len": cfg.model.max_text_len,
                      "guidance_min_t": cfg.model.guidance_min_t},
            "negative_prompt": cfg.synthesize.negative_prompt,
            "video": {"num_frames": cfg.video.num_frames, "height": cfg.video.height, "width": cfg.video.width}}


def compute(cfg: Config, pipe, es, emb, neg, noise, bar, decode) -> Reference:
    """Sample, decode and score the teacher rows on evaluation set ``es`` (:mod:`anyflow.eval.sets`)."""
    from anyflow.eval import fidelity
    from anyflow.stages.gate import GUIDANCE_CONVENTION, cfg_nfe, teacher_samples

    fvd = getattr(es, "fvd", None)

    g, shift, min_t = cfg.gate, cfg.model.flow_shift, cfg.model.guidance_min_t
    x_teacher = teacher_samples(pipe, noise, emb, neg, g.teacher_steps, g.teacher_guidance_scale, shift, bar,
                                "teacher", min_t)
    frames_teacher = decode(x_teacher)
    teacher_feats = fidelity.video_features(list(frames_teacher))
    teacher = es.score(frames_teacher, x_teacher, x_teacher, teacher_feats)
    fvd_teacher = None
    if fvd is not None:
        fvd_teacher = fvd.teacher = fvd.net.features(frames_teacher)
    teacher.update(steps=g.teacher_steps, guidance_scale=g.teacher_guidance_scale, guidance_min_t=min_t,
                   guidance_convention=GUIDANCE_CONVENTION,
                   nfe=cfg_nfe(g.teacher_steps, g.teacher_guidance_scale, shift, min_t))
    budget = {}  # the teacher at the same budget: N Euler steps × CFG per gate NFE N (same noises)
    for nfe in g.nfes:
        x = teacher_samples(pipe, noise, emb, neg, nfe, g.teacher_guidance_scale, shift, bar, f"teacher {nfe}×CFG",
                            min_t)
        budget[str(nfe)] = es.score(decode(x), x, x_teacher, teacher_feats)
        budget[str(nfe)].update(steps=nfe, evaluations=cfg_nfe(nfe, g.teacher_guidance_scale, shift, min_t))
    return Reference(x_teacher, teacher_feats, fvd_teacher, frames_teacher[:g.num_previews], teacher, budget,
                     fingerprint(cfg, es))


def save(ref: Reference, out: Path) -> None:
    import torch

    tensors = {"x_teacher": ref.x_teacher.contiguous(), "teacher_features": ref.teacher_features.contiguous(),
               "previews": torch.as_tensor(ref.previews).contiguous()}
    if ref.fvd_teacher is not None:
        tensors["fvd_teacher"] = ref.fvd_teacher.contiguous()
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / FILE, tensors, metadata={"fingerprint": json.dumps(ref.fingerprint, sort_keys=True)})
        # insertion order kept (not write_json's sorted keys): the rows are the gate's, in the gate's order
        atomic_write_text(tmp / ROWS, json.dumps({"fingerprint": ref.fingerprint, "teacher": ref.teacher,
                                                  "teacher_at_budget": ref.budget}, indent=2, default=_json_default)
                          + "\n")


def _differences(want: dict, got: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(want) | set(got)):
        a, b = want.get(k), got.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} (reference {b!r}, now {a!r})")
    return out


def load(path: Path, cfg: Config, es) -> Reference:
    """The reference in ``path`` for evaluation set ``es``; ValueError naming what differs when it was computed for
    other inputs."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (FILE, ROWS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: gate reference not found (run `anyflow gate-reference`)")
    rows = read_json(path / ROWS)
    want = fingerprint(cfg, es)
    diff = _differences(want, rows.get("fingerprint") or {})
    if diff:
        raise ValueError(f"{path}: gate reference computed for other inputs: {'; '.join(diff)} "
                         f"(re-run `anyflow gate-reference`, or drop --reference)")
    t = load_file(str(path / FILE))
    budget = {str(n): rows["teacher_at_budget"][str(n)] for n in cfg.gate.nfes}  # the gate's NFE order
    return Reference(t["x_teacher"], t["teacher_features"], t.get("fvd_teacher"), t["previews"].numpy(),
                     rows["teacher"], budget, rows["fingerprint"])


def teacher_batches(cfg: Config) -> int:
    """Progress-bar batches (per 16 clips) of :func:`compute`: sampling and decoding of 1 + len(nfes) sets."""
    return 2 * (1 + len(cfg.gate.nfes))


def main(cfg: Config, args) -> int:
    from anyflow.stages.gate import setup

    t0 = time.perf_counter()
    paths = StagePaths.of(cfg)
    pipe, es, emb, neg, noise, bar, decode = setup(cfg, not args.no_progress, OUT, teacher_batches(cfg))
    ref = compute(cfg, pipe, es, emb, neg, noise, bar, decode)
    bar.close()
    save(ref, paths.root / OUT)
    seconds = time.perf_counter() - t0
    n = len(es.prompts)
    write_json(paths.metric(OUT), {"seconds": seconds, "num_samples": n})
    print(f"gate reference: teacher {cfg.gate.teacher_steps}×CFG and N×CFG at N in {list(cfg.gate.nfes)} on "
          f"{n} clips ({es.kind}) → {paths.root / OUT} ({seconds:.0f} s)")
    return 0
