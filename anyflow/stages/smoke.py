"""``anyflow wan-smoke`` (``make wan-smoke``): the ``wan-1.3b`` profile end to end on the random-weight ``wan-mini``
fixture, on a CPU, in minutes — the first thing to run on a new host, and a CI job ([K] item 3).

In a temporary workspace (``--workdir`` to keep one) it runs, as a user would, each command printed before it runs:

1. ``anyflow fixture wan-mini`` — the file layout and classes of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (UMT5 +
   T5TokenizerFast, ``AutoencoderKLWan`` with Wan's 4×/8× strides and z 16, a small ``WanTransformer3DModel``).
2. ``anyflow params --profile wan-1.3b --write params.yaml`` with the overrides below, and a prompt file.
3. ``dvc repro export`` on this repository's own ``dvc.yaml`` stages (teacher check → synthesize → stage1 and the
   consistency baseline → stage2 → fvd_net → gate_reference → gate → export: ONNX at Wan's strides with ONNX
   Runtime parity); stage 1 runs the profile's bf16 autocast and gradient checkpointing (checked in its log).
4. ``anyflow promote`` → ``anyflow pull`` → ``anyflow generate --backend onnxruntime`` from the pulled release.
5. Beside 3-4 (both cores), the FAR student with the profile's ``chunk_partition`` 1 + 3×6 + 2 (8 chunks,
   ``full_chunk_limit`` 3, so the compressed far context runs) on data of its own at 81 frames (21 latent frames)
   under ``far81/``: ``teacher`` check, ``synthesize``, ``stage1`` (bf16, gradient checkpointing), ``gate
   --report-only``, ``export`` (per-chunk transformer graphs, the streaming VAE graphs), ``generate --backend
   onnxruntime``.

Overrides of the profile, and nothing else (``OVERRIDES``): sizes (frames, height, width, steps, batch, sample
counts, text window, LoRA rank); the gate policy's tolerances, opened because random weights have no quality to
gate (every row and criterion is still computed and reported); ``gate.use_vbench`` off, because VBench and its
weights are not installable here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from anyflow.config import Config

USES_PARAMS = False  # anyflow/cli.py: writes its own params.yaml in the workspace

PROMPTS = ("a red car driving along a coastal road at sunset", "a cat playing a piano in a sunlit room",
           "a timelapse of clouds rolling over snowy mountains", "a person riding a bicycle through a park")
SIZES = {
    "video.num_frames": 9, "video.height": 32, "video.width": 32, "model.max_text_len": 32,
    "student.lora_rank": 8, "student.lora_alpha": 8.0,
    "synthesize.num_samples": 4, "synthesize.samples_per_shard": 2, "synthesize.batch_size": 2, "synthesize.steps": 4,
    "stage1.max_steps": 2, "stage1.batch_size": 2, "stage1.ckpt_every": 1, "stage1.log_every": 1,
    "stage2.max_steps": 2, "stage2.batch_size": 2, "stage2.ckpt_every": 1, "stage2.log_every": 1,
    "stage2.num_steps_choices": [1, 2],
    "gate.nfes": [1, 2, 4], "gate.teacher_steps": 4, "gate.num_prompts": 2, "gate.seeds_per_prompt": 1,
    "gate.num_previews": 1,
}
# random weights have no quality: the gate computes every row and criterion, its thresholds are opened
OPEN_GATE = {"gate.policy.total_tolerance": 10.0, "gate.policy.monotone_tolerance": 10.0,
             "gate.policy.fidelity_rel_tolerance": 10.0, "gate.policy.beat_teacher_up_to_nfe": 0}
NO_VBENCH = {"gate.use_vbench": False}  # VBench and its weights cannot be installed here
OVERRIDES = {**SIZES, **OPEN_GATE, **NO_VBENCH}
# the FAR student: the profile's 21 latent frames (1 + 3×6 + 2) are 81 video frames at Wan's temporal stride 4, so
# it has data of its own (synthesised at 81 frames) under far81/ (paths.*: the bidirectional run keeps 9 frames)
FAR_PATHS = {"paths.root": "far81/artifacts", "paths.metrics": "far81/metrics", "paths.plots": "far81/plots",
             "paths.checkpoints": "far81/checkpoints"}
FAR = ["--set", "student.architecture=far", "--set", "video.num_frames=81",
       *[a for k, v in FAR_PATHS.items() for a in ("--set", f"{k}={v}")]]
STAGES = ("teacher", "synthesize", "stage1", "stage1_consistency", "stage2", "fvd_net", "gate_reference",
          "gate_baseline", "gate", "export")


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default=None, help="workspace to create (default: a temporary one, removed "
                                                        "after a passing run)")
    parser.add_argument("--profile", default="wan-1.3b", help="the profile to run (default: wan-1.3b)")


def repo_dvc_yaml() -> Path:
    path = Path(__file__).resolve().parents[2] / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this repository's dvc.yaml is needed (run from a clone: pip install -e .)")
    return path


def write_dvc_yaml(workdir: Path) -> None:
    """This repository's own stage definitions for :data:`STAGES`; dependencies on ``anyflow/`` source files are
    dropped (the library is installed, the workspace has no copy of it)."""
    spec = yaml.safe_load(repo_dvc_yaml().read_text())["stages"]
    stages = {}
    for name in STAGES:
        s = dict(spec[name])
        s["deps"] = [d for d in s.get("deps", []) if not str(d).startswith("anyflow/")]
        stages[name] = s
    (workdir / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


class Runner:
    """Runs each command in the workspace (from two threads at most), prints it and its time, keeps its output in
    ``logs/<n>-<name>.log``."""

    def __init__(self, workdir: Path):
        import threading

        self.workdir, self.rows, self.t0, self.lock, self.n = workdir, [], time.perf_counter(), threading.Lock(), 0
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        bindir = str(Path(sys.executable).parent)  # the stage commands (`anyflow …`) resolve through this venv
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1"}

    def __call__(self, name: str, argv: list[str], expect: tuple[str, ...] = ()) -> str:
        with self.lock:
            self.n += 1
            log = self.workdir / "logs" / f"{self.n:02d}-{name.split(' (')[0].replace(' ', '-')}.log"
        shown = ["anyflow" if a.endswith(os.sep + "anyflow") else a for a in argv]  # as a user types them
        shown = ["dvc", *shown[3:]] if shown[1:3] == ["-m", "dvc"] else shown
        print(f"[{time.perf_counter() - self.t0:5.0f} s] {name}: $ {' '.join(shown)}", flush=True)
        t = time.perf_counter()
        out = subprocess.run(argv, cwd=self.workdir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        log.write_text(out.stdout)
        seconds = time.perf_counter() - t
        self.rows.append((name, seconds, out.returncode))
        print(f"[{time.perf_counter() - self.t0:5.0f} s] {name}: {'ok' if out.returncode == 0 else 'FAILED'} in "
              f"{seconds:.0f} s", flush=True)
        if out.returncode != 0:
            tail = "\n".join(out.stdout.splitlines()[-25:])
            raise SmokeFailed(f"{name}: exit {out.returncode} after {seconds:.0f} s (log: {log})\n{tail}")
        for text in expect:
            if text not in out.stdout:
                raise SmokeFailed(f"{name}: its output does not say {text!r} (log: {log})")
        return out.stdout

    def table(self) -> str:
        lines = [f"{'step':<26}{'seconds':>9}"] + [f"{n:<26}{s:>9.1f}" for n, s, _ in self.rows]
        return "\n".join(lines + [f"{'total':<26}{time.perf_counter() - self.t0:>9.1f}"])


class SmokeFailed(RuntimeError):
    pass


def check_release(release: Path, frames: int, size: tuple[int, int]) -> None:
    """Every file of the manifest verifies (sha256), the ONNX graphs are in it, and its latent shape has
    Wan's strides (4 in time, 8 in space)."""
    from anyflow.export.manifest import verify_release

    manifest = verify_release(release)
    names = {f["path"] for f in manifest["files"]}
    want = {"onnx/transformer.onnx", "onnx/text_encoder.onnx", "onnx/vae_decoder_first.onnx",
            "onnx/vae_decoder_step.onnx"}
    if not want <= names:
        raise SmokeFailed(f"{release}/manifest.json: missing {sorted(want - names)}")
    latent = list(manifest["runtime"]["latent_shape"])
    if latent[1:] != [(frames - 1) // 4 + 1, size[0] // 8, size[1] // 8]:
        raise SmokeFailed(f"{release}/manifest.json: latent shape {latent} is not Wan's strides for {frames} frames "
                          f"of {size[0]}×{size[1]}")


def check_video(path: Path, frames: int, size: tuple[int, int]) -> None:
    import imageio.v3 as iio

    video = iio.imread(path)
    if video.shape[:3] != (frames, *size):
        raise SmokeFailed(f"{path}: {video.shape[0]} frames of {video.shape[1]}×{video.shape[2]}, want {frames} of "
                          f"{size[0]}×{size[1]} (the VAE's strides)")


def run(workdir: Path, profile: str) -> Runner:
    """The smoke; after synthesis the bidirectional release path and the FAR path run side by side (both cores)."""
    from concurrent.futures import ThreadPoolExecutor

    run_ = Runner(workdir)
    anyflow = [str(Path(sys.executable).parent / "anyflow")]
    dvc = [sys.executable, "-m", "dvc"]
    run_("fixture", [*anyflow, "fixture", "wan-mini", "--out", "models/wan-mini"])
    (workdir / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    over = {"model.pretrained_dir": "models/wan-mini", "data.prompts_file": "prompts.txt", **OVERRIDES}
    sets = [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    run_("params", [*anyflow, *sets, "params", "--profile", profile, "--write", "params.yaml"])
    write_dvc_yaml(workdir)
    run_("dvc init", [*dvc, "init", "--no-scm", "-q"])
    run_("dvc repro synthesize", [*dvc, "repro", "synthesize"])
    v = yaml.safe_load((workdir / "params.yaml").read_text())["video"]
    size = (v["height"], v["width"])

    def bidirectional() -> None:
        out = run_("dvc repro export", [*dvc, "repro", "export"])
        if "stage1: mixed precision bf16" not in out or "gradient checkpointing on" not in out:
            raise SmokeFailed("stage1 did not run the profile's bf16 autocast with gradient checkpointing "
                              f"(logs: {workdir / 'logs'})")
        check_release(workdir / "artifacts/release", v["num_frames"], size)
        run_("promote", [*anyflow, "promote", "--name", "smoke"])
        run_("pull", [*anyflow, "pull", "smoke", "--dest", "pulled"])
        run_("generate (onnxruntime)", [*anyflow, "generate", "--release", "pulled", "--backend", "onnxruntime",
                                        "--steps", "2", "--prompt", PROMPTS[0], "--out", "smoke.mp4"])
        check_video(workdir / "smoke.mp4", v["num_frames"], size)

    def far() -> None:
        root = FAR_PATHS["paths.root"]
        adapter = f"{root}/far_stage1/ema_adapter.safetensors"
        run_("far teacher check", [*anyflow, *FAR, "teacher"])
        run_("far synthesize (81 frames)", [*anyflow, *FAR, "synthesize"])
        run_("far stage1", [*anyflow, *FAR, "stage1", "--no-progress"],
             expect=("mixed precision bf16", "gradient checkpointing on"))
        run_("far gate", [*anyflow, *FAR, "gate", "--candidate", adapter, "--out", "far_gate", "--report-only",
                          "--no-progress"])
        run_("far export", [*anyflow, *FAR, "export", "--adapter", adapter, "--gate",
                            f"{root}/far_gate/report.json", "--out", f"{root}/release_far"])
        run_("far generate (onnxruntime)", [*anyflow, "generate", "--release", f"{root}/release_far", "--backend",
                                            "onnxruntime", "--steps", "2", "--prompt", PROMPTS[1], "--out", "far.mp4"])
        check_video(workdir / "far.mp4", 81, size)

    with ThreadPoolExecutor(2) as pool:
        branches = [pool.submit(bidirectional), pool.submit(far)]
        for branch in branches:
            branch.result()
    return run_


def main(cfg: Config, args) -> int:
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="anyflow-wan-smoke-"))
    if keep and workdir.exists() and any(workdir.iterdir()):
        print(f"anyflow wan-smoke: --workdir {workdir} exists and is not empty", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"wan smoke: profile {args.profile} on the wan-mini fixture in {workdir}")
    try:
        runner = run(workdir.resolve(), args.profile)
    except SmokeFailed as err:
        print(f"wan smoke FAILED: {err}\n(workspace kept: {workdir})", file=sys.stderr)
        return 1
    print(runner.table())
    print("wan smoke PASSED")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
