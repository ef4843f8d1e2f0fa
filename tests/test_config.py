"""Configuration: profiles, params.yaml, errors that name the key."""

from pathlib import Path

import pytest
import yaml

from anyflow import config as C
from anyflow.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_the_toy_profile():
    cfg = C.load(ROOT / "params.yaml")
    assert cfg == C.build(profile="toy")


def test_wan_profiles_carry_the_paper_numbers():
    w13, w14 = C.build(profile="wan-1.3b"), C.build(profile="wan-14b")
    assert (w13.stage1.max_steps, w13.stage1.batch_size) == (6000, 32)
    assert (w14.stage1.max_steps, w14.stage1.batch_size) == (4000, 16)
    for w in (w13, w14):
        assert w.student.lora_rank == 256 and w.student.gate_value == 0.25
        assert w.stage1.optim.lr == 5e-5 and w.stage1.optim.betas == (0.9, 0.95) and w.stage1.optim.ema_decay == 0.999
        assert w.stage2.optim.lr == 2e-6 and w.stage2.optim.betas == (0.0, 0.999) and w.stage2.optim.ema_decay == 0.99
        assert w.stage1.weighting == "beta08" and w.stage1.guidance_scale == 3.0 and w.stage1.fd_eps == 0.005
        assert w.model.source == "local" and w.video.num_frames == 81
        assert w.data.prompts_file == "vbench"  # VBench's suite from the installed package, no file in the repo


@pytest.mark.parametrize("profile,temporal_stride", [("toy", 2), ("wan-1.3b", 4), ("wan-14b", 4)])
def test_far_chunk_partition_covers_the_latent_frames(profile, temporal_stride):
    """--set student.architecture=far works on every profile: the chunks tile the latent frames exactly (toy VAE:
    temporal stride 2, Wan VAE: 4; the first latent frame is the first video frame alone)."""
    cfg = C.build(profile=profile)
    latent_frames = (cfg.video.num_frames - 1) // temporal_stride + 1
    assert sum(cfg.student.chunk_partition) == latent_frames
    assert cfg.student.chunk_partition[0] == 1  # I2V: the given image is chunk 0


def test_configs_are_frozen():
    cfg = C.build()
    with pytest.raises(Exception):
        cfg.stage1.max_steps = 3


@pytest.mark.parametrize("override, needle", [
    ({"stage1": {"lrr": 1}}, "stage1.lrr: unknown key"),
    ({"stage1": {"optim": {"lr": "fast"}}}, "stage1.optim.lr"),
    ({"stage1": {"weighting": "cosine"}}, "stage1.weighting"),
    ({"stage1": {"time_split": [0.5, 0.5, 0.5]}}, "stage1.time_split"),
    ({"bogus": {}}, "bogus: unknown key"),
    ({"student": {"gate_value": 2.0}}, "student.gate_value"),
])
def test_bad_params_name_the_key(override, needle):
    with pytest.raises(C.ConfigError, match=needle.replace(".", r"\.")):
        C.build(override)


def test_unknown_profile_is_an_error():
    with pytest.raises(C.ConfigError, match="unknown profile 'wan-2b'"):
        C.build(profile="wan-2b")


def test_load_applies_dotted_overrides_and_reports_the_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"profile": "toy", "stage1": {"max_steps": 7}}))
    cfg = C.load(p, overrides={"stage2.max_steps": 3})
    assert cfg.stage1.max_steps == 7 and cfg.stage2.max_steps == 3
    p.write_text("stage1: {max_steps: [1, 2}\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(p)
    with pytest.raises(C.ConfigError, match="parameters file not found"):
        C.load(tmp_path / "missing.yaml")


def test_cli_rejects_bad_params_with_exit_2(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"profile": "toy", "stage2": {"renoise_min": 0.9, "renoise_max": 0.1}}))
    assert cli_main(["--params", str(p), "params"]) == 2
    assert "stage2.renoise_min/max" in capsys.readouterr().err


def test_local_source_requires_a_directory():
    with pytest.raises(C.ConfigError, match="model.pretrained_dir"):
        C.build({"model": {"source": "local", "pretrained_dir": None}})


@pytest.mark.parametrize("argv,command", [
    (["--params", "p.yaml", "--set", "stage1.max_steps=3", "stage1", "--no-progress"], "stage1"),
    (["-v", "--set=a=1", "gate", "--candidate", "x", "--report-only"], "gate"),
    (["fvd-net"], "fvd-net"),
    (["--help"], None),
    (["no-such-command", "--flag"], None),
])
def test_the_command_is_found_after_the_global_options(argv, command):
    from anyflow.cli import command_in

    assert command_in(argv) == command


def test_a_command_imports_its_own_module_only():
    """`anyflow <command>` builds the options of that command alone: before, every stage module (torch, diffusers,
    onnx, dvc, ...) was imported first — about 5 s of each stage's start on the CI machine."""
    import subprocess
    import sys

    code = ("import sys\nfrom anyflow import cli\n"
            "for argv in (['--help'], ['--set', 'a=1', 'promote', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "    commands = {'anyflow.stages.' + module for module, _ in cli.COMMANDS.values()}\n"
            "    print(sorted(commands & set(sys.modules)), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert lines == ["[] False", "['anyflow.stages.promote'] False"], out
