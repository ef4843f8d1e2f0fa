#!/usr/bin/env python
"""Build TensorRT engines from a release's ONNX graphs and check them against ONNX Runtime (DESIGN §6).

    python deploy/tensorrt_build.py --release artifacts/release --precision fp16 --max-batch 4 --max-frames 21

Writes ``<release>/tensorrt/<graph>.engine`` for every ONNX graph of the release (each atomically) and
``<release>/tensorrt/parity.json`` (engine vs ONNX Runtime max abs/rel error and mean latency per component).
Optimisation profiles: transformer batch ∈ [1, max_batch] × latent frames ∈ [1, max_frames]; text encoder batch
∈ [1, max_batch]; the VAE decoder is static (batch 1). Engines are built into a temporary directory and moved
into place only when every engine built and passed ``--atol``; on a host without a CUDA GPU or without the
``tensorrt`` package the script says so and exits 2 without touching existing engines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--release", default="artifacts/release")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-frames", type=int, default=0, help="0: the release's latent frame count")
    p.add_argument("--workspace-gb", type=float, default=8.0)
    p.add_argument("--atol", type=float, default=5e-2, help="engine vs ONNX Runtime max abs error allowed")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per component")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from anyflow.export.trt import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable as err:
        print(f"tensorrt_build: cannot build engines here: {err}. Existing engines were left untouched.",
              file=sys.stderr)
        return 2

    import torch

    from anyflow.export import onnx_export as ox
    from anyflow.export.runtime import ONNX_FILES, ReleaseInfo
    from anyflow.export.trt import TrtRunner, build_engine, text_encoder_profiles, transformer_profiles

    root = Path(args.release)
    info = ReleaseInfo.read(root)
    c, f, h, w = info.latent_shape
    max_frames = args.max_frames or f
    g = torch.Generator().manual_seed(0)
    b = min(2, args.max_batch)
    d = None
    examples = {
        "text_encoder": {"input_ids": torch.randint(0, 100, (b, info.max_text_len), generator=g),
                         "attention_mask": torch.ones(b, info.max_text_len, dtype=torch.long)},
        "vae_decoder_first": {"latents": torch.randn(1, c, 1, h, w, generator=g)},
    }
    first = ox.session(root / ONNX_FILES["vae_decoder_first"])  # the step graph's example caches: frame 0's
    step_names = [i.name for i in ox.session(root / ONNX_FILES["vae_decoder_step"]).get_inputs()][1:]
    caches = ox.ort_runner(first)(**examples["vae_decoder_first"])[1:]
    examples["vae_decoder_step"] = {"latents": torch.randn(1, c, 1, h, w, generator=g),
                                    **dict(zip(step_names, caches))}
    te_sess = ox.session(root / ONNX_FILES["text_encoder"])
    text = torch.from_numpy(te_sess.run(None, {k: v.numpy() for k, v in examples["text_encoder"].items()})[0])
    d = text.shape[-1]
    examples["transformer"] = {"latents": torch.randn(b, f, c, h, w, generator=g),
                               "t": torch.full((b, f), 900.0), "r": torch.full((b, f), 400.0), "text_embeds": text}
    profiles = {"transformer": transformer_profiles((b, f, c, h, w), (b, info.max_text_len, d), args.max_batch,
                                                    max_frames),
                "text_encoder": text_encoder_profiles((b, info.max_text_len), args.max_batch),
                "vae_decoder_first": None, "vae_decoder_step": None}  # static shapes: batch 1, one latent frame
    out_dir = root / "tensorrt"
    tmp = Path(tempfile.mkdtemp(prefix=".tensorrt.", dir=root))
    report = {"precision": args.precision, "max_batch": args.max_batch, "max_frames": max_frames,
              "device": torch.cuda.get_device_name(0), "components": {}}
    try:
        for key, rel in ONNX_FILES.items():
            t0 = time.perf_counter()
            engine = build_engine(root / rel, tmp / f"{key}.engine", args.precision, profiles[key],
                                  args.workspace_gb)
            build_s = time.perf_counter() - t0
            runner = TrtRunner(engine)
            sess = ox.session(root / rel, providers=("CPUExecutionProvider",))
            ref = sess.run(None, {k: v.numpy() for k, v in examples[key].items()})[0]
            got = runner(**examples[key]).numpy()
            err = ox.compare(got, ref)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                runner(**examples[key])
            latency = (time.perf_counter() - t0) / args.repeats
            report["components"][key] = {"build_seconds": build_s, "latency_seconds": latency, **err.as_dict(),
                                         "engine_bytes": engine.stat().st_size}
            print(f"{key}: built in {build_s:.1f} s, max abs err vs ORT {err.max_abs:.2e}, {latency*1e3:.2f} ms/call")
            if err.max_abs > args.atol:
                raise RuntimeError(f"{key}: engine differs from ONNX Runtime by {err.max_abs:.2e} > --atol")
        (tmp / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
        old = root / ".tensorrt.old"
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"engines: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
