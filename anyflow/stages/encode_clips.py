"""``anyflow encode-clips [DIR] [--out OUT]``: the domain data of ``anyflow domain`` as latent shards (the synthesis
format) — the ``encode_clips`` stage of ``continued/dvc.yaml`` (output ``artifacts/domain_data``).

Without DIR the source comes from params (what the DVC stage runs):

* ``domain.source: synthetic`` — renders ``domain.num_samples`` clips of the toy domain ``domain.domain`` (its train
  split under ``data.seed``/``data.heldout_fraction``, cycled; clip ``i`` rendered with seed ``domain.seed·10⁶ + i``)
  and encodes them in memory (no mp4 round trip), ``meta = {source: synthetic, domain, clip_seeds}``
  (:func:`synthetic_clips`);
* ``domain.source: clips`` — encodes the folder ``domain.clips_dir`` (layout below).

With DIR that folder is encoded whatever ``domain.source`` says. A folder of real clips + captions:

Input folder layout (every ``*.mp4`` directly in DIR is one sample, sorted by file name):

* captions: ``captions.json`` — ``{"<file>.mp4": "<caption>", ...}`` — and/or a ``<name>.txt`` beside
  ``<name>.mp4`` holding the caption (the whole file, stripped). Both may be present; a
  clip with no caption, or with two different ones, is an error naming the clip;
* every clip must have exactly ``video.num_frames`` frames of ``video.height`` × ``video.width`` RGB; a clip that
  cannot be decoded or has another size is an error naming the file and the size found.

Each clip is encoded by the teacher's VAE (:func:`anyflow.models.teacher.encode_video`, posterior mode, normalised
latents — the space synthesis stores), its caption by the teacher's text encoder; ``noise`` holds the ε a sampler
would start from for that sample (``torch.Generator().manual_seed(domain.seed·10⁶ + i)``, as synthesis draws it;
it is not paired with the clip — there is no ODE behind a real clip). Output: :mod:`anyflow.data.shards`
(``write_shard`` / ``write_manifest``; ``meta.source = "clips"``), default ``artifacts/domain_data``, swapped in
atomically. ``anyflow domain`` (``domain.source: clips``) trains on it.

Both sources go through the same :func:`encode_to_shards`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from anyflow.config import Config
from anyflow.stages.common import StagePaths

log = logging.getLogger(__name__)

CAPTIONS = "captions.json"
ENCODE_BATCH = 16


class ClipError(ValueError):
    """A clip or caption is unreadable, missing or has the wrong size; the message names the file."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default=None, help="folder of mp4s + captions (default: from params — "
                   "domain.source synthetic renders the toy domain, clips reads domain.clips_dir)")
    p.add_argument("--out", default=None, help="shard directory (default: artifacts/domain_data, the "
                   "encode_clips stage's output)")


def default_out(cfg: Config) -> Path:
    return StagePaths.of(cfg).root / "domain_data"


def read_clip(path: Path):
    """uint8 (F, H, W, 3) of an mp4 (imageio-ffmpeg); ClipError naming the file when it cannot be decoded."""
    import imageio.v2 as imageio
    import numpy as np

    try:
        reader = imageio.get_reader(str(path), format="ffmpeg")
        try:
            frames = [np.asarray(f) for f in reader]
        finally:
            reader.close()
    except Exception as err:  # imageio/ffmpeg raise many types (OSError, RuntimeError, IndexError …)
        first = str(err).splitlines()[0] if str(err) else ""
        raise ClipError(f"{path}: unreadable clip ({type(err).__name__}: {first})") from None
    if not frames:
        raise ClipError(f"{path}: unreadable clip (no frames)")
    arr = np.stack(frames)
    if arr.ndim == 3:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr[..., :3].astype(np.uint8)


def check_size(frames, path: Path, cfg: Config) -> None:
    v = cfg.video
    want = (v.num_frames, v.height, v.width, 3)
    if tuple(frames.shape) != want:
        f, h, w = frames.shape[:3]
        raise ClipError(f"{path}: wrong size {f} frames of {h}x{w} (video: expected {v.num_frames} frames of "
                        f"{v.height}x{v.width})")


def load_captions(folder: Path, clips: Sequence[Path]) -> list[str]:
    """Caption of every clip from ``captions.json`` and/or ``<name>.txt``; ClipError naming the file otherwise."""
    from anyflow.utils.io import read_json

    table: dict = {}
    cpath = folder / CAPTIONS
    if cpath.exists():
        table = read_json(cpath)
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ClipError(f"{cpath}: expected a JSON object {{\"<file>.mp4\": \"<caption>\"}}")
        unknown = sorted(set(table) - {c.name for c in clips})
        if unknown:
            raise ClipError(f"{cpath}: captions for clips that are not in {folder}: {unknown[:3]}")
    out = []
    for clip in clips:
        found = []
        if clip.name in table:
            found.append(table[clip.name].strip())
        txt = clip.with_suffix(".txt")
        if txt.exists():
            found.append(txt.read_text().strip())
        if not found or not found[0]:
            raise ClipError(f"{clip}: no caption (add {txt.name} or an entry in {CAPTIONS})")
        if len(set(found)) > 1:
            raise ClipError(f"{clip}: {CAPTIONS} and {txt.name} give different captions {found}")
        out.append(found[0])
    return out


def read_folder(folder: str | Path, cfg: Config):
    """(names, uint8 frames list, captions) of every mp4 in ``folder``, checked against ``cfg.video``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: clips folder not found")
    clips = sorted(folder.glob("*.mp4"))
    if not clips:
        raise ClipError(f"{folder}: no *.mp4 clips")
    captions = load_captions(folder, clips)
    frames = []
    for clip in clips:
        arr = read_clip(clip)
        check_size(arr, clip, cfg)
        frames.append(arr)
    return [c.name for c in clips], frames, captions


def synthetic_clips(cfg: Config):
    """(uint8 frames list, captions, meta) of the procedural domain clips ``domain.source: synthetic`` trains on."""
    from anyflow.data import driving, toy

    d, v = cfg.domain, cfg.video
    mod = driving if d.domain == "driving" else toy
    train, _ = mod.split(cfg.data.seed, cfg.data.heldout_fraction)
    specs = [train[i % len(train)] for i in range(d.num_samples)]
    seeds = [d.seed * 1_000_000 + i for i in range(d.num_samples)]
    frames = [mod.render(s, sd, v.num_frames, v.height, v.width)[0] for s, sd in zip(specs, seeds)]
    return frames, mod.prompts(specs), {"source": "synthetic", "domain": d.domain, "clip_seeds": seeds}


def encode_to_shards(pipe, cfg: Config, frames: Sequence, captions: Sequence[str], out_dir: str | Path,
                     meta: dict | None = None, progress: bool = False) -> dict:
    """Encode uint8 clips (F, H, W, 3) + captions with the teacher into shards at ``out_dir`` (swapped in
    atomically); returns the manifest meta. Latents = ``encode_video`` of the clips (batches of ENCODE_BATCH)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from anyflow.data import toy
    from anyflow.data.shards import NEGATIVE, shard_name, write_manifest, write_shard, write_tensors
    from anyflow.models.teacher import encode_prompts, encode_video, latent_shape, negative_embeds
    from anyflow.utils.io import atomic_dir

    if len(frames) != len(captions) or not frames:
        raise ValueError(f"encode_to_shards: {len(frames)} clips and {len(captions)} captions")
    shape = latent_shape(pipe, cfg)
    seeds = [cfg.domain.seed * 1_000_000 + i for i in range(len(frames))]
    per_shard = cfg.synthesize.samples_per_shard
    neg = negative_embeds(pipe, cfg.synthesize.negative_prompt, cfg.model.max_text_len)
    entries = []
    with atomic_dir(out_dir) as tmp:
        negative = {"file": NEGATIVE, "sha256": write_tensors(tmp / NEGATIVE, {"negative_prompt_embeds": neg})}
        for k, start in enumerate(tqdm(range(0, len(frames), per_shard), disable=not progress, desc="encode")):
            idx = range(start, min(start + per_shard, len(frames)))
            lat = torch.cat([encode_video(pipe, toy.to_model_space(np.stack([frames[i] for i in
                                                                             idx[b:b + ENCODE_BATCH]])))
                             for b in range(0, len(idx), ENCODE_BATCH)])
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seeds[i])) for i in idx])
            texts = [captions[i] for i in idx]
            emb = encode_prompts(pipe, texts, cfg.model.max_text_len)
            entries.append(write_shard(tmp / shard_name(k), latents=lat, noise=noise, prompt_embeds=emb,
                                       prompts=texts, seeds=[seeds[i] for i in idx]))
        full = {"source": "clips", "latent_shape": list(shape), "num_samples": len(frames),
                "seed": cfg.domain.seed, "negative_prompt": cfg.synthesize.negative_prompt,
                "noise": "not paired with the clip (no ODE behind a real clip)", **(meta or {})}
        write_manifest(tmp, entries, negative, full)
    return full


def run(cfg: Config, clips_dir: str | Path | None = None, out_dir: str | Path | None = None,
        progress: bool = True) -> dict:
    import time

    import torch

    from anyflow.models.teacher import load_teacher
    from anyflow.stages.common import teacher_dir

    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    if clips_dir is None and cfg.domain.source == "synthetic":
        frames, captions, meta = synthetic_clips(cfg)
    else:
        clips_dir = clips_dir or cfg.domain.clips_dir
        if not clips_dir:
            raise ValueError("encode-clips: give DIR or set domain.clips_dir (domain.source: clips)")
        names, frames, captions = read_folder(clips_dir, cfg)  # every clip checked before the teacher loads
        meta = {"clips_dir": str(clips_dir), "clips": names}
    pipe = load_teacher(teacher_dir(cfg, StagePaths.of(cfg)))
    out = Path(out_dir) if out_dir else default_out(cfg)
    encode_to_shards(pipe, cfg, frames, captions, out, meta=meta, progress=progress)
    return {"clips": len(frames), "source": meta.get("source", "clips"), "out": str(out),
            "seconds": time.perf_counter() - t0}


def main(cfg: Config, args) -> int:
    metrics = run(cfg, args.dir, args.out)
    print(f"encoded {metrics['clips']} {metrics['source']} clips into {metrics['out']} ({metrics['seconds']:.1f} s)")
    return 0
