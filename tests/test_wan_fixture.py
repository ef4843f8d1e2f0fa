"""`anyflow fixture wan-mini`: the Wan2.1-T2V-1.3B-Diffusers layout with random weights, loaded by stock diffusers
and by our own teacher code at Wan's strides (4 in time, 8 in space), with a trained sentencepiece tokenizer, and
the same tensors for the same seed."""

import json

import pytest
import torch

from anyflow.models import wan_fixture

pytestmark = pytest.mark.slow  # each build is ~5-10 s on 2 shared cores

PROMPTS = ["A red car driving on the beach at sunset, camera pans left.", "an astronaut dancing in a kitchen"]


@pytest.fixture(scope="module")
def wan_mini(tmp_path_factory):
    """Written through the CLI (no params.yaml in the working directory: the command needs none)."""
    import os

    from anyflow.cli import main

    root = tmp_path_factory.mktemp("wan_mini")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["fixture", "wan-mini", "--out", str(root / "wan")]) == 0
    finally:
        os.chdir(cwd)
    return root / "wan"


def _tensors(root):
    from safetensors.torch import load_file

    return {f"{p.relative_to(root)}:{k}": v for p in sorted(root.rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def test_layout_and_classes_are_wans(wan_mini):
    index = json.loads((wan_mini / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert {k: index[k][1] for k in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")} == {
        "scheduler": "UniPCMultistepScheduler", "text_encoder": "UMT5EncoderModel", "tokenizer": "T5TokenizerFast",
        "transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan"}
    for f in ("scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
              "tokenizer/spiece.model", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
              "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "README.md"):
        assert (wan_mini / f).is_file(), f
    sched = json.loads((wan_mini / "scheduler/scheduler_config.json").read_text())
    assert {k: sched[k] for k in wan_fixture.WAN_SCHEDULER} == wan_fixture.WAN_SCHEDULER
    assert sched["prediction_type"] == "flow_prediction" and sched["use_flow_sigmas"] and sched["flow_shift"] == 3.0
    vae = json.loads((wan_mini / "vae/config.json").read_text())
    assert vae["temperal_downsample"] == [False, True, True] and vae["z_dim"] == 16
    assert (vae["scale_factor_temporal"], vae["scale_factor_spatial"]) == (4, 8)
    import inspect

    from diffusers import AutoencoderKLWan

    wan_defaults = inspect.signature(AutoencoderKLWan.__init__).parameters  # diffusers' defaults are Wan2.1's stats
    assert vae["latents_mean"] == wan_defaults["latents_mean"].default and vae["latents_mean"][0] == -0.7571
    assert vae["latents_std"] == wan_defaults["latents_std"].default and vae["latents_std"][0] == 2.8184
    tr = json.loads((wan_mini / "transformer/config.json").read_text())
    te = json.loads((wan_mini / "text_encoder/config.json").read_text())
    assert (tr["in_channels"], tr["out_channels"], tr["patch_size"]) == (16, 16, [1, 2, 2])
    assert tr["text_dim"] == te["d_model"] and te["feed_forward_proj"] == "gated-gelu" and te["model_type"] == "umt5"


def test_stock_wan_pipeline_generates_at_wans_strides(wan_mini):
    """num_frames 5 at 32×32 → 2 latent frames of 4×4 (strides 4 and 8), decoded back to 5 frames of 32×32; 9 frames
    at 32×48 → 3 latent frames of 4×6. The stock decode of the pipeline's latents equals our teacher's decode."""
    from diffusers import WanPipeline

    from anyflow.models.teacher import decode_latents

    pipe = WanPipeline.from_pretrained(str(wan_mini), local_files_only=True)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)
    kw = dict(num_inference_steps=2, max_sequence_length=32)
    z = pipe(PROMPTS[0], height=32, width=32, num_frames=5, output_type="latent",
             generator=torch.Generator().manual_seed(0), **kw).frames
    assert z.shape == (1, 16, 2, 4, 4)
    frames = pipe(PROMPTS[0], height=32, width=32, num_frames=5, output_type="pt",
                  generator=torch.Generator().manual_seed(0), **kw).frames  # (B, F, C, H, W) in [0, 1]
    assert frames.shape == (1, 5, 3, 32, 32)
    ours = (decode_latents(pipe, z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    assert torch.allclose(ours, frames, atol=1e-5)
    z9 = pipe(PROMPTS[1], height=32, width=48, num_frames=9, output_type="latent",
              generator=torch.Generator().manual_seed(1), **kw).frames
    assert z9.shape == (1, 16, 3, 4, 6)


def test_tokenizer_round_trips_and_matches_its_sentencepiece_model(wan_mini):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(wan_mini / "tokenizer"))
    assert type(tok).__name__ in ("T5TokenizerFast", "T5Tokenizer")  # one class in transformers 5
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    sp = spm.SentencePieceProcessor(model_file=str(wan_mini / "tokenizer/spiece.model"))
    for text in [*PROMPTS, "Zoom out: two people riding a bike in the desert, oil painting"]:
        ids = tok(text).input_ids
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert ids[:-1] == sp.encode(text)  # tokenizer.json is the sentencepiece model, piece for piece
    assert tok("ｆｕｌｌ width").input_ids == tok("full width").input_ids  # NFKC, as T5's spiece
    assert len(tok) <= json.loads((wan_mini / "text_encoder/config.json").read_text())["vocab_size"]
    batch = tok(PROMPTS, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 512) and (batch.input_ids[:, -1] == tok.pad_token_id).all()


def test_wan_profile_teacher_stage_and_loader(wan_mini, tmp_path):
    """`anyflow teacher` on the wan-1.3b profile (model.source: local) records the fixture; our loader then encodes
    512-token prompts, samples latents of Wan's shape and decodes them."""
    from anyflow.config import build
    from anyflow.models.teacher import (decode_latents, encode_prompts, latent_shape, load_teacher, negative_embeds,
                                        teacher_ode_sample)
    from anyflow.stages import teacher as teacher_stage
    from anyflow.utils.io import read_json

    cfg = build({"model": {"pretrained_dir": str(wan_mini)}, "video": {"num_frames": 5, "height": 32, "width": 32},
                 "paths": {"root": str(tmp_path / "artifacts"), "metrics": str(tmp_path / "metrics")}},
                profile="wan-1.3b")
    assert cfg.model.source == "local" and cfg.model.max_text_len == 512
    assert teacher_stage.main(cfg, None) == 0
    record = read_json(tmp_path / "artifacts/teacher/teacher.json")
    assert record["pretrained_dir"] == str(wan_mini.resolve()) and len(record["sha256_tree"]) == 64
    pipe = load_teacher(record["pretrained_dir"])
    emb = encode_prompts(pipe, PROMPTS, cfg.model.max_text_len)
    assert emb.shape == (2, 512, pipe.text_encoder.config.d_model)
    n_tok = len(pipe.tokenizer(PROMPTS[1]).input_ids)
    assert emb[1, n_tok:].abs().max() == 0 and emb[1, :n_tok].abs().min() > 0  # padding zeroed, as WanPipeline
    shape = latent_shape(pipe, cfg)
    assert shape == (16, 2, 4, 4)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    x0 = teacher_ode_sample(pipe.transformer, noise, emb[:1], negative_embeds(pipe, "", 512), steps=2,
                            guidance_scale=5.0, shift=cfg.model.flow_shift)
    video = decode_latents(pipe, x0)
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()


def test_same_seed_same_tensors(wan_mini, tmp_path):
    again = wan_fixture.write(tmp_path / "again", seed=0)
    a, b = _tensors(wan_mini), _tensors(again)
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("tokenizer/spiece.model", "tokenizer/tokenizer.json", "model_index.json", "vae/config.json",
              "transformer/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        assert (wan_mini / f).read_bytes() == (again / f).read_bytes(), f
    other, _ = wan_fixture.build(seed=1)
    assert not torch.equal(other.transformer.proj_out.weight, b["transformer/diffusion_pytorch_model.safetensors:"
                                                                "proj_out.weight"])


def test_gate_scores_a_wan_student_on_a_prompt_file(wan_mini, tmp_path):
    """[K] item 5 on [J] item 7's evaluation sets: the gate runs on the wan-1.3b profile (model.source: local, Wan's
    strides, UMT5, a 512-token window) over the prompts of ``data.prompts_file`` — no refusal. It scores what needs
    no ground truth (VBench's temporal flickering; Total = Quality), fidelity to the teacher, the any-step criteria;
    the teacher rows of ``anyflow gate-reference`` are the ones the gate computes itself."""
    import os

    import numpy as np
    from safetensors.torch import load_file

    from anyflow.config import build
    from anyflow.eval import vbench_like
    from anyflow.models.student import load_student, save_adapter
    from anyflow.models.teacher import load_teacher
    from anyflow.stages import gate, gate_reference
    from anyflow.utils.io import read_json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = build({"model": {"pretrained_dir": str(wan_mini)}, "video": {"num_frames": 5, "height": 32, "width": 32},
                 "data": {"prompts_file": str(prompts)},
                 "gate": {"nfes": [1, 2, 4], "teacher_steps": 8, "teacher_guidance_scale": 1.0, "num_prompts": 2,
                          "seeds_per_prompt": 2, "num_previews": 4, "use_vbench": False}}, profile="wan-1.3b")
    model = load_student(load_teacher(wan_mini).transformer, cfg.student)  # zero LoRA: the teacher's flow map
    save_adapter(model, tmp_path / "artifacts/stage1/ema_adapter.safetensors",
                 metadata={"paradigm": "flowmap", "steps": 0})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        own = gate.run(cfg, candidate="stage1", out_name="gate_own", progress=False)
        assert gate_reference.main(cfg, type("A", (), dict(no_progress=True))) == 0
        report = gate.run(cfg, candidate="stage1", progress=False, reference="artifacts/gate_reference")
    finally:
        os.chdir(cwd)
    assert report["evaluation_set"] == "prompts" and report["prompts"] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert report["teacher"]["dimensions"].keys() == {"temporal_flickering"}
    for row in [report["teacher"], *report["candidate"]["by_nfe"].values()]:
        assert row["semantic"] is None and row["total"] == row["quality"] is not None
    # the teacher's temporal flickering is VBench's formula on its decoded clips (all 4 kept as previews)
    clips = load_file(str(tmp_path / "artifacts/gate_reference/reference.safetensors"))["previews"].numpy()
    assert clips.shape == (4, 5, 32, 32, 3)
    want = float(np.mean([vbench_like.temporal_flickering(c) for c in clips]))
    assert report["teacher"]["dimensions"]["temporal_flickering"] == pytest.approx(want, abs=1e-12)
    # the zero-LoRA student samples the teacher's own ODE: closer to the teacher's 8-step sample with more steps
    dist = {int(n): r["fidelity"]["latent_distance"] for n, r in report["candidate"]["by_nfe"].items()}
    assert dist[4] < dist[2] < dist[1], dist
    names = {c["name"] for c in report["criteria"]}
    assert {"total_at_4", "monotone_2_to_4", "fidelity_monotone_2_to_4", "beats_teacher@1"} <= names
    assert not any(n.startswith("semantic_floor") for n in names)
    assert read_json(tmp_path / "metrics/gate.json")["passed"] == report["passed"]
    assert gate.without_timings(own) == gate.without_timings(report)


def test_gate_merges_real_vbench_dimensions_into_every_row(wan_mini, tmp_path, monkeypatch):
    """[K] item 5: with ``gate.use_vbench`` VBench's own dimensions (a stand-in ``vbench`` package with VBench's
    interface: scores that depend on the clips) are merged into every row — teacher, teacher at budget, candidate —
    so they count in Total and in the criteria; the gate-reference rows carry them too and equal the gate's own,
    and rows computed without VBench are refused. Without the package the gate names both ways out."""
    import os

    from test_eval_vbench_adapter import install_fake_vbench

    from anyflow.config import build
    from anyflow.eval import vbench_adapter
    from anyflow.eval.sets import PromptSet
    from anyflow.models.student import load_student, save_adapter
    from anyflow.models.teacher import load_teacher
    from anyflow.stages import gate, gate_reference

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    over = {"model": {"pretrained_dir": str(wan_mini)}, "video": {"num_frames": 5, "height": 32, "width": 32},
            "data": {"prompts_file": str(prompts)},
            "gate": {"nfes": [1, 2], "teacher_steps": 4, "teacher_guidance_scale": 1.0, "num_prompts": 2,
                     "seeds_per_prompt": 1, "num_previews": 1, "use_vbench": True}}
    cfg = build(over, profile="wan-1.3b")
    no_vbench = build({**over, "gate": {**over["gate"], "use_vbench": False}}, profile="wan-1.3b")
    model = load_student(load_teacher(wan_mini).transformer, cfg.student)
    save_adapter(model, tmp_path / "artifacts/stage1/ema_adapter.safetensors",
                 metadata={"paradigm": "flowmap", "steps": 0})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "no-weights"))
        with pytest.raises(RuntimeError, match="gate.use_vbench is true but .*set gate.use_vbench=false"):
            gate.run(cfg, candidate="stage1", progress=False)
        install_fake_vbench(tmp_path, monkeypatch)
        own = gate.run(cfg, candidate="stage1", out_name="gate_own", progress=False)
        assert gate_reference.main(no_vbench, type("A", (), dict(no_progress=True))) == 0
        with pytest.raises(ValueError, match="vbench"):  # rows without VBench are not this gate's rows
            gate.run(cfg, candidate="stage1", progress=False, reference="artifacts/gate_reference")
        assert gate_reference.main(cfg, type("A", (), dict(no_progress=True))) == 0
        report = gate.run(cfg, candidate="stage1", progress=False, reference="artifacts/gate_reference")
    finally:
        os.chdir(cwd)
    assert gate.without_timings(own) == gate.without_timings(report)
    rows = [report["teacher"], *report["teacher_at_budget"]["by_nfe"].values(),
            *report["candidate"]["by_nfe"].values()]
    scores = set()
    for row in rows:
        assert set(vbench_adapter.CUSTOM_INPUT_DIMENSIONS) <= set(row["dimensions"]) - set(report["dead_dimensions"])
        agg = PromptSet([], "").aggregate(row["dimensions"], drop=tuple(report["dead_dimensions"]))
        assert row["total"] == pytest.approx(agg["total"]) and row["total"] == row["quality"]
        scores.add(row["dimensions"]["subject_consistency"])
    assert len(scores) > 1  # the stand-in scores depend on the clips: rows differ
    at1 = next(c for c in report["criteria"] if c["name"] == "beats_teacher@1")
    assert at1["value"] == pytest.approx(report["candidate"]["by_nfe"]["1"]["total"])
    assert at1["threshold"] == pytest.approx(report["teacher_at_budget"]["by_nfe"]["1"]["total"])
