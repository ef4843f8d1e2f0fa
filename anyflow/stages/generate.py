"""``anyflow generate``: any-step generation from an exported release (DESIGN §6).

    anyflow generate --release artifacts/release --backend onnxruntime --steps 4 \\
        --prompt "a red circle moving left" --seed 0 --out video.mp4

text encode → N flow-map steps (one transformer call each) → VAE decode → ``video.mp4`` (imageio-ffmpeg) and a
PNG strip of the frames beside it (``video.png``). The release is verified against its manifest first
(``--no-verify`` skips that).
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
    backend = make_backend(args.backend, root, threads=args.threads)
    gen = generate(backend, info, args.prompt, args.steps, args.seed, show_progress=True)
    out = Path(args.out)
    written = []
    for i, frames in enumerate(gen.frames):
        mp4 = out if len(args.prompt) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        written += [write_mp4(mp4, frames, info.fps), write_strip(mp4.with_suffix(".png"), frames)]
    print(json.dumps({"backend": args.backend, "steps": args.steps, "seconds": gen.seconds,
                      "files": [str(p) for p in written]}, indent=1))
    return 0
