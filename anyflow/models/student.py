"""The any-step student: diffusers' ``AnyFlowTransformer3DModel`` built from the teacher + peft LoRA adapters.

DESIGN §2. The student is *not* a fork of diffusers' model code:

* :func:`student_from_teacher` instantiates ``AnyFlowTransformer3DModel`` with the teacher's
  ``WanTransformer3DModel`` config and loads the teacher's weights. The only parameters the teacher lacks are
  ``condition_embedder.delta_embedder.*`` (the embedding of the second time r); they start as a copy of
  ``time_embedder`` (``delta_init: copy``), so with ``e = (1 − g)·emb(t) + g·emb'(r)`` the student at r = t *is*
  the teacher, or as zeros (``delta_init: zero``, the paper's Fig. 7 ablation).
* :func:`add_lora` adds a named peft LoRA adapter (diffusers ``PeftAdapterMixin.add_adapter``); the base weights
  stay frozen, only ``lora_*`` parameters of the active adapter train — and, for a FAR student whose training
  uses far context, the adapter's own full copy of ``far_patch_embedding`` (:func:`full_modules`; saved in the
  adapter file as ``far_patch_embedding.weight``/``.bias``, merged by :func:`unwrap_full_modules`).
* :func:`student_velocity` is the one place that converts our conventions (Wan layout (B, C, F, H, W), times in
  [0, 1] of shape (B,)) to the diffusers call (layout (B, F, C, H, W), per-frame timesteps ``1000·t`` of shape
  (B, F)).

Adapters are saved as safetensors of the peft state dict without adapter names (``get_peft_model_state_dict``),
so a file trained as ``student`` loads into any adapter name (stage 2 loads it as ``student``, export merges it).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import torch

from anyflow.config import Student
from anyflow.utils.io import write_safetensors

NUM_TRAIN_TIMESTEPS = 1000.0
STUDENT = "student"
SAVED = "modules_to_save"


def full_modules(model) -> tuple[str, ...]:
    """Modules an adapter of ``model`` trains in full (peft ``modules_to_save``: one trainable copy per adapter,
    saved in its file): a FAR student whose ``chunk_partition`` is longer than its ``full_chunk_limit`` — so that
    training feeds chunks through the compressed far context — trains ``far_patch_embedding`` (the patch embedding
    of far-context chunks), as the reference optimises it (``param_names_to_optimize: [lora_A, lora_B,
    far_patch_embedding]``; a Conv3d, never a LoRA target there). Otherwise none (far context unused in training:
    nothing would reach it)."""
    if type(model).__name__ != "AnyFlowFARTransformer3DModel":
        return ()
    c = model.config
    return ("far_patch_embedding",) if len(c.chunk_partition) > c.full_chunk_limit else ()


def student_from_teacher(teacher, scfg: Student):
    """``AnyFlowTransformer3DModel`` with the teacher's config and weights; ``delta_embedder`` ← ``time_embedder``
    (or zeros). Frozen (``requires_grad=False``), eval mode."""
    from diffusers import AnyFlowTransformer3DModel

    if scfg.architecture == "far":  # causal AnyFlow-FAR: anyflow.models.far
        from anyflow.models.far import far_from_teacher

        return far_from_teacher(teacher, scfg)
    if scfg.architecture != "bidirectional":
        raise ValueError(f"student.architecture: {scfg.architecture!r} is not built by student_from_teacher "
                         "(only 'bidirectional' and 'far' are implemented)")
    accepted = set(inspect.signature(AnyFlowTransformer3DModel.__init__).parameters) - {"self", "gate_value"}
    config = {k: v for k, v in teacher.config.items() if k in accepted and not k.startswith("_")}
    dropped = {k for k in teacher.config if not k.startswith("_") and k not in accepted}
    ignorable = {"added_kv_proj_dim", "qk_norm", "pos_embed_seq_len"}
    bad = {k for k in dropped - ignorable if teacher.config[k] not in (None, "rms_norm_across_heads")}
    if bad:
        raise ValueError(f"teacher transformer config keys not supported by AnyFlowTransformer3DModel: {sorted(bad)}")
    model = AnyFlowTransformer3DModel(**config, gate_value=scfg.gate_value)
    missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith("condition_embedder.delta_embedder.")]
    if new or unexpected:
        raise ValueError(f"teacher → student weights do not line up: missing {new[:3]}, unexpected {unexpected[:3]}")
    emb = model.condition_embedder
    if scfg.delta_init == "copy":
        emb.delta_embedder.load_state_dict(emb.time_embedder.state_dict())
    else:
        with torch.no_grad():
            for p in emb.delta_embedder.parameters():
                p.zero_()
    dtype = next(teacher.parameters()).dtype
    if dtype != torch.float32:
        model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def add_lora(model, scfg: Student, name: str = STUDENT) -> None:
    """Add a peft LoRA adapter ``name`` (rank/alpha/targets from ``student.lora_*``), LoRA B zero-initialised so
    the adapter starts as the identity. Only this adapter's ``lora_*`` parameters require grad afterwards."""
    from peft import LoraConfig

    names = {n for n, _ in model.named_modules()}
    for target in scfg.lora_targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(f"student.lora_targets: {target!r} matches no module of the student")
    full = list(full_modules(model)) or None
    model.add_adapter(LoraConfig(r=scfg.lora_rank, lora_alpha=scfg.lora_alpha, target_modules=list(scfg.lora_targets),
                                 modules_to_save=full, init_lora_weights=True), adapter_name=name)
    model.set_adapter(name)
    set_trainable(model, name)


def _owned(n: str, name: str) -> bool:
    """Parameter ``n`` belongs to adapter ``name``: its LoRA weights or its full copy of a module it trains
    (``far_patch_embedding.modules_to_save.<name>.weight``)."""
    return ("lora_" in n and f".{name}." in n) or f".{SAVED}.{name}." in n


def adapter_parameters(model, name: str = STUDENT) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters of adapter ``name``, by full name: its LoRA weights (``...lora_A.<name>.weight``
    etc.) and its copies of the modules it trains in full (:func:`full_modules`: a FAR student with far context,
    ``far_patch_embedding.modules_to_save.<name>.*``)."""
    return {n: p for n, p in model.named_parameters() if _owned(n, name)}


def set_trainable(model, name: Optional[str]) -> None:
    """requires_grad only on adapter ``name``'s parameters (:func:`adapter_parameters`; None: nothing trains)."""
    for n, p in model.named_parameters():
        p.requires_grad_(bool(name) and _owned(n, name))


class _Router:
    """The LoRA layers and adapter parameters of one model, listed once (see :func:`route`)."""

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.key = tuple(getattr(model, "peft_config", {}) or ())
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.params = list(model.named_parameters())
        self.flags: dict[Optional[str], list[bool]] = {}  # trainable adapter → requires_grad of each parameter

    def pin(self, trainable: Optional[str]) -> None:
        flags = self.flags.get(trainable)
        if flags is None:
            flags = self.flags[trainable] = [bool(trainable) and _owned(n, trainable) for n, _ in self.params]
        for (_, p), flag in zip(self.params, flags):
            p.requires_grad_(flag)


def route(model, adapter: Optional[str], trainable: Optional[str]) -> None:
    """Route ``model``'s forward through LoRA ``adapter`` (None: adapters disabled, the frozen teacher) with only
    ``trainable``'s parameters requiring grad (:func:`set_trainable`; None: nothing trains).

    The same state as diffusers' ``disable_adapters()`` / ``enable_adapters(); set_adapter(adapter)`` followed by
    :func:`set_trainable` (tests/test_route.py compares the two), without their walk over every module and parameter
    on each call: stage 2 switches between student, fake score and teacher ~18 times per step, and the walks were a
    quarter of its step time on the toy profile. Like diffusers' calls it sets peft's tuner layers only (not
    ``modules_to_save`` copies). The layer list is cached on the model and rebuilt when its adapters change."""
    router = model.__dict__.get("_anyflow_router")
    if router is None or router.key != tuple(getattr(model, "peft_config", {}) or ()):
        router = model.__dict__["_anyflow_router"] = _Router(model)
        if not router.layers:
            raise ValueError("route: the model has no LoRA adapter loaded")
    if adapter is not None and adapter not in router.key:
        raise ValueError(f"route: adapter {adapter!r} is not loaded (loaded: {list(router.key)})")
    for layer in router.layers:
        if adapter is None:
            layer._disable_adapters = True
        else:
            layer._active_adapter = [adapter]
            layer._disable_adapters = False
    router.pin(trainable)  # always: peft's own set_adapter (elsewhere) toggles requires_grad too


def student_velocity(model, z_BCFHW: torch.Tensor, t_B: torch.Tensor, r_B: torch.Tensor,
                     prompt_embeds: torch.Tensor) -> torch.Tensor:
    """``u(z_t, t, r)`` in our conventions: z (B, C, F, H, W), t and r in [0, 1] of shape (B,) (already shifted);
    returns (B, C, F, H, W). Calls diffusers with (B, F, C, H, W) and per-frame timesteps ``1000·t`` (B, F).
    A FAR student goes to :func:`anyflow.models.far.far_velocity` (chunk-causal rollout, its chunk_partition)."""
    if type(model).__name__ == "AnyFlowFARTransformer3DModel":
        from anyflow.models.far import far_velocity

        return far_velocity(model, z_BCFHW, t_B, r_B, prompt_embeds)
    b, _, f = z_BCFHW.shape[:3]
    if t_B.shape != (b,) or r_B.shape != (b,):
        raise ValueError(f"student_velocity: t and r must have shape ({b},), got {tuple(t_B.shape)} / "
                         f"{tuple(r_B.shape)}")
    ts = (NUM_TRAIN_TIMESTEPS * t_B).to(z_BCFHW.dtype)[:, None].expand(b, f)
    rs = (NUM_TRAIN_TIMESTEPS * r_B).to(z_BCFHW.dtype)[:, None].expand(b, f)
    out = model(hidden_states=z_BCFHW.permute(0, 2, 1, 3, 4), timestep=ts, r_timestep=rs,
                encoder_hidden_states=prompt_embeds, return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)


def teacher_velocity(model, adapter: str = STUDENT):
    """``v(z, t, text)``: the frozen teacher's instantaneous velocity — ``model`` with its adapters disabled at
    r = t, which is exactly the teacher (the delta embedder starts as a copy) — without grad. Afterwards
    ``adapter`` is active and the only trainable weights again."""

    def v(z_BCFHW: torch.Tensor, t_B: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        route(model, None, adapter)
        try:
            with torch.no_grad():
                return student_velocity(model, z_BCFHW, t_B, t_B, text)
        finally:
            route(model, adapter, adapter)

    return v


def adapter_state(model, name: str = STUDENT) -> dict[str, torch.Tensor]:
    """peft state dict of adapter ``name`` without adapter names (the saved format)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def save_adapter(model, path: str | Path, name: str = STUDENT, state: Optional[dict] = None,
                 metadata: Optional[dict] = None) -> Path:
    """Write adapter ``name`` (or an explicit ``state`` in the same format, e.g. EMA weights) atomically."""
    state = adapter_state(model, name) if state is None else state
    write_safetensors(path, state, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def adapter_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata saved with an adapter file (``steps``, ``paradigm``, ``lora_rank`` …); {} if none."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter not found (run the stage that writes it)")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_adapter(model, path: str | Path, name: str = STUDENT) -> None:
    """Load a saved adapter file into adapter ``name``; every key must match (a config mismatch names the file)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: adapter not found (run the stage that writes it)")
    state = load_file(str(path))
    current = adapter_state(model, name)
    missing, unexpected = set(current) - set(state), set(state) - set(current)
    full = tuple(f"{m}." for m in full_modules(model))
    if missing and not unexpected and all(k.startswith(full) for k in missing):
        # a FAR adapter from before far_patch_embedding trained: its far context is the init (the teacher's
        # kernel, average-pooled), which is what that adapter was trained and sampled with
        for k in missing:
            mod, _, param = k.rpartition(".")
            state[k] = getattr(model.get_submodule(mod).original_module, param).detach().cpu()
        missing = set()
    if unexpected and hasattr(model, "far_patch_embedding") and all(k.startswith("far_patch_embedding.")
                                                                    for k in unexpected):
        raise ValueError(f"{path}: the adapter trained far_patch_embedding (a chunk_partition longer than "
                         f"full_chunk_limit), this FAR student has chunk_partition "
                         f"{tuple(model.config.chunk_partition)} / full_chunk_limit {model.config.full_chunk_limit}"
                         " (pass the student.* it was trained with)")
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match student.lora_* (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    set_peft_model_state_dict(model, state, adapter_name=name)


def state_to_peft_keys(model, state: dict[str, torch.Tensor], name: str = STUDENT) -> dict[str, torch.Tensor]:
    """Map a {full parameter name: tensor} dict of adapter ``name`` (as trainers keep EMA weights) to the saved
    peft format."""
    tag = f".{name}"
    return {k.replace(f".{SAVED}.{name}.", ".").replace(tag, ""): v for k, v in state.items()}


def unwrap_full_modules(model, name: str = STUDENT):
    """Replace each module adapter ``name`` trains in full (peft's ``ModulesToSaveWrapper``) by its trained copy —
    the merge of those modules (diffusers' ``fuse_lora``/``unload_lora`` leave the wrapper, whose state-dict keys
    no plain model loads). Returns ``model``."""
    from peft.utils import ModulesToSaveWrapper

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for n, m in wrapped:
        if name not in m.modules_to_save:
            raise ValueError(f"{n}: adapter {name!r} has no trained copy (has {list(m.modules_to_save)})")
        parent = model.get_submodule(n.rpartition(".")[0]) if "." in n else model
        setattr(parent, n.rpartition(".")[2], m.modules_to_save[name])
    return model


def load_student(teacher_transformer, scfg: Student, adapter_path: Optional[str | Path] = None,
                 name: str = STUDENT):
    """Student with adapter ``name`` loaded from ``adapter_path`` (fresh LoRA when None), eval mode, frozen."""
    model = student_from_teacher(teacher_transformer, scfg)
    add_lora(model, scfg, name)
    if adapter_path is not None:
        load_adapter(model, adapter_path, name)
    set_trainable(model, None)
    return model.eval()
