"""Typed, frozen configuration: ``params.yaml`` → one :class:`Config`, built once at the edge.

Every stage reads one section (``teacher``, ``synthesize``, ``stage1`` ...) plus the shared ``video``/``model``/
``paths`` sections. Library functions take these dataclasses, never dicts, and never read files or environment
variables themselves.

Profiles (``toy``, ``wan-1.3b``, ``wan-14b``) live in :mod:`anyflow.profiles` as functions returning a full
:class:`Config`. ``params.yaml`` names a profile and overrides any subset of its keys; an unknown key or a value of
the wrong type is an error that names the key (``stage1.lr: Input should be a valid number``).

Conventions (DESIGN §2): t ∈ [0, 1], t = 1 is pure noise, ``z_t = (1 − t)·x0 + t·ε``, velocity ``v = ε − x0``,
model timesteps are ``1000·shift(t)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

_STRICT = ConfigDict(extra="forbid")


def section(cls):
    """A frozen, validated dataclass: unknown keys and wrong types are rejected."""
    return dataclass(frozen=True, config=_STRICT)(cls)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


# --------------------------------------------------------------------------------------------------- sections
@section
class Paths:
    """Where stage outputs go (all relative to the repository root unless absolute)."""

    root: str = "artifacts"
    metrics: str = "metrics"
    plots: str = "plots"
    checkpoints: str = "checkpoints"  # outside DVC outs so a crashed stage can resume


@section
class Video:
    """Pixel-space video geometry. Latents are (C=model.latent_channels, F', H/s, W/s)."""

    num_frames: int = 9
    height: int = 32
    width: int = 32
    fps: int = 8


@section
class Data:
    """The procedural toy domain (``anyflow.data.toy``); ignored by ``wan-*`` profiles except ``prompts_file``."""

    domain: Literal["shapes", "driving"] = "shapes"
    seed: int = 0
    heldout_fraction: float = 0.25
    # non-toy: a text file with one prompt per line, or `vbench` (VBench's prompt suite from the installed vbench
    # package; anyflow.data.prompts). The paper's synthetic set is 256K prompts
    prompts_file: Optional[str] = None


@section
class Model:
    """The teacher. ``source: toy`` builds and trains our tiny Wan; ``source: local`` loads a Wan2.1 directory."""

    source: Literal["toy", "local"] = "toy"
    pretrained_dir: Optional[str] = None  # local Wan2.1 diffusers directory for source=local; never downloaded
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    flow_shift: float = 5.0  # shift(s) = k·s / (1 + (k − 1)·s), k = 5 for Wan2.1 at 480p
    # guidance interval: CFG applies at t > guidance_min_t, the conditional velocity (w = 1) at and below it, in the
    # teacher's sampler, stage 1's fused target and stage 2's real score alike (anyflow.objectives.dmd.guidance_at;
    # Kynkäänniemi et al. 2024). 0 = guidance at every t, as Wan2.1 and the reference sample; the toy's value is
    # measured in README "The toy teacher's guided ODE"
    guidance_min_t: float = 0.0
    max_text_len: int = 32
    # toy architecture (ignored for source=local)
    vae_base_dim: int = 16
    vae_z_dim: int = 8
    text_d_model: int = 64
    text_layers: int = 2
    text_heads: int = 4
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 256
    freq_dim: int = 64


@section
class Teacher:
    """``anyflow teacher``: train the toy VAE and transformer (toy) or verify a local Wan2.1 directory."""

    seed: int = 0
    vae_image_steps: int = 500  # phase 1: single frames (cheap; learns colour/position)
    vae_image_batch_size: int = 16
    vae_steps: int = 60  # phase 2: whole clips at 0.3·vae_lr (learns the temporal taps)
    vae_lr: float = 3e-3
    vae_batch_size: int = 4
    # share of the VAE's image-phase frames drawn from the other toy domain (driving): a general-purpose VAE as Wan's
    # is. Trained on shapes only, the VAE dropped the driving scene's grey lane markings (decoded domain data had
    # none), so no student could learn them; at 0.25 reconstructions keep them (road scene 1.0 vs 0.0) and the
    # teacher's held-out semantic accuracy is 0.875 (0.833 at 0)
    vae_other_fraction: float = 0.25
    steps: int = 1800  # measured: 1000 → 2000 steps took held-out direction 0.25 → 0.67
    lr: float = 1e-3
    batch_size: int = 16
    text_dropout: float = 0.1
    # share of each batch trained at t ~ U(0, low_time_max) instead of the shifted logit-normal: at shift 5 the
    # latter puts 0.7 % of its draws below t = 0.3, where a 50-step sampler still takes 4 steps (README "The toy
    # teacher")
    low_time_fraction: float = 0.0
    low_time_max: float = 0.4
    eval_prompts: int = 24  # held-out combinations, each twice (different noise)
    eval_steps: int = 50
    guidance_scale: float = 3.0  # measured on the 2000-step teacher: CFG 3 beats 5 on held-out colour (0.58 vs 0.46)
    # torch intra-op threads on CPU. Part of the result: more threads split float sums differently, so other bytes
    # (measured on the toy teacher), hence a param, not the machine's core count; dvc.yaml gives the stage as
    # many of `anyflow repro`'s --jobs slots (meta.threads; tests/test_repro.py ties the two). The teacher runs
    # alone at the head of the pipeline: 2 threads took its transformer step 0.142 -> 0.090 s (2-core machine)
    threads: int = 2


@section
class Synthesize:
    """``anyflow synthesize``: teacher ODE samples → latent shards (DESIGN §1)."""

    seed: int = 1
    num_samples: int = 256
    samples_per_shard: int = 32
    batch_size: int = 16
    steps: int = 50
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    # CPU intra-op threads, part of the result (Teacher.threads; before, the machine's core count). 2 on the toy: the
    # stage sits on the critical path between the teacher and stage 1 (measured alone: 1 thread 56 s)
    threads: int = 2


@section
class Student:
    """The any-step student: diffusers ``AnyFlowTransformer3DModel`` + peft LoRA (DESIGN §2)."""

    architecture: Literal["bidirectional", "far"] = "bidirectional"
    paradigm: Literal["flowmap", "consistency"] = "flowmap"
    gate_value: float = 0.25
    delta_init: Literal["copy", "zero"] = "copy"  # zero: the paper's Fig. 7 ablation
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "ffn.net.0.proj",
        "ffn.net.2",
        "time_embedder.linear_1",
        "time_embedder.linear_2",
        "delta_embedder.linear_1",
        "delta_embedder.linear_2",
    )
    # FAR (causal) settings, used when architecture == "far"
    chunk_partition: tuple[int, ...] = (1, 2, 2)
    full_chunk_limit: int = 3
    compressed_patch_size: tuple[int, int, int] = (1, 4, 4)


@section
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    # EMA decay 0 (the shadow = the weights) for the first this-many updates, as the reference's ShardEMA
    # (far/utils/ema_util.py:71-75; 1000 of 6000 stage-1 steps, 200 of 1200 stage-2 steps)
    ema_warmup_steps: int = 0


@section
class Stage1:
    """Forward flow-map training (MeanFlow-style; DESIGN §3 "Stage 1")."""

    seed: int = 0
    max_steps: int = 400
    batch_size: int = 16
    optim: Optim = Optim()
    time_split: tuple[float, float, float] = (0.5, 0.25, 0.25)  # r = t / r = 0 / free (t, r), by global index
    weighting: Literal["beta08", "uniform", "gaussian"] = "beta08"
    derivative: Literal["central", "jvp"] = "central"
    fd_eps: float = 0.005  # central difference step on the [0, 1] scale (5 on the 1000 scale)
    # w of the guidance fused into the student, in the project's one convention u + w·(c − u) (w = 1: none);
    # the reference's fuse_guidance_scale 3.0 (trainer_wan_anyflow_pretrain.py:297-302)
    guidance_scale: float = 3.0
    # the velocity v in the targets: "data" = ε − x0 (the conditional velocity of the sample, MeanFlow), "teacher"
    # = the frozen teacher's instantaneous velocity at (z_t, t, text) — its expectation, so the same target without
    # the sampling noise (one more no-grad forward per step). Domain training always uses "data".
    velocity_target: Literal["data", "teacher"] = "data"
    # the guided (w ≠ 1) rows' target: "reference" = NVlabs/AnyFlow train_bidirection (dF/dt along the conditional
    # v, fused with the mean u_∅(t, r); its zero on r ≠ t rows is not the exact CFG-guided flow map), "meanflow" =
    # MeanFlow's CFG recipe in fused form (dF/dt along v_w = w·v + (1 − w)·v_∅, target += ((1 − w)/w)·(v_∅ − u_∅),
    # v_∅ = u_∅(t, t): zero at the exact guided flow map; one more no-grad forward on guided r ≠ t rows). Default
    # "meanflow", a deliberate difference from the reference measured in README ("Training math against the
    # reference"): toy stage 1, two seeds, lower paired distance to the teacher's CFG sample at every NFE 1-32 and
    # about half the latent Fréchet distance at NFE 2-32 (worse only on Fréchet at NFE 1)
    guidance_target: Literal["reference", "meanflow"] = "meanflow"
    text_dropout: float = 0.1
    adaptive_c: float = 1e-5
    # where λ(t) is evaluated: the shifted t as the reference (its weight peaks at t = 2/3), or the unshifted draw
    # (peak at shift(2/3) ≈ 0.91 for shift 5: this project's code before issue [I], kept for README's ablation)
    weight_time: Literal["shifted", "unshifted"] = "shifted"
    # what the adaptive weight sg(μ / (L_i + c)) normalises: the λ-weighted loss L_i = λ_i·ℓ_i as the reference, or
    # the bare ℓ_i (the earlier code; for the ablation)
    adaptive_on: Literal["weighted", "unweighted"] = "weighted"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    ckpt_every: int = 100
    log_every: int = 10


@section
class Stage2:
    """On-policy flow-map distillation: backward simulation + DMD (DESIGN §3 "Stage 2")."""

    seed: int = 0
    max_steps: int = 150
    batch_size: int = 8
    optim: Optim = Optim(lr=2e-4, betas=(0.0, 0.999), warmup_steps=0, ema_decay=0.99)
    fake_optim: Optim = Optim(lr=2e-4, betas=(0.0, 0.999), warmup_steps=0, ema_decay=0.0)
    num_steps_choices: tuple[int, ...] = (2, 4, 8, 16, 50)
    # w of the real score's CFG u + w·(c − u), by default stage1.guidance_scale (the scale the student fuses, and the
    # one the gate compares against); another only where a measurement shows it helps. The reference's
    # real_guidance_scale 3 means c + 3·(c − u), i.e. w = 4 here (trainer_wan_anyflow_onpolicy.py:130-132)
    real_guidance_scale: float = 3.0
    renoise_min: float = 0.02
    renoise_max: float = 0.98
    # the fake score's training times: 'query' = the law DMD queries it at (clamp(shift(U))), 'reference' =
    # shift(sigmoid(N(0, 1))) as NVlabs/AnyFlow, 'logit_normal' = unshifted sigmoid(N(0, 1)) (the earlier bug: kept
    # for README's ablation)
    fake_times: Literal["query", "reference", "logit_normal"] = "query"
    # weight of the DMD term: 1 = plain MSE as the reference (0.5 is the earlier ½·MSE, for the ablation)
    dmd_weight: float = 1.0
    stage1_weight: float = 1.0
    fake_steps_per_generator_step: int = 1
    ckpt_every: int = 50
    log_every: int = 10
    # CPU intra-op threads, part of the result (Teacher.threads). Measured on the toy (2 cores): 2 threads ran stage 2
    # in 2 min 45 s instead of 3 min 23 s, but as a 2-slot stage it waited 80 s for the consistency baseline to
    # free its core, and ended 25 s later than one thread would have beside it
    threads: int = 1


@section
class GatePolicy:
    total_tolerance: float = 0.02  # Total@4 ≥ teacher Total − tolerance (scores are in [0, 1])
    monotone_tolerance: float = 0.01  # Total(NFE_{i+1}) ≥ Total(NFE_i) − tolerance
    monotone_from_nfe: int = 2
    semantic_floors: Mapping[str, float] = dataclasses.field(  # applied to live dimensions only (see below)
        default_factory=lambda: {"color": 0.5, "shape": 0.3, "direction": 0.5}
    )
    # [J] the fidelity dimension: a lower-is-better number per NFE, read from the entry's key of that name or from
    # its "fidelity" dict (latent_distance | frechet today; the toy FVD plugs in by name); from monotone_from_nfe on
    # it must not rise: f(b) ≤ f(a)·(1 + fidelity_rel_tolerance)
    fidelity_metric: str = "latent_distance"
    fidelity_rel_tolerance: float = 0.02
    # [J] the teacher at the same budget (N Euler steps × CFG, i.e. 2N network evaluations) must be beaten on Total
    # at every gate NFE ≤ this
    beat_teacher_up_to_nfe: int = 8
    # [J] dead dimensions: a semantic accuracy on which the reference teacher scores below this floor (it cannot do
    # it), or any dimension constant over every evaluated row, is dropped from Quality/Semantic/Total
    teacher_accuracy_floor: float = 0.5


@section
class GateSanity:
    """[J] ``anyflow gate-sanity`` (DVC stage ``gate_sanity``): the scorers must rank known-better videos higher on
    held-out specs — procedural clips ≥ teacher ``gate.teacher_steps``×CFG ≥ teacher at each of ``teacher_steps``
    ×CFG, and every corruption of the procedural clips below the clean clip (Total and its target dimension)."""

    seed: int = 4321
    seeds_per_prompt: int = 8  # every held-out prompt × this many noises; one Total per seed column
    teacher_steps: tuple[int, ...] = (8, 4, 2, 1)
    # an ordering A ≥ B holds when the paired mean over seeds of Total(A) − Total(B) exceeds se_multiple × its
    # standard error, and is broken when it is below −se_multiple × SE (within: a tie, reported); 2 ≈ a one-sided
    # 95 % test (t with 7 d.o.f.: P(t < −2) ≈ 0.04), so a true tie is called broken about 1 run in 25
    se_multiple: float = 2.0


@section
class Gate:
    """``anyflow gate``: quality across step budgets (DESIGN §5)."""

    seed: int = 1234
    nfes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    teacher_steps: int = 50
    teacher_guidance_scale: float = 5.0
    num_prompts: int = 12  # toy: every held-out prompt once ...
    # ... with 8 noises each (96 samples). Measured on the toy: two 48-sample draws of the same student differed by
    # 0.019 in Total at 4 NFE and flipped the monotone verdict (8→16 drop 0.017 vs 0.004); two 96-sample draws
    # agree within 0.006 at every NFE — under the 0.01 monotone tolerance the gate must resolve.
    seeds_per_prompt: int = 8
    policy: GatePolicy = GatePolicy()
    sanity: GateSanity = GateSanity()
    num_previews: int = 4
    use_vbench: bool = False  # real VBench on exported mp4s (GPU clusters with weights staged locally)


@section
class Export:
    """``anyflow export``: merged diffusers dir + ONNX (+ TensorRT on GPU hosts)."""

    opset: int = 18
    components: tuple[str, ...] = ("transformer", "text_encoder", "vae_decoder")
    atol: float = 1e-3
    rtol: float = 1e-3
    check_pairs: tuple[tuple[float, float], ...] = ((1.0, 0.0), (1.0, 0.5), (0.75, 0.25), (0.3, 0.3))


@section
class Domain:
    """``anyflow domain``: continued training of the distilled student on a new domain ([G]).

    The domain shards (``artifacts/domain_data``) come from ``anyflow encode-clips`` (stage ``encode_clips`` of
    ``continued/dvc.yaml``): ``source: synthetic`` renders ``num_samples`` clips of the toy ``domain`` (its train
    split, cycled) and encodes them with the teacher's VAE; ``source: clips`` encodes the mp4s + captions in
    ``clips_dir``. Training: the stage-1 objective
    (``stage1.*`` loss settings) from the distilled student's EMA adapter, a ``base_mix`` fraction of every batch
    from the base shards (``artifacts/data``). Evaluation: ``gate.nfes`` on held-out prompts of both domains; the
    domain gate (``anyflow.eval.domain_gate``) needs domain Semantic@4 above the base student's, base-domain Total
    within ``forgetting_tolerance`` of the base student's at every NFE, and ``gate.policy``'s monotone criteria.
    """

    domain: Literal["shapes", "driving"] = "driving"
    source: Literal["synthetic", "clips"] = "synthetic"
    clips_dir: Optional[str] = None
    num_samples: int = 256  # synthetic: rendered domain clips (train split, cycled; clip i has seed seed·10⁶ + i)
    seed: int = 0  # clip seeds, shard noise seeds and the trainer's (t, r, ε) draws
    max_steps: int = 200
    batch_size: int = 16
    # fraction of every batch from the base domain against forgetting. Toy, 200 steps, distill_weight 1: 0.25 kept
    # forgetting@1/@2 but shapes Total fell 0.016 from 8 to 16 NFE (monotone_8_to_16 fails); 0.5 keeps every
    # forgetting and monotone criterion (metrics/domain.json)
    base_mix: float = 0.5
    # self-distillation from the frozen base student (anyflow.train.selfdistill): rows picked by distill_rows
    # ("base": the base-domain rows; "jumps": those and the domain rows with r != t) regress u(z, t, r) onto the
    # base adapter's instead of the stage-1 target, with this weight; 0 = stage-1 objective only (which drops
    # shapes Total@1 0.646 → 0.484 on the toy: stage 2's few-step quality is lost)
    distill_weight: float = 1.0
    distill_rows: Literal["base", "jumps"] = "base"
    optim: Optim = Optim(lr=5e-4)
    forgetting_tolerance: float = 0.05
    ckpt_every: int = 100
    log_every: int = 10


@section
class Fvd:
    """``anyflow fvd-net`` (DVC stage ``fvd_net``, [J]): the toy FVD's feature network (:mod:`anyflow.eval.toy_fvd`),
    a small 3D-conv net trained once with supervision (colour / object / motion) on procedural clips of both toy
    domains at ``video``'s geometry, then checked: accuracy on clips of other seeds, and its Fréchet distance must
    grow with each corruption's strength (``blur_sigmas`` px, ``noise_stds`` on 0–255, ``freeze_fractions``)."""

    seed: int = 0
    train_clips: int = 2048  # half shapes, half driving (every spec cycled)
    heldout_clips: int = 512
    # measured: 300 steps took 212 s of CPU (≈ 110 s on 2 idle cores; 370 s wall on 2 cores shared at load 6) for
    # held-out accuracy colour 1.00 / object 0.79 / motion 0.98
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3  # Adam, cosine decay to 0
    width: int = 16  # channels of the first conv (then 2x, 4x)
    feature_dim: int = 64  # the FVD feature space (penultimate layer)
    sanity_clips: int = 256
    blur_sigmas: tuple[float, ...] = (0.5, 1.0, 2.0)
    noise_stds: tuple[float, ...] = (8.0, 16.0, 32.0)
    freeze_fractions: tuple[float, ...] = (0.5, 1.0)


@section
class Store:
    """Where releases are promoted (DESIGN §6). Credentials come from the environment at the CLI edge."""

    backend: Literal["local", "lakefs"] = "local"
    local_root: str = "registry"
    lakefs_endpoint: str = "http://127.0.0.1:8000"
    lakefs_repository: str = "anyflow"
    lakefs_main: str = "main"


@section
class Config:
    profile: str = "toy"
    paths: Paths = Paths()
    video: Video = Video()
    data: Data = Data()
    model: Model = Model()
    teacher: Teacher = Teacher()
    synthesize: Synthesize = Synthesize()
    student: Student = Student()
    stage1: Stage1 = Stage1()
    stage2: Stage2 = Stage2()
    gate: Gate = Gate()
    export: Export = Export()
    domain: Domain = Domain()
    fvd: Fvd = Fvd()
    store: Store = Store()


# --------------------------------------------------------------------------------------------------- loading
_ADAPTER = TypeAdapter(Config)


def _merge(base: dict, over: Mapping, where: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        name = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict) and isinstance(value, Mapping) and key != "semantic_floors":
            out[key] = _merge(base[key], value, name + ".")
        else:
            out[key] = value
    return out


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def build(overrides: Mapping[str, Any] | None = None, profile: str | None = None) -> Config:
    """Profile defaults ⊕ overrides → validated :class:`Config`."""
    from anyflow.profiles import get_profile

    overrides = dict(overrides or {})
    name = profile or overrides.pop("profile", None) or "toy"
    overrides.pop("profile", None)
    base = dataclasses.asdict(get_profile(name))
    merged = _merge(base, overrides)
    merged["profile"] = name
    try:
        cfg = _ADAPTER.validate_python(merged)
    except ValidationError as err:
        raise ConfigError(_format(err)) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks pydantic cannot express; each message names the key."""
    checks = [
        (abs(sum(cfg.stage1.time_split) - 1.0) < 1e-6, "stage1.time_split: must sum to 1"),
        (0 <= cfg.stage1.text_dropout < 1, "stage1.text_dropout: must be in [0, 1)"),
        (cfg.stage1.guidance_scale >= 1, "stage1.guidance_scale: must be >= 1"),
        (cfg.stage2.real_guidance_scale >= 1, "stage2.real_guidance_scale: must be >= 1 (u + w·(c − u); w = 1 is "
         "the conditional score, no guidance)"),
        (cfg.stage1.fd_eps > 0, "stage1.fd_eps: must be > 0"),
        (0 <= cfg.model.guidance_min_t < 1, "model.guidance_min_t: must be in [0, 1) (CFG applies at t > it; 0 = "
         "at every t)"),
        (0 <= cfg.student.gate_value <= 1, "student.gate_value: must be in [0, 1]"),
        (cfg.student.lora_rank > 0, "student.lora_rank: must be > 0"),
        (0 < cfg.stage2.renoise_min < cfg.stage2.renoise_max < 1, "stage2.renoise_min/max: need 0 < min < max < 1"),
        (all(n >= 1 for n in cfg.stage2.num_steps_choices), "stage2.num_steps_choices: every N must be >= 1"),
        (all(n >= 1 for n in cfg.gate.nfes), "gate.nfes: every NFE must be >= 1"),
        (cfg.video.num_frames % 4 == 1 or cfg.model.source == "toy", "video.num_frames: Wan needs 4k+1 frames"),
        ((cfg.video.num_frames - 1) % 2 == 0, "video.num_frames: must be odd (2x temporal VAE compression)"),
        (cfg.video.height % 16 == 0 and cfg.video.width % 16 == 0, "video.height/width: must be multiples of 16"),
        (cfg.model.source == "toy" or cfg.model.pretrained_dir, "model.pretrained_dir: required when source=local"),
        (cfg.model.source == "toy" or cfg.data.prompts_file, "data.prompts_file: required when model.source=local: "
         "a text file with one prompt per line, or 'vbench' (VBench's prompt suite from the installed vbench package)"),
        (0 <= cfg.domain.base_mix < 1, "domain.base_mix: must be in [0, 1)"),
        (0 <= cfg.teacher.vae_other_fraction < 1, "teacher.vae_other_fraction: must be in [0, 1)"),
        (cfg.domain.num_samples >= 1, "domain.num_samples: must be >= 1"),
        *((getattr(cfg, k).threads >= 1, f"{k}.threads: must be >= 1") for k in ("teacher", "synthesize", "stage2")),
        (cfg.domain.batch_size >= 1, "domain.batch_size: must be >= 1"),
        (cfg.domain.distill_weight >= 0, "domain.distill_weight: must be >= 0"),
        (cfg.domain.distill_weight == 0 or cfg.domain.distill_rows != "base" or
         round(cfg.domain.base_mix * cfg.domain.batch_size) >= 1,
         "domain.distill_rows: 'base' distils base-domain rows, but domain.base_mix x batch_size rounds to 0 rows"),
        (cfg.domain.source == "synthetic" or cfg.domain.clips_dir, "domain.clips_dir: required when source=clips"),
        (cfg.fvd.steps >= 1 and 1 <= cfg.fvd.batch_size <= cfg.fvd.train_clips,
         "fvd.steps/batch_size: need steps >= 1 and 1 <= batch_size <= train_clips"),
        (min(cfg.fvd.heldout_clips, cfg.fvd.sanity_clips) >= 2, "fvd.heldout_clips/sanity_clips: need >= 2 clips"),
        (all(a < b for seq in (cfg.fvd.blur_sigmas, cfg.fvd.noise_stds, cfg.fvd.freeze_fractions)
             for a, b in zip((0, *seq), seq)) and max(cfg.fvd.freeze_fractions, default=0) <= 1,
         "fvd.blur_sigmas/noise_stds/freeze_fractions: each must be positive and increasing (fractions <= 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for key in ("stage1", "stage2", "domain"):
        for field in ("optim",):
            o = getattr(getattr(cfg, key), field)
            if o.lr <= 0:
                raise ConfigError(f"{key}.{field}.lr: must be > 0")
            if o.ema_warmup_steps < 0:
                raise ConfigError(f"{key}.{field}.ema_warmup_steps: must be >= 0")


def load(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None,
         profile: str | None = None) -> Config:
    """Read ``params.yaml`` (or another file), apply dotted ``overrides`` ({"stage1.lr": 1e-4}), validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    nest(overrides or {}, "", into=raw)
    try:
        return build(raw, profile=profile)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def nest(flat: Mapping[str, Any], what: str = "--set", into: Optional[dict] = None) -> dict:
    """{"stage1.max_steps": 2} -> {"stage1": {"max_steps": 2}} (what :func:`build` merges over a profile), written
    into ``into`` (a raw params dict) when given."""
    out: dict = {} if into is None else into
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{what + ' ' if what else ''}{dotted}: {p} is not a section")
        node[leaf] = value
    return out


def with_overrides(cfg: Config, flat: Mapping[str, Any]) -> Config:
    """``cfg`` with dotted ``flat`` overrides applied and validated again (an unknown key is an error naming it)."""
    return build(_merge(to_dict(cfg), nest(flat, "override")))


def to_dict(cfg: Config) -> dict:
    """Plain-YAML view of a config (tuples as lists)."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)
