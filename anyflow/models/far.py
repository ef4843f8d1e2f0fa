"""The causal any-step student AnyFlow-FAR: diffusers' ``AnyFlowFARTransformer3DModel`` built from the teacher.

Not a fork of diffusers' model code; this module only adds what the project needs around it:

* :func:`far_from_teacher` — the FAR model with the teacher ``WanTransformer3DModel``'s config and weights and
  ``chunk_partition`` / ``full_chunk_limit`` / ``compressed_patch_size`` from ``cfg.student``. The teacher lacks
  two parameter groups:

  - ``condition_embedder.delta_embedder.*`` (the second time r): a copy of ``time_embedder`` (``delta_init:
    copy``) or zeros, exactly as the bidirectional student, so at r = t the embedding is the teacher's;
  - ``far_patch_embedding.*`` (the compressed patch embedding of far-context chunks): the teacher's kernel tiled
    over the compressed patch and divided by the number of full patches it covers, bias copied. A compressed
    token is then *exactly the mean of the teacher's full-resolution tokens it covers* (``avg_pool`` of the full
    token grid), matching the rotary table, which diffusers also average-pools for compressed frames. (diffusers'
    own ``__init__`` warm start interpolates the *random* init kernel; loading the teacher does not redo it.)

  Consequently a FAR student whose far context is unused (one chunk, or ``len(chunk_partition) <=
  full_chunk_limit``) computes, at r = t, on chunk 0 exactly the teacher's output on chunk 0 alone (tested).
  With a longer partition the far context enters training (:func:`far_velocity`) and the student's adapter trains
  ``far_patch_embedding`` in full (:func:`anyflow.models.student.full_modules`), as the reference does.
* :class:`DenseFARAttnProcessor` — the causal self-attention with the same KV-cache handling as diffusers'
  ``AnyFlowCausalAttnProcessor`` but attention through SDPA: the flex ``BlockMask`` is materialised densely from
  its own ``mask_mod`` (``create_mask``). torch's CPU flex attention has no backward, so on CPU this is what
  trains. ``mode='auto'`` uses flex for masked calls on CUDA and plain (unmasked, unpadded) SDPA for the KV-cache
  read step everywhere: diffusers' flex read step pads keys with zeros *without* a mask, so the padded keys take
  softmax mass (measured on the tiny test model: KV-cache generation with flex reads is 0.06 max-abs off full
  recomputation, with these reads 2e-7; diffusers 0.42.1).
* :func:`far_velocity` — ``u(z, t, r)`` in :mod:`anyflow.sampling`'s conventions, t/r per sample (B,) or per
  chunk (B, K); the training-rollout forward (chunk-causal mask, every chunk at its own time; with far context
  one forward per chunk beyond ``full_chunk_limit``, so every chunk sees what generation shows it).
* :func:`far_generate` / :func:`far_recompute_chunk` — chunk-by-chunk any-step sampling with the model's KV cache
  (the loop of diffusers' ``AnyFlowFARPipeline`` on latents and text embeddings, each chunk through
  :func:`anyflow.sampling.sample`) and its reference: one full forward of [clean prefix, noisy chunk] per step;
  :func:`far_cached_chunk_velocity` — one chunk's velocity through a KV cache filled with a given clean prefix.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from anyflow.config import Student

NUM_TRAIN_TIMESTEPS = 1000.0
FAR_NEW_KEYS = ("condition_embedder.delta_embedder.", "far_patch_embedding.")
MODES = ("auto", "dense", "flex")


def far_from_teacher(teacher, scfg: Student, attention: str = "auto"):
    """``AnyFlowFARTransformer3DModel`` from the teacher's config and weights (see the module docstring for the
    two new parameter groups). Frozen, eval mode, :class:`DenseFARAttnProcessor` (``attention``) installed."""
    from diffusers import AnyFlowFARTransformer3DModel

    accepted = set(inspect.signature(AnyFlowFARTransformer3DModel.__init__).parameters) - {
        "self", "gate_value", "chunk_partition", "full_chunk_limit", "compressed_patch_size"}
    config = {k: v for k, v in teacher.config.items() if k in accepted and not k.startswith("_")}
    ignorable = {"added_kv_proj_dim", "qk_norm", "pos_embed_seq_len"}
    bad = {k for k in teacher.config if not k.startswith("_") and k not in accepted and k not in
           {"chunk_partition", "full_chunk_limit", "compressed_patch_size"}} - ignorable
    bad |= {k for k in ignorable & set(teacher.config) if teacher.config[k] not in (None, "rms_norm_across_heads")}
    if bad:
        raise ValueError(f"teacher transformer config keys not supported by AnyFlowFARTransformer3DModel: "
                         f"{sorted(bad)}")
    patch, comp = tuple(config.get("patch_size", (1, 2, 2))), tuple(scfg.compressed_patch_size)
    if len(comp) != 3 or any(c < p or c % p for c, p in zip(comp, patch)):
        raise ValueError(f"student.compressed_patch_size: {comp} must be a multiple of the teacher's patch_size "
                         f"{patch} on every axis")
    if scfg.full_chunk_limit < 1 or not scfg.chunk_partition or min(scfg.chunk_partition) < 1:
        raise ValueError(f"student.chunk_partition / full_chunk_limit: need positive values (got "
                         f"{scfg.chunk_partition} / {scfg.full_chunk_limit})")
    model = AnyFlowFARTransformer3DModel(**config, gate_value=scfg.gate_value, compressed_patch_size=comp,
                                         full_chunk_limit=scfg.full_chunk_limit,
                                         chunk_partition=tuple(scfg.chunk_partition))
    missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith(FAR_NEW_KEYS)]
    if new or unexpected:
        raise ValueError(f"teacher → FAR student weights do not line up: missing {new[:3]}, "
                         f"unexpected {unexpected[:3]}")
    emb = model.condition_embedder
    with torch.no_grad():
        if scfg.delta_init == "copy":
            emb.delta_embedder.load_state_dict(emb.time_embedder.state_dict())
        else:
            for p in emb.delta_embedder.parameters():
                p.zero_()
        w = model.patch_embedding.weight  # (D, C, pf, ph, pw)
        reps = [c // p for c, p in zip(comp, patch)]
        model.far_patch_embedding.weight.copy_(w.repeat(1, 1, *reps) / (reps[0] * reps[1] * reps[2]))
        model.far_patch_embedding.bias.copy_(model.patch_embedding.bias)
    set_far_attention(model, attention)
    dtype = next(teacher.parameters()).dtype
    if dtype != torch.float32:
        model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def set_far_attention(model, mode: str = "auto") -> None:
    """Install :class:`DenseFARAttnProcessor` (``mode``: auto | dense | flex) on every causal self-attention."""
    if mode not in MODES:
        raise ValueError(f"FAR attention mode: unknown {mode!r} ({' | '.join(MODES)})")
    for block in model.blocks:
        block.attn1.set_processor(DenseFARAttnProcessor(mode))


def is_far(model) -> bool:
    return type(model).__name__ == "AnyFlowFARTransformer3DModel"


def _dense_mask(block_mask, q_len: int, kv_len: int, device) -> torch.Tensor:
    """The ``BlockMask``'s element mask (1, 1, q_len, kv_len). diffusers' FAR ``mask_mod`` is elementwise tensor
    algebra, so it is evaluated once on broadcast index grids (torch's ``create_mask`` vmaps it: measured 45 % of a
    CPU training step on the toy model); a mask_mod that does not broadcast falls back to ``create_mask``."""
    from torch.nn.attention.flex_attention import create_mask

    zero = torch.zeros((), dtype=torch.long, device=device)
    try:
        full = block_mask.mask_mod(zero, zero, torch.arange(q_len, device=device)[:, None],
                                   torch.arange(kv_len, device=device)[None, :])
        if full.shape == (q_len, kv_len) and full.dtype == torch.bool:
            return full[None, None]
    except (RuntimeError, IndexError, TypeError):
        pass
    q_pad, kv_pad = block_mask.seq_lengths
    full = create_mask(block_mask.mask_mod, None, None, q_pad, kv_pad, device)
    return full[:, :, :q_len, :kv_len]


def _causal_processor_cls():
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalAttnProcessor

    return AnyFlowCausalAttnProcessor


class DenseFARAttnProcessor:
    """diffusers' FAR causal self-attention (same projections, norms, KV-cache write/read, rotary) with SDPA on a
    dense copy of the ``BlockMask``. One dense mask is kept per ``BlockMask`` object (all blocks of one forward
    share it). ``mode``: ``dense`` always SDPA; ``flex`` always diffusers' processor (CPU: forward only);
    ``auto`` flex for masked calls on CUDA, SDPA otherwise (the KV-cache read step is unmasked: plain SDPA)."""

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"FAR attention mode: unknown {mode!r} ({' | '.join(MODES)})")
        self.mode = mode
        self._flex = _causal_processor_cls()()
        self._cache: tuple = (None, None, None)  # (block mask, (q_len, kv_len, device), its dense mask)

    def _mask(self, block_mask, q_len: int, kv_len: int, device) -> torch.Tensor:
        # the cache holds the block mask itself: keyed by id() alone, a freed mask's id could be reused by a new one
        # of other content (the KV-cache steps and stage 2's recomputed chunks build theirs per call)
        cached, key, dense = self._cache
        if cached is not block_mask or key != (q_len, kv_len, str(device)):
            dense = _dense_mask(block_mask, q_len, kv_len, device)
            self._cache = (block_mask, (q_len, kv_len, str(device)), dense)
        return dense

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask=None, rotary_emb=None, kv_cache=None, kv_cache_flag=None) -> torch.Tensor:
        use_flex = self.mode == "flex" or (self.mode == "auto" and attention_mask is not None
                                           and hidden_states.is_cuda)
        if use_flex:
            return self._flex(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, kv_cache,
                              kv_cache_flag)
        from diffusers.models.transformers.transformer_anyflow_far import apply_rotary_emb

        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        dtype = hidden_states.dtype
        query, key, value = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key = query.to(dtype), key.to(dtype)
        query, key, value = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
        if kv_cache is not None:
            nc = kv_cache_flag.get("num_compressed_tokens", 0)
            if kv_cache_flag["is_cache_step"]:  # write: [compressed | full] tokens of the clean prefix
                nf = kv_cache_flag["num_full_tokens"]
                kv_cache["compressed_cache"][0, :, :, :nc] = key[:, :, :nc]
                kv_cache["compressed_cache"][1, :, :, :nc] = value[:, :, :nc]
                kv_cache["full_cache"][0, :, :, :nf] = key[:, :, nc:]
                kv_cache["full_cache"][1, :, :, :nf] = value[:, :, nc:]
            else:  # read: attend to [cached compressed, cached full, this chunk]
                cc, cf = kv_cache_flag["num_cached_compressed_tokens"], kv_cache_flag["num_cached_full_tokens"]
                key = torch.cat([kv_cache["compressed_cache"][0, :, :, :cc], kv_cache["full_cache"][0, :, :, :cf],
                                 key], dim=2)
                value = torch.cat([kv_cache["compressed_cache"][1, :, :, :cc],
                                   kv_cache["full_cache"][1, :, :, :cf], value], dim=2)
        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb["query"])
            key = apply_rotary_emb(key, rotary_emb["key"])
        mask = None
        if attention_mask is not None:
            mask = self._mask(attention_mask, query.shape[2], key.shape[2], query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _per_frame(x: torch.Tensor, b: int, partition: Sequence[int], name: str) -> torch.Tensor:
    """(B,) or (B, K) times in [0, 1] → (B, F) model timesteps ``1000·x`` (chunk k's value on its frames)."""
    k = len(partition)
    if x.shape == (b,):
        x = x[:, None].expand(b, k)
    if x.shape != (b, k):
        raise ValueError(f"far_velocity: {name} must have shape ({b},) or ({b}, {k}) (one per chunk of "
                         f"chunk_partition {tuple(partition)}), got {tuple(x.shape)}")
    return NUM_TRAIN_TIMESTEPS * x.repeat_interleave(torch.tensor(list(partition), device=x.device), dim=1)


def far_velocity(model, z_BCFHW: torch.Tensor, t: torch.Tensor, r: torch.Tensor, prompt_embeds: torch.Tensor,
                 chunk_partition: Optional[Sequence[int]] = None,
                 clean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``u(z_t, t, r)`` of every chunk in chunk-causal rollout forwards (the training forward): z (B, C, F, H, W),
    t and r in [0, 1] of shape (B,) or per chunk (B, K); returns (B, C, F, H, W).

    ``clean`` None: every noisy chunk attends to the noisy earlier chunks (diffusion-forcing layout). ``clean``
    (B, C, F, H, W) clean latents: teacher forcing (diffusers' ``clean_hidden_states``, t = r = 0) — chunk k
    attends only to its own noisy tokens and the *clean* chunks < k, i.e. exactly what chunk-by-chunk generation
    shows it (:func:`far_recompute_chunk` ≡ the KV cache; tested), and its output depends on no other chunk's
    (z, t, r).

    Far context (``K = len(chunk_partition) > L = full_chunk_limit``): generation shows chunk k ≥ L the chunks
    k−L+1..k−1 at full resolution and the chunks 0..k−L *compressed* (``far_patch_embedding``, average-pooled
    rotary). One forward over all K chunks would compress chunks 0..K−L−1 for every chunk of the last window
    (diffusers' ``_forward_train``, what the reference's pretrain trainer does on a random prefix of 1..K−L far
    chunks, loss on the whole window), which is generation's view only for its last chunk. Here chunk k's output
    comes from the forward over chunks 0..k (``_rollout``; with teacher forcing: chunks 0..k−L as clean far
    context at t = r = 0 — the reference's ``context_latents`` — the window k−L+1..k noisy plus its clean copy),
    and chunks 0..L−1 from one forward over 0..L−1: K − L + 1 forwards, every chunk exactly as generated, and the
    compressed far context and its patch embedding get gradients."""
    b, _, f = z_BCFHW.shape[:3]
    config = _bare(model).config  # model may be DDP-wrapped (training)
    partition = list(chunk_partition or config.chunk_partition)
    if sum(partition) != f:
        raise ValueError(f"student.chunk_partition: {tuple(partition)} sums to {sum(partition)}, latents have "
                         f"{f} frames")
    if clean is not None and clean.shape != z_BCFHW.shape:
        raise ValueError(f"far_velocity: clean {tuple(clean.shape)} must have the shape of z {tuple(z_BCFHW.shape)}")
    ts = _per_frame(t, b, partition, "t").to(z_BCFHW.dtype)
    rs = _per_frame(r, b, partition, "r").to(z_BCFHW.dtype)
    limit = config.full_chunk_limit
    if len(partition) <= limit:
        return _rollout(model, z_BCFHW, ts, rs, prompt_embeds, partition, clean)
    bounds = [sum(partition[:k]) for k in range(len(partition) + 1)]
    cut = lambda x, hi: None if x is None else x[:, :, :hi]  # noqa: E731
    outs = [_rollout(model, z_BCFHW[:, :, :bounds[limit]], ts[:, :bounds[limit]], rs[:, :bounds[limit]],
                     prompt_embeds, partition[:limit], cut(clean, bounds[limit]))]
    for n in range(limit + 1, len(partition) + 1):  # chunk n − 1 with chunks 0..n−1−L as far context
        hi = bounds[n]
        out = _rollout(model, z_BCFHW[:, :, :hi], ts[:, :hi], rs[:, :hi], prompt_embeds, partition[:n],
                       cut(clean, hi))
        outs.append(out[:, :, -partition[n - 1]:])
    return torch.cat(outs, dim=2)


def num_far_frames(partition: Sequence[int], limit: int) -> int:
    """Latent frames of the compressed far context of a training forward over ``partition`` (diffusers'
    ``_forward_train``: the first ``len(partition) − limit`` chunks)."""
    return sum(partition[:max(0, len(partition) - limit)])


def _rollout(model, z_BCFHW, ts, rs, prompt_embeds, partition, clean):
    """One training forward over ``partition``: the velocity of its full-resolution frames (all of them when
    ``len(partition) <= full_chunk_limit``), (B, C, F − far, H, W). With ``clean`` the far chunks are the clean
    latents at t = r = 0 and the full window has its clean copy (``clean_hidden_states``); without, the far chunks
    are z's own at their (t, r)."""
    b = z_BCFHW.shape[0]
    nc = num_far_frames(partition, _bare(model).config.full_chunk_limit)
    extra = {}
    if clean is not None:
        clean = clean.to(z_BCFHW.dtype)
        if nc:
            zeros = torch.zeros(b, nc, dtype=ts.dtype, device=ts.device)
            z_BCFHW = torch.cat([clean[:, :, :nc], z_BCFHW[:, :, nc:]], dim=2)
            ts, rs = torch.cat([zeros, ts[:, nc:]], 1), torch.cat([zeros, rs[:, nc:]], 1)
        extra = {"clean_hidden_states": clean[:, :, nc:].permute(0, 2, 1, 3, 4),
                 "clean_timestep": torch.zeros_like(ts[:, nc:])}
    mask = _train_mask(_bare(model), partition, z_BCFHW.shape[3], z_BCFHW.shape[4], clean is not None,
                       z_BCFHW.device)
    out = model(hidden_states=z_BCFHW.permute(0, 2, 1, 3, 4), timestep=ts, r_timestep=rs,
                encoder_hidden_states=prompt_embeds, chunk_partition=list(partition), attention_mask=mask,
                return_dict=False, **extra)[0]
    return out.permute(0, 2, 1, 3, 4)


def _train_mask(model, partition, h: int, w: int, has_clean: bool, device):
    """The rollout's ``BlockMask``, built once per layout and kept on the model (diffusers otherwise rebuilds it in
    every forward, and the dense processor would re-materialise it)."""
    cache = model.__dict__.setdefault("_anyflow_train_masks", {})
    key = (tuple(partition), h, w, has_clean, str(device))
    if key not in cache:
        cache[key] = model.build_attention_mask(chunk_partition=list(partition), height=h, width=w,
                                                has_clean_context=has_clean, device=device, mode="train")
    return cache[key]


def _bare(model):
    return getattr(model, "module", model)


def far_stage1_velocity(model, bare=None):
    """``(u, chunks)`` for :func:`anyflow.objectives.flowmap.stage1_terms` on a FAR student: ``u(z, t, r, text,
    clean)`` = :func:`far_velocity` with per-chunk (B, K) times and teacher forcing on the clean latents ``clean``
    (chunk k sees the clean chunks < k, as at generation), ``chunks`` = the model's ``chunk_partition``. ``model``
    may be DDP-wrapped (``bare``: the unwrapped module, for the config)."""
    chunks = tuple((bare or _bare(model)).config.chunk_partition)

    def u(z, t, r, text, clean):
        return far_velocity(model, z, t, r, text, chunks, clean=clean)
    return u, chunks


def _kv_cache(model, b: int, partition: Sequence[int], h: int, w: int, device, dtype) -> dict:
    """Per-block KV buffers sized as ``AnyFlowFARPipeline`` sizes them (compressed part never negative)."""
    c = model.config
    full_tok = (h // c.patch_size[1]) * (w // c.patch_size[2])
    comp_tok = (h // c.compressed_patch_size[1]) * (w // c.compressed_patch_size[2])
    n_full = c.full_chunk_limit * max(partition) * full_tok
    n_comp = max(0, len(partition) - c.full_chunk_limit + 1) * max(partition) * comp_tok
    shape = (2, b, c.num_attention_heads)
    return {i: {"full_cache": torch.zeros(*shape, n_full, c.attention_head_dim, device=device, dtype=dtype),
                "compressed_cache": torch.zeros(*shape, n_comp, c.attention_head_dim, device=device, dtype=dtype)}
            for i in range(c.num_layers)}


def _cached_velocity(model, prompt_embeds, partition, kv_cache, flag):
    """u(z_chunk, t, r) of the last chunk of ``partition`` through the KV cache (the read step)."""
    import copy

    def u(z, t_B, r_B):
        b, f = z.shape[0], z.shape[2]
        ts = (NUM_TRAIN_TIMESTEPS * t_B).to(z.dtype)[:, None].expand(b, f)
        rs = (NUM_TRAIN_TIMESTEPS * r_B).to(z.dtype)[:, None].expand(b, f)
        out, _ = model(hidden_states=z.permute(0, 2, 1, 3, 4), timestep=ts, r_timestep=rs,
                       encoder_hidden_states=prompt_embeds, chunk_partition=list(partition), kv_cache=kv_cache,
                       kv_cache_flag=copy.deepcopy(flag), return_dict=False)
        return out.permute(0, 2, 1, 3, 4)
    return u


def far_recompute_chunk(model, prompt_embeds, partition, prefix_BCFHW):
    """The reference of :func:`_cached_velocity`: u(z_chunk, t, r) of the last chunk by one training-rollout
    forward of [clean prefix at t = r = 0, noisy chunk at (t, r)] (no cache)."""

    def u(z, t_B, r_B):
        b, f = z.shape[0], z.shape[2]
        full = torch.cat([prefix_BCFHW.to(z.dtype), z], dim=2)
        n0 = prefix_BCFHW.shape[2]
        zeros = torch.zeros(b, n0, device=z.device)
        ts = torch.cat([zeros, (NUM_TRAIN_TIMESTEPS * t_B.to(z.device))[:, None].expand(b, f)], 1).to(z.dtype)
        rs = torch.cat([zeros, (NUM_TRAIN_TIMESTEPS * r_B.to(z.device))[:, None].expand(b, f)], 1).to(z.dtype)
        out = model(hidden_states=full.permute(0, 2, 1, 3, 4), timestep=ts, r_timestep=rs,
                    encoder_hidden_states=prompt_embeds, chunk_partition=list(partition), return_dict=False)[0]
        return out[:, -f:].permute(0, 2, 1, 3, 4)
    return u


def far_backward_simulation(model, noise: torch.Tensor, prompt_embeds: torch.Tensor, num_steps: int, k,
                            shift: float, chunk_partition: Optional[Sequence[int]] = None,
                            grad_context: bool = False) -> torch.Tensor:
    """Stage 2's rollout for FAR, with gradients: :func:`anyflow.objectives.simulation.
    chunkwise_flowmap_backward_simulation` with chunk j's velocity = one rollout forward of [clean simulated prefix,
    noisy chunk j] (:func:`far_recompute_chunk`, what generation's KV cache computes). At N = 2, k = 0 it is
    exactly 2-step :func:`far_generate` (tested)."""
    from anyflow.objectives.simulation import chunkwise_flowmap_backward_simulation

    partition = list(chunk_partition or _bare(model).config.chunk_partition)
    return chunkwise_flowmap_backward_simulation(
        lambda j, prefix: far_recompute_chunk(model, prompt_embeds, partition[:j + 1], prefix), noise, partition,
        num_steps, k, shift, grad_context)


@torch.no_grad()
def far_generate(model, noise: torch.Tensor, prompt_embeds: torch.Tensor, num_steps: int, shift: float,
                 chunk_partition: Optional[Sequence[int]] = None, context: Optional[torch.Tensor] = None,
                 use_cache: bool = True, paradigm: str = "flowmap",
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Chunk-by-chunk any-step sampling (``AnyFlowFARPipeline``'s loop on latents): each chunk runs
    :func:`anyflow.sampling.sample` (``paradigm``: flowmap = the pipeline's update; consistency = the baseline)
    attending to the clean earlier chunks, then is written into the KV cache (t = r = 0). ``context``
    (B, C, Fc, H, W): given clean first frames (I2V: Fc = 1), Fc a chunk boundary; those chunks are kept and only
    cached. ``use_cache=False``: each step recomputes the whole prefix
    (:func:`far_recompute_chunk`) — the reference. Returns (B, C, F, H, W)."""
    from anyflow.sampling import sample

    b, _, f, h, w = noise.shape
    partition = list(chunk_partition or model.config.chunk_partition)
    if sum(partition) != f:
        raise ValueError(f"student.chunk_partition: {tuple(partition)} sums to {sum(partition)}, noise has {f} "
                         "frames")
    bounds = [sum(partition[:k]) for k in range(len(partition) + 1)]
    out = torch.zeros_like(noise)
    n_ctx = 0
    if context is not None:
        if context.shape[2] not in bounds[1:] or context.shape[:2] != noise.shape[:2] or \
                context.shape[3:] != noise.shape[3:]:
            raise ValueError(f"far_generate: context {tuple(context.shape)} must match noise {tuple(noise.shape)} "
                             f"and end on a chunk boundary of {tuple(partition)}")
        out[:, :, :context.shape[2]] = context
        n_ctx = bounds.index(context.shape[2])
    cache = _kv_cache(model, b, partition, h, w, noise.device, noise.dtype) if use_cache else None
    flag = {"num_cached_chunks": 0, "is_cache_step": False}
    for k in range(len(partition)):
        lo, hi = bounds[k], bounds[k + 1]
        if k >= n_ctx:
            u = (_cached_velocity(model, prompt_embeds, partition[:k + 1], cache, flag) if use_cache else
                 far_recompute_chunk(model, prompt_embeds, partition[:k + 1], out[:, :, :lo]))
            out[:, :, lo:hi] = sample(paradigm, u, noise[:, :, lo:hi], num_steps, shift, generator)
        if use_cache and k < len(partition) - 1:  # cache step: write chunk 0..k's clean K/V
            _write_cache(model, prompt_embeds, partition[:k + 1], out[:, :, :hi], cache, flag)
    return out


def _write_cache(model, prompt_embeds, partition, prefix_BCFHW, cache, flag) -> None:
    """The cache step after chunk ``len(partition) − 1``: the clean prefix (t = r = 0) through the model's
    ``mode="cache"`` forward writes [compressed | full] K/V of every block (``AnyFlowFARPipeline``'s loop)."""
    import copy

    b, _, f, h, w = prefix_BCFHW.shape
    zeros = torch.zeros(b, f, dtype=prefix_BCFHW.dtype, device=prefix_BCFHW.device)
    mask = model.build_attention_mask(chunk_partition=list(partition), height=h, width=w,
                                      device=prefix_BCFHW.device, mode="cache")
    model(hidden_states=prefix_BCFHW.permute(0, 2, 1, 3, 4), timestep=zeros, r_timestep=zeros,
          encoder_hidden_states=prompt_embeds, chunk_partition=list(partition), attention_mask=mask, kv_cache=cache,
          kv_cache_flag={**copy.deepcopy(flag), "is_cache_step": True}, return_dict=False)
    flag["num_cached_chunks"] += 1


def far_cached_chunk_velocity(model, prompt_embeds, partition, prefix_BCFHW):
    """u(z_chunk, t, r) of the last chunk of ``partition`` as chunk-by-chunk generation computes it: the clean
    chunks before it (``prefix_BCFHW``) written into a fresh KV cache one cache step per chunk (compressed far
    context included), then the read step (what :func:`far_generate` does; the reference of the training forward
    :func:`far_velocity` with teacher forcing)."""
    partition = list(partition)
    b, _, _, h, w = prefix_BCFHW.shape
    cache = _kv_cache(model, b, partition, h, w, prefix_BCFHW.device, prefix_BCFHW.dtype)
    flag = {"num_cached_chunks": 0, "is_cache_step": False}
    bounds = [sum(partition[:k]) for k in range(len(partition) + 1)]
    if prefix_BCFHW.shape[2] != bounds[-2]:
        raise ValueError(f"far_cached_chunk_velocity: prefix has {prefix_BCFHW.shape[2]} frames, the chunks before "
                         f"the last of {tuple(partition)} {bounds[-2]}")
    with torch.no_grad():
        for k in range(len(partition) - 1):
            _write_cache(model, prompt_embeds, partition[:k + 1], prefix_BCFHW[:, :, :bounds[k + 1]], cache, flag)
    return _cached_velocity(model, prompt_embeds, partition, cache, flag)
