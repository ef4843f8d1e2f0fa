"""Stock interop ([K] item 1, DESIGN §4): every pipeline directory we write — the toy teacher, the root and the
domain release, the FAR release — generates through its *stock* diffusers class (``WanPipeline``,
``AnyFlowPipeline``, ``AnyFlowFARPipeline``), called with prompt, size, frame count, steps, a generator and the
arguments its model card (``README.md``) names, the same video as anyflow: uint8 frames within 1, same frame count and
size. The arguments are parsed from the card, so the card is what is tested.

The directories are written by the project's own writers (``toy_teacher.save`` with ``model_card.teacher_card`` as
``anyflow teacher`` does, ``anyflow export``) from a random toy teacher (``toy_teacher.build``: toy geometry, VAE
strides 2 / 4) and random non-zero student LoRAs. The releases are exported from a copy of that teacher whose VAE
config lacks ``scale_factor_*`` (a teacher saved before they were declared): the release must declare them anyway.
ONNX export is skipped (``export.components: []``; ONNX parity has its own tests)."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

PROMPT = "a blue square moving up"  # not the card's example prompt: the card's arguments hold for any prompt
SEED = 5


def to_uint8(frames) -> np.ndarray:
    """The pipelines' ``output_type="np"`` video (floats in [0, 1]) as uint8, rounded as anyflow's frames are."""
    return (np.asarray(frames, dtype=np.float64) * 255).round().astype(np.uint8)


def read_card(directory):
    from anyflow.export import model_card

    path = directory / "README.md"
    assert path.is_file(), f"{path}: no model card"
    text = path.read_text()
    return text, model_card.front_matter(text), model_card.call_arguments(text)


def stock_call(pipe, args: dict, prompt: str, seed: int, **override) -> np.ndarray:
    """The stock pipeline called with the card's arguments (its own prompt and seed), uint8 (B, F, H, W, 3)."""
    kw = {k: v for k, v in args.items() if k not in ("prompt", "generator", "output_type")} | override
    pipe.set_progress_bar_config(disable=True)
    return to_uint8(pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).frames)


def assert_same_video(stock: np.ndarray, ours: np.ndarray, cfg) -> None:
    v = cfg.video
    assert stock.shape == ours.shape == (1, v.num_frames, v.height, v.width, 3)
    assert np.abs(stock.astype(int) - ours.astype(int)).max() <= 1
    assert ours.std() > 5, "a flat video would make the comparison vacuous"


def assert_card_names_geometry(front, args, cfg) -> None:
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-video"
    v = cfg.video
    assert (args["height"], args["width"], args["num_frames"]) == (v.height, v.width, v.num_frames)
    assert args["max_sequence_length"] == cfg.model.max_text_len


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(cfg, root): a random toy teacher saved by the project's writer with its card at <root>/artifacts/teacher, and
    <root>/legacy_teacher, the same directory with the VAE's scale_factor_* keys removed."""
    from anyflow.config import build
    from anyflow.export import model_card
    from anyflow.models import toy_teacher

    root = tmp_path_factory.mktemp("interop")
    cfg = build({"paths": {"root": str(root / "artifacts"), "metrics": str(root / "metrics"),
                           "plots": str(root / "plots"), "checkpoints": str(root / "ckpt")}})
    cfg = replace(cfg, export=replace(cfg.export, components=()))
    teacher = toy_teacher.build(cfg, seed=0)
    with torch.no_grad():  # random but not degenerate: a visible velocity field
        teacher.transformer.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    path = root / "artifacts" / "teacher"
    toy_teacher.save(teacher, path, card=model_card.teacher_card(cfg, path, teacher.vae, teacher.transformer))
    legacy = root / "legacy_teacher"
    shutil.copytree(path, legacy)
    vae_config = json.loads((legacy / "vae" / "config.json").read_text())
    for key in ("scale_factor_temporal", "scale_factor_spatial"):
        vae_config.pop(key)
    (legacy / "vae" / "config.json").write_text(json.dumps(vae_config))
    return cfg, root


def export_release(cfg, root, name: str, gate_report: dict, far: bool = False, seed: int = 1):
    """``anyflow export`` of a random non-zero LoRA (FAR: metadata architecture far) from the legacy teacher under
    ``gate_report`` (its ``candidate.adapter`` set to this adapter); returns the release directory."""
    from anyflow.models.student import add_lora, save_adapter, student_from_teacher
    from anyflow.models.teacher import load_teacher
    from anyflow.stages.export import ADAPTER, run

    teacher = load_teacher(root / "legacy_teacher")
    scfg = replace(cfg.student, architecture="far") if far else cfg.student
    model = student_from_teacher(teacher.transformer, scfg)
    add_lora(model, scfg, ADAPTER)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    meta = {"architecture": "far", "chunk_partition": ",".join(map(str, scfg.chunk_partition)),
            "paradigm": "flowmap"} if far else None
    adapter = save_adapter(model, root / name / "ema_adapter.safetensors", ADAPTER, metadata=meta)
    report = root / name / "report.json"
    report.write_text(json.dumps({**gate_report, "candidate": {**gate_report.get("candidate", {}),
                                                               "adapter": str(adapter)}}))
    out = run(cfg, adapter=str(adapter), teacher=str(root / "legacy_teacher"), out=str(root / f"release_{name}"),
              gate=str(report))
    return out.release


def anyflow_generate(release, steps: int, prompt: str = PROMPT, seed: int = SEED):
    """What ``anyflow generate --release R --backend torch --steps N --seed S --prompt P`` samples and decodes."""
    from anyflow.export.runtime import ReleaseInfo, TorchBackend, generate

    return generate(TorchBackend.from_release(release), ReleaseInfo.read(release), [prompt], steps, seed)


def card_row(text: str, label: str) -> list[str]:
    """The cells of the gate table row ``label``."""
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


GATE = {"passed": True, "failed": [],
        "candidate": {"paradigm": "flowmap", "by_nfe": {"1": {"total": 0.695}, "2": {"total": 0.813},
                                                        "4": {"total": 0.832}}},
        "teacher": {"total": 0.787, "nfe": 100}, "baselines": {}}


def test_teacher_directory_in_stock_wan_pipeline(workspace):
    """WanPipeline on the teacher directory with its card's arguments = anyflow's teacher ODE sampler (the grid
    shift(1 − i/N), CFG, the card's text window and negative prompt), decoded: uint8 within 1; the pipeline's default
    text window gives another video."""
    from diffusers import WanPipeline

    from anyflow.export.runtime import to_frames
    from anyflow.models.teacher import (decode_latents, encode_prompts, latent_shape, load_teacher, negative_embeds,
                                        teacher_ode_sample)

    cfg, root = workspace
    path = root / "artifacts" / "teacher"
    text, front, args = read_card(path)
    assert_card_names_geometry(front, args, cfg)
    assert "wan" in front["tags"]
    assert (args["num_inference_steps"], args["guidance_scale"]) == (cfg.teacher.eval_steps,
                                                                     cfg.teacher.guidance_scale)
    assert args["negative_prompt"] == cfg.synthesize.negative_prompt
    vae = json.loads((path / "vae" / "config.json").read_text())
    assert (vae["scale_factor_temporal"], vae["scale_factor_spatial"]) == (2, 4)

    pipe = load_teacher(path)
    emb = encode_prompts(pipe, [PROMPT], cfg.model.max_text_len)
    neg = negative_embeds(pipe, args["negative_prompt"], cfg.model.max_text_len)
    noise = torch.randn((1, *latent_shape(pipe, cfg)), generator=torch.Generator().manual_seed(SEED))
    stock = WanPipeline.from_pretrained(str(path))
    # the card: any steps (its example: the teacher's 50 evaluation steps). 8 and 4 keep the test fast; at 4 another
    # grid (FlowMatchEulerDiscreteScheduler's) is off by ~8 uint8 levels, at 50 by ~1
    for steps in (8, 4):
        x0 = teacher_ode_sample(pipe.transformer, noise, emb, neg, steps, args["guidance_scale"], cfg.model.flow_shift)
        ours = to_frames(decode_latents(pipe, x0))
        assert_same_video(stock_call(stock, args, PROMPT, SEED, num_inference_steps=steps), ours, cfg)
    # why the card names the window: zero-padded text positions are not zero after the text embedder, so the
    # pipeline's default window (512) is another condition
    with torch.no_grad():
        dim = stock.transformer.config.text_dim
        assert stock.transformer.condition_embedder.text_embedder(torch.zeros(1, 1, dim)).abs().max() > 1e-3
    default = stock_call(stock, {k: v for k, v in args.items() if k != "max_sequence_length"}, PROMPT, SEED,
                         num_inference_steps=4)
    assert np.abs(default.astype(int) - ours.astype(int)).max() > 1


def test_root_release_in_stock_anyflow_pipeline(workspace):
    """AnyFlowPipeline on release/pipeline with its card's arguments = ``anyflow generate --backend torch``, at the
    card's steps and at another N; the card names the base model and the gate verdict with its per-NFE Totals."""
    from diffusers import AnyFlowPipeline

    cfg, root = workspace
    release = export_release(cfg, root, "root", GATE)
    text, front, args = read_card(release / "pipeline")
    assert_card_names_geometry(front, args, cfg)
    assert front["base_model"] == str(root / "legacy_teacher")
    assert args["guidance_scale"] == 1.0 and args["num_inference_steps"] == 4
    assert "Verdict: **PASSED**" in text
    assert card_row(text, "candidate (this release)") == ["0.695", "0.813", "0.832"]
    assert "Total of the teacher (100 NFE): 0.787." in text

    stock = AnyFlowPipeline.from_pretrained(str(release / "pipeline"))
    assert (stock.vae_scale_factor_temporal, stock.vae_scale_factor_spatial) == (2, 4)
    for steps in (args["num_inference_steps"], 2):
        ours = anyflow_generate(release, steps)
        assert_same_video(stock_call(stock, args, PROMPT, SEED, num_inference_steps=steps), ours.frames, cfg)


def test_domain_release_in_stock_anyflow_pipeline(workspace):
    """The domain release (same writer, another adapter, the domain gate's report — here a failing one): stock
    AnyFlowPipeline = ``anyflow generate``; the card carries the domain gate's verdict and both domains' Totals."""
    from diffusers import AnyFlowPipeline

    cfg, root = workspace
    by = lambda *t: {"by_nfe": {n: {"total": x} for n, x in zip(("1", "4"), t)}}  # noqa: E731
    report = {"passed": False, "failed": ["domain_semantic@4"], "candidate": {"paradigm": "flowmap"},
              "domain": {"driving": by(0.733, 0.792), "shapes": by(0.715, 0.831)},
              "base": {"driving": by(0.732, 0.794), "shapes": by(0.695, 0.832)},
              "teacher": {"driving": {"total": 0.77}, "shapes": {"total": 0.787}}}
    release = export_release(cfg, root, "domain", report, seed=2)
    text, front, args = read_card(release / "pipeline")
    assert_card_names_geometry(front, args, cfg)
    assert "domain:driving" in front["tags"]
    assert "Verdict: **FAILED**" in text and "`domain_semantic@4`" in text
    assert card_row(text, "driving: domain student (this release)") == ["0.733", "0.792"]
    assert card_row(text, "shapes: base student") == ["0.695", "0.832"]

    stock = AnyFlowPipeline.from_pretrained(str(release / "pipeline"))
    assert_same_video(stock_call(stock, args, PROMPT, SEED), anyflow_generate(release, 4).frames, cfg)


@pytest.mark.slow
def test_far_release_in_stock_anyflow_far_pipeline(workspace):
    """AnyFlowFARPipeline on the FAR release's pipeline/ with its card's arguments (chunk_partition) and the card's
    attention line = ``anyflow generate`` (chunk by chunk, KV cache). Without that line diffusers 0.42.1's cached read
    attends to unmasked zero padding (the card says so): still the right frame count and size."""
    from diffusers import AnyFlowFARPipeline

    from anyflow.export.model_card import FAR_ATTENTION_LINE
    from anyflow.models.far import set_far_attention

    cfg, root = workspace
    release = export_release(cfg, root, "far", GATE, far=True, seed=3)
    text, front, args = read_card(release / "pipeline")
    assert_card_names_geometry(front, args, cfg)
    assert args["chunk_partition"] == list(cfg.student.chunk_partition)
    assert "far" in front["tags"] and "Verdict: **PASSED**" in text
    assert FAR_ATTENTION_LINE in text

    stock = AnyFlowFARPipeline.from_pretrained(str(release / "pipeline"))
    plain = stock_call(stock, args, PROMPT, SEED, num_inference_steps=1)  # diffusers' own processor, as shipped
    assert plain.shape == (1, cfg.video.num_frames, cfg.video.height, cfg.video.width, 3)
    set_far_attention(stock.transformer)  # the card's line
    assert_same_video(stock_call(stock, args, PROMPT, SEED), anyflow_generate(release, 4).frames, cfg)
