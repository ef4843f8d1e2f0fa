"""``anyflow export``: merged any-step student → diffusers directory + ONNX graphs + release manifest (DESIGN §6).

Reads the teacher (``artifacts/teacher``, a ``WanPipeline`` directory; ``model.pretrained_dir`` for wan profiles)
and the student adapter (``--adapter auto``: ``artifacts/stage2/ema_adapter.safetensors``, else
``artifacts/stage1/ema_adapter.safetensors``; or ``stage2``/``stage1``/a path). Writes ``artifacts/release/``,
built in a temporary directory and swapped in only when every check passed::

    pipeline/            AnyFlowPipeline.from_pretrained(...) loads it (merged transformer, teacher VAE, text
                         encoder, tokenizer, FlowMapEulerDiscreteScheduler(shift = model.flow_shift)) and
                         README.md, its model card: the stock call, base model, gate verdict (anyflow.export.model_card)
    onnx/transformer.onnx, onnx/text_encoder.onnx, onnx/vae_decoder_{first,step}.onnx (a streaming decoder)
    manifest.json        files + sha256 + sizes, gate verdict, parity, runtime shapes (no clock, commit or dvc.lock
                         digest: the same inputs export the same bytes; `anyflow promote` records provenance)

``--out`` another directory (``artifacts/release_domain``) writes ``metrics/export_domain.json`` instead
(:func:`metrics_name`). The manifest's gate verdict is copied from ``--gate`` (default: the stage-2 gate report
``artifacts/gate/report.json``, else ``metrics/gate.json``) and fails when that report judged another adapter than
the one exported (:func:`gate_verdict`).

Checks (recorded in the manifest and ``metrics/export.json``): merged vs adapter model (max abs diff), each ONNX
graph through ``onnx.checker`` and ONNX Runtime vs torch (max abs/rel error; the transformer at every
``export.check_pairs`` (t, r)), and a full 4-step generation ONNX Runtime vs torch.

A causal adapter (metadata ``architecture: far``, e.g. ``artifacts/far_stage1/ema_adapter.safetensors``) is built
as ``AnyFlowFARTransformer3DModel`` with the adapter's ``chunk_partition``, merged and saved as an
``AnyFlowFARPipeline`` directory; the manifest records ``architecture: far`` and ``chunk_partition``. Instead of
``onnx/transformer.onnx`` the transformer is exported as per-chunk graphs with the KV cache as tensors
(``onnx/far/``, :func:`anyflow.export.far_onnx.export_far`), and the streaming VAE encoder
``onnx/vae_encoder_*.onnx`` for I2V/V2V contexts (:mod:`anyflow.export.far_release`). Its generation checks (4 steps per chunk): the
release as saved, reloaded by the torch runtime, against ``far_generate`` on the in-memory merged model, and
ONNX Runtime against that torch runtime (``parity.far_onnx_generate_4step``, within export.atol/rtol).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from anyflow.config import Config
from anyflow.stages.common import ADAPTER_FILE, StagePaths, resolve_adapter, teacher_dir
from anyflow.utils.io import write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
ADAPTER = "student"
PROBE_PROMPTS = ("a red circle moving left", "a blue square moving up")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default="auto",
                   help="student adapter: auto (stage2 if present, else stage1), stage2, stage1, or a .safetensors path")
    p.add_argument("--teacher", default=None, help="teacher WanPipeline directory (default: from the profile)")
    p.add_argument("--out", default=None,
                   help="release directory (default: <paths.root>/release); the metrics file follows its name: "
                        "release → metrics/export.json, release_domain → metrics/export_domain.json")
    p.add_argument("--gate", default=None,
                   help="gate report copied into the manifest (default: <paths.root>/gate/report.json, else "
                        "metrics/gate.json — the stage-2 gate); its verdict fails when it judged another adapter")


@dataclass(frozen=True)
class ExportOutputs:
    release: Path
    manifest: Path
    metrics: Path


# ------------------------------------------------------------------------------------------------ inputs
def load_teacher_pipeline(root: Path):
    """The teacher as a ``WanPipeline`` (the toy teacher is saved exactly like Wan2.1, DESIGN §4), offline."""
    from anyflow.models.teacher import declare_vae_scale_factors, load_teacher

    pipe = load_teacher(root)
    declare_vae_scale_factors(pipe.vae)  # the release's VAE config names its strides, even from an older teacher
    return pipe


def student_with_adapter(teacher_transformer, cfg: Config, adapter_path: Path, scfg=None):
    """``AnyFlowTransformer3DModel`` from the teacher (delta_embedder = copy of time_embedder) + adapter
    ``student`` loaded from ``adapter_path`` (a peft state dict without adapter names; keys must match).
    ``scfg``: the student section to build (default ``cfg.student``; a FAR adapter: :func:`far_student`)."""
    from anyflow.models.student import load_student

    model = load_student(teacher_transformer, scfg or cfg.student, adapter_path, ADAPTER)
    model.set_adapter(ADAPTER)
    return model


def merge_adapter(model, adapter: str = ADAPTER):
    """Fold ``W ← W + (α/r)·B·A`` into the base weights and drop the LoRA layers: peft ``merge_and_unload`` for a
    ``PeftModel`` wrapper, diffusers ``fuse_lora`` + ``unload_lora`` for adapters added with ``add_adapter``."""
    from anyflow.models.student import unwrap_full_modules

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload(adapter_names=[adapter])
    else:
        model.fuse_lora(adapter_names=[adapter])
        model.unload_lora()
        unwrap_full_modules(model, adapter)  # FAR: the adapter's far_patch_embedding replaces the base one
    leftover = [n for n, _ in model.named_parameters() if "lora_" in n or ".modules_to_save." in n]
    if leftover:
        raise RuntimeError(f"merge left LoRA parameters behind: {leftover[:3]}")
    return model


def far_student(cfg: Config, adapter_path: Path):
    """``cfg.student`` for a FAR adapter: ``architecture: far`` and the ``chunk_partition`` (and
    ``full_chunk_limit``) it was trained with (adapter metadata, else ``student.*``)."""
    from dataclasses import replace

    from anyflow.models.student import adapter_metadata

    metadata = adapter_metadata(adapter_path)
    meta = metadata.get("chunk_partition")
    try:
        partition = tuple(int(c) for c in meta.split(",")) if meta else tuple(cfg.student.chunk_partition)
        limit = int(metadata.get("full_chunk_limit", cfg.student.full_chunk_limit))
    except ValueError:
        raise ValueError(f"{adapter_path}: metadata chunk_partition {meta!r} / full_chunk_limit "
                         f"{metadata.get('full_chunk_limit')!r} are not integers") from None
    return replace(cfg.student, architecture="far", chunk_partition=partition, full_chunk_limit=limit)


def far_probe(model, p: dict) -> "torch.Tensor":
    """A FAR student's output on a probe (:func:`probe_inputs`; one (t, r) per sample over every chunk) through
    the chunk-causal rollout forward (:func:`anyflow.models.far.far_velocity`), in the probe's (B, F, C, h, w)."""
    from anyflow.models.far import far_velocity

    z = p["latents"].permute(0, 2, 1, 3, 4)
    return far_velocity(model, z, p["t"][:, 0] / 1000, p["r"][:, 0] / 1000, p["text_embeds"]).permute(0, 2, 1, 3, 4)


def latent_shape(cfg: Config, vae, in_channels: int) -> tuple[int, int, int, int]:
    """(C, F', h, w) from the VAE *architecture*: temporal factor 2^Σtemperal_downsample, spatial 2^(levels−1)."""
    c = vae.config
    tf = 2 ** sum(bool(x) for x in c.temperal_downsample)
    sf = 2 ** (len(c.dim_mult) - 1)
    v = cfg.video
    return (in_channels, (v.num_frames - 1) // tf + 1, v.height // sf, v.width // sf)


def probe_inputs(shape: tuple, text: "torch.Tensor", t: float, r: float, shift: float, seed: int = 0) -> dict:
    """Random latents (B, F, C, h, w) at τ = t → r as model timesteps 1000·shift(τ), per frame."""
    import torch

    b = text.shape[0]
    c, f, h, w = shape
    g = torch.Generator().manual_seed(seed)
    sh = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731  DESIGN §2
    return {"latents": torch.randn(b, f, c, h, w, generator=g), "t": torch.full((b, f), 1000 * sh(t)),
            "r": torch.full((b, f), 1000 * sh(r)), "text_embeds": text}


# ------------------------------------------------------------------------------------------------ the stage
def metrics_name(release: Path) -> str:
    """The metrics file stem for a release directory, so two exports never share an output: ``release`` →
    ``export``, ``release_domain`` → ``export_domain``, any other name ``x`` → ``export_x``."""
    name = Path(release).name
    return "export" + (name[len("release"):] if name.startswith("release") else f"_{name}")


def gate_verdict(candidates: list[Path], adapter_path: Path) -> dict:
    """The gate summary for the manifest (:func:`anyflow.export.manifest.gate_summary` of the first existing report),
    failed when the report names the adapter it judged (``candidate.adapter``) and that is not ``adapter_path``:
    a verdict on one student must not ship another (e.g. the domain-adapted adapter under the stage-2 gate)."""
    from anyflow.export import manifest as mf

    gate = mf.gate_summary(candidates)
    cand = gate.get("candidate")
    judged = cand.get("adapter") if isinstance(cand, dict) else None
    if isinstance(judged, str) and Path(judged).resolve() != Path(adapter_path).resolve():
        gate["passed"] = False
        gate["reason"] = (f"{gate['source']} judged adapter {judged}, not the exported adapter {adapter_path}; "
                          f"export with --gate <the report that judged {adapter_path}>")
        log.warning("gate verdict refused: %s", gate["reason"])
    return gate


def run(cfg: Config, adapter: str = "auto", teacher: Optional[str] = None, out: Optional[str] = None,
        gate: Optional[str] = None) -> ExportOutputs:
    """The whole stage (see the module docstring); gradients off inside, global torch state untouched. On CPU one
    intra-op thread, as every one-slot stage (the count is part of the merged weights' and parity numbers' bits,
    :func:`anyflow.stages.common.use_threads`; left at torch's default it followed the CPUs the process could use)."""
    import torch

    from anyflow.stages.common import use_threads

    before = use_threads(1) if not torch.cuda.is_available() else None
    try:
        with torch.no_grad():
            return _run(cfg, adapter, teacher, out, gate)
    finally:
        if before is not None:
            torch.set_num_threads(before)


def _run(cfg: Config, adapter: str, teacher: Optional[str], out: Optional[str],
         gate_report: Optional[str] = None) -> ExportOutputs:
    import torch
    from diffusers import AnyFlowFARPipeline, AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    from anyflow.export import far_release as fr
    from anyflow.export import manifest as mf
    from anyflow.export import model_card as mc
    from anyflow.export import onnx_export as ox
    from anyflow.export.runtime import OnnxBackend, ReleaseInfo, TorchBackend, generate
    from anyflow.stages.gate import architecture_of
    from anyflow.utils.io import atomic_dir

    paths = StagePaths.of(cfg)
    release = Path(out) if out else paths.release
    adapter_path = resolve_adapter(paths, adapter)
    far = architecture_of(adapter_path) == "far"
    scfg = far_student(cfg, adapter_path) if far else None
    seconds: dict[str, float] = {}
    parity: dict[str, dict] = {}
    quality: dict[str, dict] = {}
    tic = time.perf_counter()

    teacher_root = teacher_dir(cfg, paths, teacher)
    teacher_pipe = load_teacher_pipeline(teacher_root)
    model = student_with_adapter(teacher_pipe.transformer, cfg, adapter_path, scfg)
    shape = latent_shape(cfg, teacher_pipe.vae, model.config.in_channels)
    if far and sum(scfg.chunk_partition) != shape[1]:
        raise ValueError(f"{adapter_path}: chunk_partition {list(scfg.chunk_partition)} sums to "
                         f"{sum(scfg.chunk_partition)}, video.num_frames gives {shape[1]} latent frames")
    tok = teacher_pipe.tokenizer
    from anyflow.export.runtime import tokenize

    ids, mask = tokenize(tok, PROBE_PROMPTS, cfg.model.max_text_len)
    text = ox.TextEncoderGraph(teacher_pipe.text_encoder)(ids, mask)

    # 1. merge, and check the merged model equals the adapter model at every check pair
    probes = [probe_inputs(shape, text, t, r, cfg.model.flow_shift, seed=i)
              for i, (t, r) in enumerate(cfg.export.check_pairs)]
    forward = (lambda m, p: far_probe(m, p)) if far else (lambda m, p: ox.FlowMapGraph(m)(**p))
    before = [forward(model, p) for p in probes]
    merged = merge_adapter(model)
    merge_diff = max(float((forward(merged, p) - b).abs().max()) for p, b in zip(probes, before))
    parity["merge"] = {"max_abs": merge_diff, "ref_scale": max(float(b.abs().max()) for b in before)}
    if merge_diff > cfg.export.atol:
        raise RuntimeError(f"merged model differs from the adapter model by {merge_diff:.2e} > export.atol")
    seconds["load_merge"] = time.perf_counter() - tic

    pipe = (AnyFlowFARPipeline if far else AnyFlowPipeline)(tokenizer=tok, text_encoder=teacher_pipe.text_encoder, transformer=merged,
                           vae=teacher_pipe.vae, scheduler=FlowMapEulerDiscreteScheduler(shift=cfg.model.flow_shift))
    with atomic_dir(release) as tmp:
        t0 = time.perf_counter()
        pipe.save_pretrained(str(tmp / "pipeline"), safe_serialization=True)
        seconds["save_pipeline"] = time.perf_counter() - t0

        # 2. ONNX graphs, each checked
        onnx_dir = tmp / "onnx"
        t0 = time.perf_counter()
        if "transformer" in cfg.export.components and not far:  # FAR: anyflow/export/far_onnx.py (not here)
            path = ox.export_transformer(merged, onnx_dir / "transformer.onnx", probes[0], cfg.export.opset)
            ox.check_onnx(path)
            sess = ox.session(path)
            graph = ox.FlowMapGraph(merged)
            parity["transformer"] = {f"t={t},r={r}": ox.parity(path, graph, p, sess).as_dict()
                                     for (t, r), p in zip(cfg.export.check_pairs, probes)}
            single = {k: v[:1] for k, v in probes[1].items()}  # dynamic batch: B = 1 as well as B = 2
            parity["transformer"]["batch=1"] = ox.parity(path, graph, single, sess).as_dict()
        seconds["onnx_transformer"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if "text_encoder" in cfg.export.components:
            path = ox.export_text_encoder(teacher_pipe.text_encoder, onnx_dir / "text_encoder.onnx",
                                          {"input_ids": ids, "attention_mask": mask}, cfg.export.opset)
            ox.check_onnx(path)
            parity["text_encoder"] = ox.parity(path, ox.TextEncoderGraph(teacher_pipe.text_encoder),
                                               {"input_ids": ids, "attention_mask": mask}).as_dict()
        seconds["onnx_text_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if "vae_decoder" in cfg.export.components:
            z = torch.randn((1, *shape), generator=torch.Generator().manual_seed(7))
            for path in ox.export_vae_decoder(teacher_pipe.vae, onnx_dir, {"latents": z}, cfg.export.opset):
                ox.check_onnx(path)
            parity["vae_decoder"] = ox.decoder_parity(onnx_dir, teacher_pipe.vae, z).as_dict()
        seconds["onnx_vae_decoder"] = time.perf_counter() - t0
        if far:  # the transformer as per-chunk graphs (onnx/far/), the VAE encoder per context length
            t0 = time.perf_counter()
            parity.update(fr.export_far_graphs(merged, teacher_pipe.vae, onnx_dir, shape, text, scfg.chunk_partition,
                                               cfg.export.components, cfg.export.opset,
                                               (cfg.video.height, cfg.video.width)))
            seconds["onnx_far"] = time.perf_counter() - t0

        runtime = {"flow_shift": cfg.model.flow_shift, "max_text_len": cfg.model.max_text_len,
                   "latent_shape": list(shape), "fps": cfg.video.fps,
                   "video": {"num_frames": cfg.video.num_frames, "height": cfg.video.height,
                             "width": cfg.video.width},
                   "transformer_inputs": {"latents": "B,F,C,H,W float32", "t": "B,F float32 (1000*shift(tau))",
                                          "r": "B,F float32 (1000*shift(tau))", "text_embeds": "B,L,D float32"},
                   "vae_decoder": "streaming: vae_decoder_first (latent frame 0) then vae_decoder_step per latent "
                                  "frame with its causal-conv caches; batch 1, any frame count"}
        if far:
            runtime.update(fr.far_runtime_block(scfg, merged, teacher_pipe.vae))
        mf.write_manifest(tmp, {"files": [], "gate": {"passed": False},
                                "runtime": runtime})  # provisional: lets the runtime read shapes for the check

        # 3. a full 4-step generation: ONNX Runtime vs torch
        if far:  # the saved diffusers dir, reloaded by the runtime, samples what the merged model samples
            t0 = time.perf_counter()
            parity["far_generate_4step"], ref = fr.far_reload_check(tmp, merged, tok, PROBE_PROMPTS,
                                                                    cfg.model.flow_shift)
            got = None
            if set(cfg.export.components) >= {"transformer", "text_encoder", "vae_decoder"}:  # and on ORT
                parity["far_onnx_generate_4step"], got = fr.far_onnx_check(tmp, ref, tok, PROBE_PROMPTS)
            if cfg.model.source == "toy":
                quality["generate_4step"] = (rate_alike(ref.frames, got.frames, PROBE_PROMPTS) if got is not None
                                             else {"torch": rate(ref.frames, PROBE_PROMPTS)})
            seconds["generate_check"] = time.perf_counter() - t0
        elif set(cfg.export.components) >= {"transformer", "text_encoder", "vae_decoder"}:
            t0 = time.perf_counter()
            info = ReleaseInfo.read(tmp)
            ref = generate(TorchBackend(pipe), info, PROBE_PROMPTS, 4, seed=0, tokenizer=tok)
            got = generate(OnnxBackend(tmp), info, PROBE_PROMPTS, 4, seed=0, tokenizer=tok)
            parity["generate_4step"] = {
                "latents": ox.compare(got.latents.numpy(), ref.latents.numpy()).as_dict(),
                "video": ox.compare(got.video.numpy(), ref.video.numpy()).as_dict(),
                "frames_max_uint8_diff": int(abs(got.frames.astype(int) - ref.frames.astype(int)).max()),
            }
            if cfg.model.source == "toy":  # the [D] scorers know the toy prompts: rate both videos alike?
                quality["generate_4step"] = rate_alike(ref.frames, got.frames, PROBE_PROMPTS)
            seconds["generate_check"] = time.perf_counter() - t0
        _check_parity(parity, cfg.export.atol, cfg.export.rtol)
        if quality:
            parity["scores"] = quality

        # 4. manifest (last: it hashes everything above)
        reports = [Path(gate_report)] if gate_report else [paths.gate / "report.json", paths.metric("gate")]
        gate = gate_verdict(reports, adapter_path)
        mc.write_card(tmp / "pipeline", mc.release_card(  # the stock call, base model and gate verdict (README.md)
            cfg, release / "pipeline", gate=gate, base_model=mc.base_model_name(cfg, teacher_root),
            vae=teacher_pipe.vae, transformer=merged, release=release))
        extra = {"runtime": runtime, "adapter": str(adapter_path), "components": list(cfg.export.components)}
        if far:
            extra.update(architecture="far", chunk_partition=list(scfg.chunk_partition), notes=[fr.FAR_ONNX_NOTE],
                         components=list(cfg.export.components) + (["vae_encoder"] if "vae_encoder" in parity
                                                                   else []))
        manifest = mf.build_manifest(tmp, gate=gate, profile=cfg.profile, parity=parity, extra=extra)
        mf.write_manifest(tmp, manifest)
        mf.verify_release(tmp)
    seconds["total"] = time.perf_counter() - tic
    metrics = {"seconds": seconds, "parity": parity, "gate_passed": manifest["gate"]["passed"],
               "adapter": str(adapter_path),
               "bytes": {e["path"]: e["size"] for e in manifest["files"] if e["path"].endswith((".onnx", ".safetensors"))}}
    metrics_path = write_json(paths.metric(metrics_name(release)), metrics)
    log.info("release %s: %d files, gate passed=%s, %.1f s", release, len(manifest["files"]),
             manifest["gate"]["passed"], seconds["total"])
    return ExportOutputs(release, release / mf.MANIFEST, metrics_path)


def rate(frames, prompts) -> dict:
    """The gate's VBench-style scores (:mod:`anyflow.eval.vbench_like`) of uint8 videos of toy ``prompts``: Total
    and every dimension."""
    from anyflow.data import toy
    from anyflow.eval import vbench_like

    dims = vbench_like.score_videos(list(frames), [toy.parse_prompt(p) for p in prompts])["dimensions"]
    return {"total": vbench_like.aggregate(dims)["total"], "dimensions": dims}


def rate_alike(torch_frames, ort_frames, prompts) -> dict:
    """The gate's VBench-style scores (:mod:`anyflow.eval.vbench_like`) of the torch and the ONNX Runtime videos
    of the same prompts and noise: Total, every dimension, and the largest per-dimension difference."""
    from anyflow.data import toy
    from anyflow.eval import vbench_like

    specs = [toy.parse_prompt(p) for p in prompts]
    out = {}
    for name, frames in (("torch", torch_frames), ("onnxruntime", ort_frames)):
        dims = vbench_like.score_videos(list(frames), specs)["dimensions"]
        out[name] = {"total": vbench_like.aggregate(dims)["total"], "dimensions": dims}
    out["max_dimension_diff"] = max(abs(out["torch"]["dimensions"][k] - out["onnxruntime"]["dimensions"][k])
                                    for k in out["torch"]["dimensions"])
    out["total_diff"] = abs(out["torch"]["total"] - out["onnxruntime"]["total"])
    return out


def _check_parity(parity: dict, atol: float, rtol: float) -> None:
    """Every recorded ONNX-vs-torch error within ``atol + rtol·max|ref|``; else an error naming the check."""
    def walk(node, where):
        if isinstance(node, dict) and "max_abs" in node and "ref_scale" in node:
            if node["max_abs"] > atol + rtol * node["ref_scale"]:
                raise RuntimeError(f"parity {where}: max abs error {node['max_abs']:.2e} exceeds "
                                   f"export.atol + export.rtol·{node['ref_scale']:.2f}")
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else k)

    walk({k: v for k, v in parity.items() if k != "merge"}, "")


def main(cfg: Config, args) -> int:
    out = run(cfg, adapter=getattr(args, "adapter", "auto"), teacher=getattr(args, "teacher", None),
              out=getattr(args, "out", None), gate=getattr(args, "gate", None))
    print(f"release: {out.release}\nmanifest: {out.manifest}\nmetrics: {out.metrics}")
    return 0
