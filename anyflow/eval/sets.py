"""The gate's evaluation sets: what it samples (one prompt per clip) and how it scores the decoded clips.

A gate for another kind of model is a new evaluation set, not a branch inside the gate ([J] item 7). Two exist:

* :class:`ToySet` — the held-out specs of a toy domain (``shapes``: :mod:`anyflow.data.toy`, ``driving``:
  :mod:`anyflow.data.driving`), ``gate.num_prompts`` prompts cycled over the held-out split with
  ``gate.seeds_per_prompt`` noises each. Scored by the dimensions that read toy ground truth
  (:mod:`anyflow.eval.vbench_like`, :mod:`anyflow.eval.driving_scorers`) and, where ``artifacts/fvd_net`` is trained,
  the toy FVD and the realism dimension (``fvd``).
* :class:`PromptSet` — any prompts (``data.prompts_file``: a text file, or VBench's prompt suite from the installed
  ``vbench`` package, :mod:`anyflow.data.prompts`), for real models (the wan profiles, ``model.source: local``).
  Only what needs no ground truth: VBench's temporal-flickering formula on the pixels. With no semantic dimension,
  Total is Quality (``aggregate(..., partial=True)``).

Either set takes a ``vbench`` scorer (``gate.use_vbench``, where ``vbench`` and its weights are installed:
:class:`anyflow.eval.vbench_adapter.VBenchScorer`): VBench's own dimensions of every row — teacher, teacher at budget,
candidate, baselines — merge into its dimensions (replacing the weight-free analogue of the same name) and so into
Quality, Total and the policy's criteria.

Both report the same fidelity to the teacher (latent RMS distance to the teacher's sample from the same noise,
Fréchet distance in the fixed pixel-feature space of :mod:`anyflow.eval.fidelity`), so the policy's any-step
criteria (Total and fidelity non-decreasing with steps, the teacher at equal budget) apply to either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence


def fidelity_of(frames, x, x_teacher, teacher_feats) -> dict:
    from anyflow.eval import fidelity

    return {"latent_distance": fidelity.latent_distance(x, x_teacher),
            "frechet": fidelity.frechet_distance(fidelity.video_features(list(frames)), teacher_feats)}


def _row(agg: dict, dims: dict, fid: dict) -> dict:
    return {"total": agg["total"], "quality": agg["quality"], "semantic": agg["semantic"], "dimensions": dims,
            "normalized": agg["normalized"], "fidelity": fid}


@dataclass
class ToySet:
    """Held-out specs of toy ``domain``; ``fvd`` the gate's toy FVD (``anyflow.stages.gate.ToyFVD``) or None."""

    domain: str
    specs: list
    fvd: Any = None
    vbench: Optional[Callable] = None  # (frames, prompts) -> {dim: raw score}: VBench's own dimensions, merged
    kind: str = field(default="toy", init=False)

    @property
    def prompts(self) -> list[str]:
        from anyflow.data import driving, toy

        return (driving if self.domain == "driving" else toy).prompts(self.specs)

    def aggregate(self, dims: dict, drop: Sequence[str] = ()) -> dict:
        from anyflow.eval import vbench_like

        return vbench_like.aggregate(dims, drop=drop)

    def score(self, frames, x, x_teacher, teacher_feats) -> dict:
        from anyflow.eval import driving_scorers, vbench_like

        if self.domain == "driving":
            scored = driving_scorers.score_videos(list(frames), self.specs)
        else:
            realism = self.fvd.realism if self.fvd is not None else None
            scored = vbench_like.score_videos(list(frames), self.specs, realism=realism)
        fid = fidelity_of(frames, x, x_teacher, teacher_feats)
        if self.fvd is not None:
            fid["fvd"] = self.fvd(frames)
        dims = with_vbench(scored["dimensions"], self.vbench, frames, self.prompts)
        return _row(self.aggregate(dims), dims, fid)

    def window(self, frames) -> dict:
        """Total / Quality / Semantic of clips of another length (FAR drift windows): no fidelity, no realism."""
        from anyflow.eval import vbench_like

        agg = self.aggregate(vbench_like.score_videos(list(frames), self.specs)["dimensions"])
        return {"total": agg["total"], "quality": agg["quality"], "semantic": agg["semantic"]}

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "domain": self.domain, "prompts": self.prompts,
                **({"vbench": True} if self.vbench is not None else {})}


@dataclass
class PromptSet:
    """``prompts`` (one per clip: each prompt of the source repeated ``seeds_per_prompt`` times) from ``source``."""

    prompts: list[str]
    source: str
    vbench: Optional[Callable] = None  # as ToySet.vbench
    kind: str = field(default="prompts", init=False)

    def aggregate(self, dims: dict, drop: Sequence[str] = ()) -> dict:
        from anyflow.eval import vbench_like

        return vbench_like.aggregate(dims, drop=drop, partial=True)

    def dimensions(self, frames) -> dict:
        import numpy as np

        from anyflow.eval import vbench_like

        return {"temporal_flickering": float(np.mean([vbench_like.temporal_flickering(v) for v in frames]))}

    def score(self, frames, x, x_teacher, teacher_feats) -> dict:
        dims = with_vbench(self.dimensions(frames), self.vbench, frames, self.prompts)
        return _row(self.aggregate(dims), dims, fidelity_of(frames, x, x_teacher, teacher_feats))

    def window(self, frames) -> dict:
        """Total / Quality of clips of another length (FAR drift windows): the weight-free dimensions only."""
        agg = self.aggregate(self.dimensions(frames))
        return {"total": agg["total"], "quality": agg["quality"], "semantic": agg["semantic"]}

    def fingerprint(self) -> dict:
        digest = hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()
        return {"kind": self.kind, "source": self.source, "prompts_sha256": digest,
                **({"vbench": True} if self.vbench is not None else {})}


def with_vbench(dims: dict, vbench: Optional[Callable], frames, prompts) -> dict:
    """``dims`` with VBench's own scores of ``frames`` merged in (they replace a weight-free analogue of the same
    name, e.g. temporal_flickering); ``dims`` unchanged without a scorer."""
    if vbench is None:
        return dims
    return {**dims, **vbench(frames, list(prompts))}


def for_config(cfg, fvd_loader=None, domain: Optional[str] = None, vbench: Optional[Callable] = None):
    """The evaluation set of ``cfg``: toy profiles → :class:`ToySet` of ``domain`` (default ``shapes``, with the
    toy FVD from ``fvd_loader(specs)`` when given); ``model.source: local`` → :class:`PromptSet` of
    ``data.prompts_file`` (``gate.num_prompts`` of them, ``gate.seeds_per_prompt`` noises each). ``vbench``: the
    scorer of VBench's own dimensions, merged into every row (``gate.use_vbench``)."""
    g = cfg.gate
    if cfg.model.source == "local":
        from anyflow.data.prompts import load_prompts

        source = load_prompts(cfg.data.prompts_file)
        chosen = [source[i % len(source)] for i in range(g.num_prompts)]
        return PromptSet([p for p in chosen for _ in range(g.seeds_per_prompt)], str(cfg.data.prompts_file),
                         vbench)
    from anyflow.data import driving, toy

    domain = domain or "shapes"
    _, held = (driving if domain == "driving" else toy).split(cfg.data.seed, cfg.data.heldout_fraction)
    specs = [held[i % len(held)] for i in range(g.num_prompts) for _ in range(g.seeds_per_prompt)]
    return ToySet(domain, specs, fvd_loader(specs) if fvd_loader is not None else None, vbench)
