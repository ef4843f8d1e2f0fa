"""Model cards (``README.md``, as on the Hub) for every pipeline directory we write: the teacher (``WanPipeline``)
and the releases' ``pipeline/`` (``AnyFlowPipeline``, ``AnyFlowFARPipeline``). DESIGN §4: each directory runs in its
stock diffusers class, and its card names the call that generates what ``anyflow`` generates.

A card is YAML front matter (``library_name``, ``pipeline_tag``, ``base_model``, ``tags``) and a body whose first
``python`` block is the call; :func:`call_arguments` reads that call's keyword arguments back (the interop test
calls the stock class with exactly them, so the card is what is tested). A card is a pure function of its inputs
(no clock, no absolute path unless one is given), so a re-export writes the same bytes.

Why the arguments matter (diffusers 0.42.1):

* ``max_sequence_length``: the pipelines pad the prompt to this many tokens with zero embeddings, and the
  transformer's text embedder maps a zero row to a non-zero vector (its biases), which cross-attention then sees;
  the default window (512) is therefore another condition than the trained one (``model.max_text_len``).
* ``height`` / ``width`` / ``num_frames``: latents are sized with ``vae/config.json``'s ``scale_factor_temporal`` /
  ``scale_factor_spatial`` (declared from the VAE's strides, :func:`anyflow.models.teacher.declare_vae_scale_factors`).
* ``guidance_scale``: the teacher runs classifier-free guidance (two passes per step); a student has guidance fused
  (one pass, ``guidance_scale=1``).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

CARD = "README.md"
EXAMPLE_PROMPT = "a red circle moving left"
FAR_ATTENTION_LINE = "set_far_attention(pipe.transformer)"


# ------------------------------------------------------------------------------------------------ pieces
def _front_matter(base_model: Optional[str], tags: Sequence[str]) -> str:
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-video"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    return "\n".join(lines + ["---", ""])


def _py(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _call_block(cls: str, directory: str, kwargs: Mapping[str, Any], seed: int = 0,
                imports: Sequence[str] = (), extra_lines: Sequence[str] = ()) -> str:
    args = "".join(f"    {k}={_py(v)},\n" for k, v in kwargs.items())
    return (f"```python\nimport torch\nfrom diffusers import {cls}\n" + "".join(f"{line}\n" for line in imports) +
            f"\npipe = {cls}.from_pretrained({_py(directory)})\n" + "".join(f"{line}\n" for line in extra_lines) +
            f"video = pipe(\n    prompt={_py(EXAMPLE_PROMPT)},\n{args}"
            f"    generator=torch.Generator().manual_seed({seed}),\n    output_type=\"np\",\n).frames[0]"
            "  # (F, H, W, 3) floats in [0, 1]\n```\n")


def _size_notes(cfg, temporal: int, spatial: int, patch: int) -> str:
    v = cfg.video
    return (f"- `height`, `width`, `num_frames`: trained at {v.num_frames}×{v.height}×{v.width}. The VAE downsamples "
            f"by {temporal} in time and {spatial} in space (`vae/config.json`: `scale_factor_temporal: {temporal}`, "
            f"`scale_factor_spatial: {spatial}`) and the transformer patches by {patch}: height and width multiples "
            f"of {spatial * patch}, `num_frames = 1 + {temporal}·k`.\n"
            f"- `max_sequence_length={cfg.model.max_text_len}` (required): the text window the model was trained with "
            f"(`model.max_text_len`). The pipeline pads the prompt with zero embeddings to this length and the "
            "transformer's text embedder maps those zeros to a non-zero vector (its biases) that cross-attention "
            "sees, so the pipeline default (512 tokens) conditions on something else and gives another video.\n"
            "- `generator`: a CPU `torch.Generator`; the noise is drawn as (B, C, F, h, w) float32, the same draw as "
            "anyflow's for the same seed.\n")


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "–"


def nfe_totals(report: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """``[(row label, {nfe: Total})]`` from a gate report: the stage-2 / FAR gate (``candidate.by_nfe`` or, in
    ``metrics/gate.json``, ``candidate.total``; baselines likewise) or the domain gate (``domain`` / ``base``:
    ``{domain: {by_nfe}}``). The teacher's Total follows as ``{"teacher": total}``. Unknown shapes give []."""
    def series(entry) -> Optional[dict]:
        if not isinstance(entry, Mapping):
            return None
        if isinstance(entry.get("by_nfe"), Mapping):
            return {str(n): r.get("total") for n, r in entry["by_nfe"].items() if isinstance(r, Mapping)}
        if isinstance(entry.get("total"), Mapping):
            return {str(n): t for n, t in entry["total"].items()}
        return None

    rows: list[tuple[str, dict]] = []
    cand = series(report.get("candidate"))
    if cand:
        rows.append(("candidate (this release)", cand))
        for name, entry in (report.get("baselines") or {}).items():
            if series(entry):
                rows.append((f"baseline {name}", series(entry)))
        teacher = report.get("teacher")
        if isinstance(teacher, Mapping) and isinstance(teacher.get("total"), (int, float)):
            nfe = teacher.get("nfe")
            rows.append((f"the teacher{f' ({nfe} NFE)' if nfe else ''}", {"teacher": teacher["total"]}))
        return rows
    domains, bases = report.get("domain"), report.get("base")
    if isinstance(domains, Mapping) and isinstance(bases, Mapping):
        for dom in domains:
            if series(domains.get(dom)):
                rows.append((f"{dom}: domain student (this release)", series(domains[dom])))
            if series(bases.get(dom)):
                rows.append((f"{dom}: base student", series(bases[dom])))
        for dom, t in (report.get("teacher") or {}).items():
            if isinstance(t, Mapping) and isinstance(t.get("total"), (int, float)):
                rows.append((f"the teacher, {dom}", {"teacher": t["total"]}))
    return rows


def gate_section(gate: Mapping[str, Any]) -> str:
    """The gate verdict, failed criteria and the per-NFE Totals of the report the manifest copied."""
    verdict = "PASSED" if gate.get("passed") is True else "FAILED"
    out = [f"## Gate\n\nVerdict: **{verdict}**" + (f" (`{gate['source']}`)" if gate.get("source") else "") + "."]
    if gate.get("reason"):
        out.append(f"Reason: {gate['reason']}")
    if gate.get("failed"):
        out.append("Failed criteria: " + ", ".join(f"`{c}`" for c in gate["failed"]) + ".")
    rows = nfe_totals(gate)
    series = [(label, r) for label, r in rows if "teacher" not in r]
    nfes = sorted({n for _, r in series for n in r}, key=float)
    if series and nfes:
        head = "| Total (VBench-style) by NFE | " + " | ".join(nfes) + " |"
        out.append("\n".join([head, "| --- |" + " --- |" * len(nfes)] + [
            f"| {label} | " + " | ".join(_fmt(r.get(n)) for n in nfes) + " |" for label, r in series]))
    out += [f"Total of {label}: {_fmt(r['teacher'])}." for label, r in rows if "teacher" in r]
    return "\n\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ cards
def _geometry(vae, transformer) -> tuple[int, int, int]:
    from anyflow.models.teacher import vae_scale_factors

    temporal, spatial = vae_scale_factors(vae.config)
    return temporal, spatial, int(transformer.config.patch_size[1])


def teacher_card(cfg, directory: str | Path, vae, transformer) -> str:
    """The toy teacher's card: stock ``WanPipeline`` with the call that equals anyflow's teacher ODE sampler."""
    m, t = cfg.model, cfg.teacher
    temporal, spatial, patch = _geometry(vae, transformer)
    kwargs = {"negative_prompt": "", "height": cfg.video.height,
              "width": cfg.video.width, "num_frames": cfg.video.num_frames, "num_inference_steps": t.eval_steps,
              "guidance_scale": t.guidance_scale, "max_sequence_length": m.max_text_len}
    return (_front_matter(None, ["wan", "text-to-video", "anyflow", "toy"]) +
            "\n# Toy Wan teacher\n\n"
            "A tiny Wan2.1-architecture text-to-video model (`AutoencoderKLWan`, UMT5 text encoder with a byte "
            "tokenizer, `WanTransformer3DModel`) trained by `anyflow teacher` on the toy shapes domain; the teacher "
            "AnyFlow distils. A plain `WanPipeline` directory.\n\n## Usage\n\n" +
            _call_block("WanPipeline", str(directory), kwargs) +
            "\nThis is the video anyflow's own teacher sampler gives for the same prompt, seed, steps and guidance "
            "(`anyflow.models.teacher.teacher_ode_sample`, as `anyflow synthesize`, the gate and the teacher's "
            "held-out evaluation run it; uint8 frames within 1, tests/test_stock_interop.py).\n\n"
            "### Arguments\n\n" + _size_notes(cfg, temporal, spatial, patch) +
            f"- `num_inference_steps`, `guidance_scale`: any. The shipped scheduler is `FlowMapEulerDiscreteScheduler"
            f"(shift={m.flow_shift})`: Euler steps on the grid `shift(1 − i/N)`, i = 0..N, `shift(s) = k·s/(1 + "
            f"(k − 1)·s)`, k = {m.flow_shift}, with classifier-free guidance `u + w·(c − u)` — anyflow's teacher "
            f"sampler. (`FlowMatchEulerDiscreteScheduler` would sample another grid: at N = 4 it ends with a step "
            f"from σ = 0.024 instead of 0.625.) The example uses the teacher's evaluation setting "
            f"(`teacher.eval_steps`, `teacher.guidance_scale`); `anyflow synthesize` uses `synthesize.steps` × "
            f"`synthesize.guidance_scale`, the gate `gate.teacher_steps` × `gate.teacher_guidance_scale`.\n"
            "- `negative_prompt=\"\"`: the unconditional prompt of the teacher's evaluation (and the pipeline's "
            "default); `anyflow synthesize` and the gate use `synthesize.negative_prompt`.\n")


def release_card(cfg, directory: str | Path, *, gate: Mapping[str, Any], base_model: Optional[str], vae,
                 transformer, release: str | Path = "<release>") -> str:
    """A release's ``pipeline/`` card: stock ``AnyFlowPipeline`` (or ``AnyFlowFARPipeline``) with the call that equals
    ``anyflow generate --backend torch``, the teacher it was distilled from and the gate verdict with its Totals."""
    from anyflow.models.far import is_far

    far = is_far(transformer)
    chunk_partition = list(transformer.config.chunk_partition) if far else []
    temporal, spatial, patch = _geometry(vae, transformer)
    cls = "AnyFlowFARPipeline" if far else "AnyFlowPipeline"
    kwargs: dict[str, Any] = {"height": cfg.video.height, "width": cfg.video.width,
                              "num_frames": cfg.video.num_frames, "num_inference_steps": 4, "guidance_scale": 1.0,
                              "max_sequence_length": cfg.model.max_text_len}
    if far:
        kwargs["chunk_partition"] = list(chunk_partition)
    imports = ["from anyflow.models.far import set_far_attention  # see 'Attention' below"] if far else []
    extra = [FAR_ATTENTION_LINE] if far else []
    domain = [d for d in (gate.get("domain") or {})] if isinstance(gate.get("domain"), Mapping) else []
    tags = ["anyflow", "flow-map", "any-step", "text-to-video", "wan", "distillation"] + (
        ["far", "causal"] if far else []) + [f"domain:{d}" for d in domain]
    kind = "causal (AnyFlow-FAR, chunk by chunk with a KV cache)" if far else "bidirectional"
    body = [
        f"\n# AnyFlow any-step student ({'AnyFlow-FAR' if far else 'bidirectional'})\n",
        f"A {kind} any-step video student distilled with AnyFlow (on-policy flow-map distillation) from "
        f"`{base_model or 'the teacher'}`, LoRA merged into the transformer. Guidance is fused: one transformer "
        f"call per step{' per chunk' if far else ''}, any number of steps.\n",
        "## Usage\n",
        _call_block(cls, str(directory), kwargs, imports=imports, extra_lines=extra),
        f"\nThis is the video `anyflow generate --release {release} --backend torch --steps 4 --seed 0 --prompt "
        f"{_py(EXAMPLE_PROMPT)}` writes before mp4 encoding (uint8 frames within 1, tests/test_stock_interop.py).\n",
        "### Arguments\n",
        _size_notes(cfg, temporal, spatial, patch) +
        f"- `num_inference_steps`: any N ≥ 1{' per chunk' if far else ''} (the gate measured the NFEs in its "
        f"table below; `anyflow generate` defaults to 4). The scheduler is `FlowMapEulerDiscreteScheduler"
        f"(shift={cfg.model.flow_shift})`.\n"
        "- `guidance_scale=1.0`: guidance is distilled into the student; a larger value adds an unconditional "
        "pass the student was not trained for.\n" +
        (f"- `chunk_partition={list(chunk_partition)}`: latent frames per chunk (the transformer config's default; "
         f"sums to the {sum(chunk_partition)} latent frames of {cfg.video.num_frames} frames). Another `num_frames` "
         f"needs a partition summing to `(num_frames − 1)/{temporal} + 1`.\n" if far else ""),
    ]
    if far:
        body.append(
            "### Attention: what differs in stock diffusers 0.42.1\n\n"
            "`AnyFlowFARPipeline`'s default causal processor (`AnyFlowCausalAttnProcessor`, flex attention) pads "
            "query, keys and values with zeros to a multiple of 128 tokens when reading the KV cache and passes no "
            "mask, so the padded keys take softmax mass and every chunk's attention is diluted (on this model's "
            "small chunks most of the 128 are padding). Without the `set_far_attention` line the stock call still "
            "returns a video of the right size, but another one than `anyflow generate`. The line installs "
            "anyflow's `DenseFARAttnProcessor` (same KV-cache writes, keys exactly the cached + current tokens, "
            "SDPA), which is what every anyflow stage samples and what the gate measured; it equals full "
            "recomputation of the causal forward. No config key can select a processor, so the line is needed "
            "until diffusers masks the padding.\n")
    body.append(gate_section(gate))
    return _front_matter(base_model, tags) + "\n".join(body)


def base_model_name(cfg, teacher_root: str | Path) -> str:
    """The card's ``base_model``: a local Wan2.1 directory named as on the Hub → ``Wan-AI/<name>``; any other local
    directory → its name; the toy teacher → its directory as given (it exists nowhere else)."""
    if cfg.model.source == "local" and cfg.model.pretrained_dir:
        name = Path(cfg.model.pretrained_dir).name
        return f"Wan-AI/{name}" if re.match(r"Wan2\.[12]-", name) else name
    return str(teacher_root)


def write_card(directory: str | Path, text: str) -> Path:
    path = Path(directory) / CARD
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ reading
def front_matter(text: str) -> dict:
    """The card's YAML front matter as a dict."""
    import yaml

    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if not match:
        raise ValueError("model card: no YAML front matter")
    return yaml.safe_load(match.group(1)) or {}


def call_arguments(text: str) -> dict:
    """The literal keyword arguments of the ``pipe(...)`` call in the card's first ``python`` block (``prompt``,
    ``output_type`` and every other literal; ``generator`` as ``{"seed": n}``)."""
    match = re.search(r"```python\n(.*?)```", text, re.S)
    if not match:
        raise ValueError("model card: no python block")
    for node in ast.walk(ast.parse(match.group(1))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipe":
            out = {}
            for kw in node.keywords:
                if kw.arg == "generator":  # torch.Generator().manual_seed(n)
                    out["generator"] = {"seed": ast.literal_eval(kw.value.args[0])}
                else:
                    out[kw.arg] = ast.literal_eval(kw.value)
            return out
    raise ValueError("model card: the python block has no pipe(...) call")
