"""``anyflow synthesize``: prompts + per-sample seeds → teacher ODE samples (CFG) → latent shards + manifest.

Sample i has prompt ``prompts[i % len(prompts)]`` (toy: the TRAIN split, cycled; wan: ``data.prompts_file``) and
seed ``synthesize.seed·10⁶ + i``; its noise is drawn from ``torch.Generator().manual_seed(seed)``, so a shard's
bytes depend only on (seed, sample indices) — re-running, resuming or distributing (``--shard i/n``) gives
byte-identical shards. A finished shard is recorded by a sidecar ``shard-XXXXX.json`` (its manifest entry) written
after the shard; on resume a shard whose sha256 matches its sidecar is skipped. The manifest merges every
finished shard present. Format: :mod:`anyflow.data.shards`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from anyflow.config import Config
from anyflow.stages.common import StagePaths

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="produce only shards with index ≡ I (mod N); the manifest lists all finished shards")


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def load_prompts(cfg: Config) -> list[str]:
    """Toy: the train split's prompts; otherwise ``data.prompts_file``: a text file (one prompt per non-empty line)
    or ``vbench``, VBench's prompt suite from the installed package (:mod:`anyflow.data.prompts`)."""
    if cfg.model.source == "toy" and not cfg.data.prompts_file:
        from anyflow.data import toy

        train, _ = toy.split(cfg.data.seed, cfg.data.heldout_fraction)
        return toy.prompts(train)
    from anyflow.data import prompts

    return prompts.load_prompts(cfg.data.prompts_file)


def sample_seed(base_seed: int, index: int) -> int:
    return base_seed * 1_000_000 + index


def plan(cfg: Config, prompts: list[str]) -> list[list[int]]:
    """Sample indices of each shard: shard k holds [k·S, min((k+1)·S, N))."""
    s, n = cfg.synthesize.samples_per_shard, cfg.synthesize.num_samples
    return [list(range(k, min(k + s, n))) for k in range(0, n, s)]


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _finished(path: Path) -> dict | None:
    """The shard's manifest entry if the shard exists and its sha256 matches the sidecar, else None."""
    from anyflow.utils.io import read_json, sha256_file

    side = _sidecar(path)
    if not (path.exists() and side.exists()):
        return None
    try:
        entry = read_json(side)
    except ValueError:
        return None
    return entry if sha256_file(path) == entry.get("sha256") else None


def synth_shard(pipe, cfg: Config, indices: list[int], prompts: list[str], neg, latent_shape, progress=False):
    """Teacher ODE samples for the given global sample indices; returns (latents, noise, embeds, prompts, seeds)."""
    import torch

    from anyflow.models.teacher import encode_prompts, teacher_ode_sample

    sc = cfg.synthesize
    seeds = [sample_seed(sc.seed, i) for i in indices]
    texts = [prompts[i % len(prompts)] for i in indices]
    noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    embeds = encode_prompts(pipe, texts, cfg.model.max_text_len)
    outs = []
    for b in range(0, len(indices), sc.batch_size):
        sl = slice(b, b + sc.batch_size)
        outs.append(teacher_ode_sample(pipe.transformer, noise[sl], embeds[sl], neg, sc.steps,
                                       sc.guidance_scale, cfg.model.flow_shift, progress=progress,
                                       guidance_min_t=cfg.model.guidance_min_t))
    return torch.cat(outs), noise, embeds, texts, seeds


def run(cfg: Config, teacher_dir: Path | None = None, out_dir: Path | None = None, shard: tuple[int, int] = (0, 1),
        progress: bool = True, fail_after: int | None = None) -> dict:
    """Write the shards assigned to ``shard`` (i, n) and the merged manifest; returns metrics. Runs on
    ``synthesize.threads`` CPU threads (part of the result, :func:`anyflow.stages.common.use_threads`).

    ``fail_after`` (tests only) raises after that many shards were written in this call, simulating a crash.
    """
    import torch

    from anyflow.stages.common import use_threads

    before = use_threads(cfg.synthesize.threads)
    try:
        return _run(cfg, teacher_dir, out_dir, shard, progress, fail_after)
    finally:
        torch.set_num_threads(before)


def _run(cfg: Config, teacher_dir: Path | None, out_dir: Path | None, shard: tuple[int, int], progress: bool,
         fail_after: int | None) -> dict:
    from tqdm.auto import tqdm

    from anyflow.data.shards import NEGATIVE, shard_name, write_manifest, write_shard, write_tensors
    from anyflow.models.teacher import latent_shape, load_teacher, negative_embeds
    from anyflow.utils.io import read_json, write_json

    paths = StagePaths.of(cfg)
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else paths.teacher
    out_dir = Path(out_dir) if out_dir is not None else paths.shards
    if cfg.model.source == "local":
        teacher_dir = Path(read_json(teacher_dir / "teacher.json")["pretrained_dir"])
    t0 = time.time()
    pipe = load_teacher(teacher_dir)
    prompts = load_prompts(cfg)
    neg = negative_embeds(pipe, cfg.synthesize.negative_prompt, cfg.model.max_text_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    negative = {"file": NEGATIVE, "sha256": write_tensors(out_dir / NEGATIVE, {"negative_prompt_embeds": neg})}
    shape = latent_shape(pipe, cfg)
    i, n = shard
    todo = [(k, idx) for k, idx in enumerate(plan(cfg, prompts)) if k % n == i]
    written = skipped = samples = 0
    for k, idx in tqdm(todo, disable=not progress, desc="synthesize shards"):
        path = out_dir / shard_name(k)
        if _finished(path) is not None:
            skipped += 1
            continue
        lat, noise, emb, texts, seeds = synth_shard(pipe, cfg, idx, prompts, neg, shape)
        entry = write_shard(path, latents=lat, noise=noise, prompt_embeds=emb, prompts=texts, seeds=seeds)
        write_json(_sidecar(path), entry)
        written += 1
        samples += len(idx)
        if fail_after is not None and written >= fail_after:
            raise RuntimeError(f"simulated crash after {written} shard(s)")
    entries = []
    for k, _ in enumerate(plan(cfg, prompts)):
        entry = _finished(out_dir / shard_name(k))
        if entry is not None:
            entries.append(entry)
    meta = {"steps": cfg.synthesize.steps, "guidance_scale": cfg.synthesize.guidance_scale,
            "flow_shift": cfg.model.flow_shift, "seed": cfg.synthesize.seed, "latent_shape": list(shape),
            "num_samples": cfg.synthesize.num_samples, "negative_prompt": cfg.synthesize.negative_prompt}
    write_manifest(out_dir, entries, negative, meta)
    return {"seconds": time.time() - t0, "samples": samples, "shards_written": written, "shards_skipped": skipped,
            "shards_total": len(entries)}


def main(cfg: Config, args) -> int:
    from anyflow.utils.io import write_json

    metrics = run(cfg, shard=parse_shard(getattr(args, "shard", None)))
    write_json(StagePaths.of(cfg).metric("synthesize"), metrics)
    log.info("synthesize: %s", metrics)
    return 0
