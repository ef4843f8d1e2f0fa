"""``anyflow generate``: any-step generation from an exported release (DESIGN §6).

    anyflow generate --release artifacts/release --backend onnxruntime --steps 4 \\
        --prompt "a red circle moving left" --seed 0 --out video.mp4

text encode → N flow-map steps (one transformer call each) → VAE decode → ``video.mp4`` (imageio-ffmpeg) and a
PNG strip of the frames beside it (``video.png``). The release is verified against its manifest first
(``--no-verify`` skips that).

A causal (AnyFlow-FAR) release generates chunk by chunk with the KV cache, ``--steps`` per chunk
(:mod:`anyflow.export.far_runtime`; ``--backend torch``, or ``onnxruntime`` on its per-chunk graphs ``onnx/far/``
at the exported length), and can be conditioned (docs/far.md)::

    anyflow generate --release R --backend torch --prompt "..." --image first.png   # image-to-video
    anyflow generate --release R --backend torch --prompt "..." --video clip.mp4    # video-to-video
    anyflow generate --release R --backend torch --prompt "..." --length-chunks 5   # longer than training

``--image``: a PNG/JPEG of exactly ``video.height × video.width`` (the manifest's runtime block), the first frame.
``--video``: an mp4 of that size; its first frames, up to the largest count whose latent length ends on a chunk
boundary before the last chunk (causal Wan VAE: ``1 + temporal_factor·(latent frames − 1)`` pixel frames), are
the context, the rest is generated. The output video opens with the context frames (through the VAE).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from anyflow.config import Config

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


BACKENDS = ("torch", "onnxruntime", "tensorrt")  # = anyflow.export.runtime.BACKENDS (no torch import for --help)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", default=None, help="release directory (default: <paths.root>/release)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--steps", type=int, default=4, help="number of flow-map steps (any N >= 1)")
    p.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for a batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="video.mp4", help="mp4 path; with several prompts, _<i> is appended")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    p.add_argument("--no-verify", action="store_true", help="skip the manifest sha256 check")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--image", default=None, help="FAR releases: first frame (PNG/JPEG, video.height × width): I2V")
    cond.add_argument("--video", default=None,
                      help="FAR releases: context clip (mp4, video.height × width): V2V, its first frames up to a "
                           "chunk boundary are kept and the video is continued")
    p.add_argument("--length-chunks", type=int, default=None,
                   help="FAR releases: number of chunks to generate (default: the training chunk_partition; more "
                        "repeats its chunks after the first)")


def _rgb(frames: "np.ndarray", path: Path) -> "np.ndarray":
    """(…, H, W[, 1|3|4]) uint8 → (…, H, W, 3): grey repeated, alpha dropped; anything else names the file."""
    import numpy as np

    if frames.dtype != np.uint8:
        raise ValueError(f"{path}: expected 8-bit RGB frames, got dtype {frames.dtype}")
    if frames.shape[-1] not in (1, 3, 4):
        frames = frames[..., None]
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])


def _check_size(frames: "np.ndarray", path: Path, info) -> None:
    if tuple(frames.shape[-3:-1]) != (info.height, info.width):
        raise ValueError(f"{path}: frames are {frames.shape[-3]}×{frames.shape[-2]} (H×W), the release generates "
                         f"{info.height}×{info.width} (video.height × video.width); resize it first")


def read_image(path: str | Path, info) -> "np.ndarray":
    """A PNG/JPEG first frame → uint8 (1, H, W, 3); a missing/unreadable file or a wrong size names the file."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --image file not found")
    try:
        img = iio.imread(path)
    except Exception as err:  # imageio raises plugin-specific errors
        raise ValueError(f"{path}: --image could not be read as an image ({type(err).__name__}: {err})") from None
    if img.ndim not in (2, 3):
        raise ValueError(f"{path}: --image must be a single image, got an array of shape {img.shape}")
    img = _rgb(img, path)
    _check_size(img, path, info)
    return img[None]


def read_clip(path: str | Path, info, partition) -> "np.ndarray":
    """An mp4 context clip → uint8 (F_ctx, H, W, 3): its first frames up to the largest count whose latent length
    ends on a chunk boundary of ``partition`` before the last chunk (:func:`anyflow.export.far_runtime.
    context_latent_frames`); unreadable files, a wrong size or too few frames name the file."""
    import imageio.v3 as iio

    from anyflow.export.far_runtime import context_latent_frames, pixel_frames

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --video file not found")
    try:
        frames = iio.imread(path)
    except Exception as err:
        raise ValueError(f"{path}: --video could not be read as a video ({type(err).__name__}: {err})") from None
    if frames.ndim == 3 and frames.shape[-1] not in (1, 3, 4):
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[0] < 1:
        raise ValueError(f"{path}: --video must hold frames (F, H, W, 3), got an array of shape {frames.shape}")
    frames = _rgb(frames, path)
    _check_size(frames, path, info)
    n = context_latent_frames(len(frames), partition, info.temporal_factor)
    if n == 0:
        raise ValueError(f"{path}: --video has {len(frames)} frames, fewer than the first chunk's "
                         f"{pixel_frames(partition[0], info.temporal_factor)} (chunk_partition {list(partition)})")
    return frames[:pixel_frames(n, info.temporal_factor)]


def context_video(args, info):
    """``--image`` / ``--video`` → (1, 3, F, H, W) float in [−1, 1] (None without either); FAR releases only."""
    import torch

    from anyflow.export.far_runtime import extend_partition

    if not (args.image or args.video):
        return None
    flag = "--image" if args.image else "--video"
    if info.architecture != "far":
        raise ValueError(f"{flag}: {info.root} is a bidirectional release; image/video conditioning needs a FAR "
                         "(causal) release (anyflow export --adapter <a FAR adapter>)")
    partition = extend_partition(info.chunk_partition, args.length_chunks)
    if args.image:
        if partition[0] != 1:
            raise ValueError(f"--image: the first chunk has {partition[0]} latent frames (chunk_partition "
                             f"{list(partition)}); a single image is one latent frame — pass a clip with --video")
        frames = read_image(args.image, info)
    else:
        frames = read_clip(args.video, info, partition)
    x = torch.from_numpy(frames).float().div(127.5).sub(1.0)  # as anyflow.data.toy.to_model_space
    return x.permute(3, 0, 1, 2)[None].contiguous()


def write_mp4(path: Path, frames_FHW3: "np.ndarray", fps: int) -> Path:
    """H.264 mp4 through imageio-ffmpeg (``macro_block_size=1`` keeps tiny toy frames unresized)."""
    import imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(str(path), list(frames_FHW3), fps=fps, codec="libx264", macro_block_size=1,
                     output_params=["-pix_fmt", "yuv420p"] if frames_FHW3.shape[1] % 2 == 0 else None)
    return path


def write_strip(path: Path, frames_FHW3: "np.ndarray") -> Path:
    """All frames side by side in one PNG."""
    import imageio
    import numpy as np

    imageio.imwrite(str(path), np.concatenate(list(frames_FHW3), axis=1))
    return path


def main(cfg: Config, args) -> int:
    from anyflow.export.manifest import verify_release
    from anyflow.export.runtime import ReleaseInfo, generate, make_backend
    from anyflow.stages.common import StagePaths

    root = Path(args.release) if args.release else StagePaths.of(cfg).release
    if not args.no_verify:
        verify_release(root, allow_unlisted=True)  # engines built later on a GPU host are not in the manifest
    info = ReleaseInfo.read(root)
    length = getattr(args, "length_chunks", None)
    if length is not None and info.architecture != "far":
        raise ValueError(f"--length-chunks: {root} is a bidirectional release (fixed length); FAR releases only")
    context = context_video(args, info) if hasattr(args, "image") else None
    backend = make_backend(args.backend, root, threads=args.threads)
    if info.architecture == "far":
        from anyflow.export.far_runtime import generate_far

        gen = generate_far(backend, info, args.prompt, args.steps, args.seed, show_progress=True,
                           context_video=context, num_chunks=length)
    else:
        gen = generate(backend, info, args.prompt, args.steps, args.seed, show_progress=True)
    out = Path(args.out)
    written = []
    for i, frames in enumerate(gen.frames):
        mp4 = out if len(args.prompt) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        written += [write_mp4(mp4, frames, info.fps), write_strip(mp4.with_suffix(".png"), frames)]
    extra = {} if info.architecture != "far" else {
        "architecture": "far", "latent_frames": int(gen.latents.shape[1]),
        "context_pixel_frames": 0 if context is None else int(context.shape[2])}
    print(json.dumps({"backend": args.backend, "steps": args.steps, **extra, "seconds": gen.seconds,
                      "files": [str(p) for p in written]}, indent=1))
    return 0
