"""ONNX export of the causal FAR student: one graph per chunk index, the KV cache as explicit tensors.

diffusers' ``AnyFlowFARTransformer3DModel`` keeps its KV cache in per-block Python dicts that the attention
processor writes in place, with token counts, rotary offsets and the compressed/full split computed as Python ints
from ``chunk_partition`` and ``kv_cache_flag``. Here the *model's own* ``_forward_inference`` / ``_forward_cache``
code runs unchanged with three swaps, so the cache becomes graph inputs and outputs:

* :class:`_CacheProcessor` — the :class:`~anyflow.models.far.DenseFARAttnProcessor` computation, but the cache
  dict of a block is a fresh per-call dict: a read step concatenates the *input* tensors ``k``/``v`` (L, B, heads,
  n, D) (un-rotated keys, ``[compressed | full]`` — the order the model concatenates its two buffers) in front of
  the chunk's keys and records the chunk's own K/V; a cache step records the K/V of the whole prefix;
* :class:`_RealCausalRope` — the stock complex rotary table (``AnyFlowCausalRotaryPosEmbed``, compressed frames
  included) as real (cos, sin), rotated with :func:`anyflow.export.rotary.rotate_pairs` (ONNX has no complex);
* the cache step's ``BlockMask`` → its dense boolean copy (a constant of the graph).

Graphs (float32, dynamic batch, fixed latent H×W and ``chunk_partition``; ``<out>/far_onnx.json`` lists them):

* ``chunk_{k}.onnx`` — ``(z (B,C,f_k,H,W), t (B,), r (B,), text_embeds (B,L,D)[, k_cache, v_cache])
  → (u (B,C,f_k,H,W), k_cache_out, v_cache_out)``; t, r in [0, 1]. The caches (L, B, heads, n_k, D) hold the
  clean chunks < k (absent for k = 0); the outputs are the caches with chunk k's K/V appended. A flow-map step
  ignores them; the *cache write* of chunk k is the same graph on the clean chunk at t = r = 0 (equal to the
  model's prefix recomputation: the cache mask is chunk-causal, so chunk k's K/V only see chunks <= k).
* ``cache_{k}.onnx`` — only where far-context compression starts (chunk k + 1 reads compressed chunks, i.e.
  ``k + 2 > full_chunk_limit``): ``(clean prefix (B,C,F_{<=k},H,W), text_embeds) → (k_cache, v_cache)``, the
  model's full cache step. Compression changes the K/V of *earlier* chunks (they are re-embedded at the compressed
  patch size and later chunks attend to them), so the cache cannot be appended there.

One graph per chunk index because token counts, rotary offsets and the compressed/full split are Python ints in
diffusers' forward (fixed when traced). :func:`far_generate_onnx` reproduces
:func:`anyflow.models.far.far_generate` (flow-map paradigm) on ONNX Runtime; :func:`far_generate_functional` runs
the same loop on the torch wrappers (the tested reference of the export).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from anyflow.export.onnx_export import MAX_BATCH, _export, check_onnx, session
from anyflow.export.rotary import rotate_pairs

NUM_TRAIN_TIMESTEPS = 1000.0
MANIFEST = "far_onnx.json"
RELEASE_SUBDIR = "onnx/far"  # where anyflow export puts the graphs in a FAR release


# ------------------------------------------------------------------------------------------------ swaps
class _CacheProcessor:
    """Causal self-attention with the KV cache passed functionally (see the module docstring)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 kv_cache=None, kv_cache_flag=None):
        dtype = hidden_states.dtype
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key = query.to(dtype), key.to(dtype)
        query, key, value = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
        if kv_cache is not None:
            kv_cache["k_new"], kv_cache["v_new"] = key, value
            if not kv_cache_flag["is_cache_step"] and "k" in kv_cache:
                key = torch.cat([kv_cache["k"], key], dim=2)
                value = torch.cat([kv_cache["v"], value], dim=2)
        if rotary_emb is not None:
            query = rotate_pairs(query, rotary_emb["query"][..., 0], rotary_emb["query"][..., 1])
            key = rotate_pairs(key, rotary_emb["key"][..., 0], rotary_emb["key"][..., 1])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class _RealCausalRope(nn.Module):
    """The stock rope's complex table as real (…, D/2, 2) = (cos, sin); tables are computed eagerly from the stock
    module (bit-identical angles) and kept per layout, so tracing sees constants only (:meth:`prime` first)."""

    def __init__(self, stock: nn.Module):
        super().__init__()
        self.stock = stock
        self.tables: dict = {}

    @staticmethod
    def _key(far_cfg, has_clean) -> tuple:
        return (far_cfg["total_frames"], far_cfg["num_compressed_frames"], tuple(far_cfg["full_frame_shape"]),
                tuple(far_cfg["compressed_frame_shape"]), bool(has_clean))

    def prime(self, far_cfg, device) -> None:
        key = self._key(far_cfg, False)
        if key not in self.tables:
            with torch.no_grad():
                freqs = self.stock(far_cfg=far_cfg, device=device)["query"]
            self.tables[key] = torch.stack([freqs.real, freqs.imag], dim=-1).float()

    def forward(self, far_cfg, device, clean_hidden_states=None):
        if clean_hidden_states is not None:
            raise ValueError("far_onnx: clean_hidden_states (training rollout) is not part of the exported graphs")
        self.prime(far_cfg, device)
        table = self.tables[self._key(far_cfg, False)]
        return {"query": table, "key": table}


def _layout(model, partition: Sequence[int], k: int, h: int, w: int, cache_step: bool) -> dict:
    """The ``far_cfg`` diffusers computes for chunk k's read step (or the cache step after chunk k)."""
    c = model.config
    total = k + 1
    limit = c.full_chunk_limit - 1 if cache_step else c.full_chunk_limit
    n_comp = max(0, total - limit) if cache_step else max(0, total - c.full_chunk_limit)
    part = list(partition[:total])
    return {"total_frames": sum(part), "num_compressed_frames": sum(part[:n_comp]),
            "num_full_frames": sum(part[n_comp:]), "compressed_chunks": n_comp,
            "full_frame_shape": (h // c.patch_size[1], w // c.patch_size[2]),
            "compressed_frame_shape": (h // c.compressed_patch_size[1], w // c.compressed_patch_size[2])}


@contextlib.contextmanager
def _functional(model, rope: _RealCausalRope):
    """Swap in the functional cache processor and the real rope; restore the model's own afterwards."""
    saved = (model.rope, [b.attn1.processor for b in model.blocks])
    model.rope = rope
    for b in model.blocks:
        b.attn1.processor = _CacheProcessor()
    try:
        yield model
    finally:
        model.rope = saved[0]
        for b, p in zip(model.blocks, saved[1]):
            b.attn1.processor = p


def _check_merged(model) -> None:
    if type(model).__name__ != "AnyFlowFARTransformer3DModel":
        raise ValueError(f"far_onnx: expected a merged AnyFlowFARTransformer3DModel, got {type(model).__name__}")
    lora = [n for n, _ in model.named_parameters() if "lora_" in n or ".modules_to_save." in n]
    if lora:
        raise ValueError(f"far_onnx: the FAR model still has LoRA layers ({lora[0]}, …): merge the adapter first "
                         "(anyflow.stages.export.merge_adapter)")


def needs_recompute(model, partition: Sequence[int], k: int) -> bool:
    """Whether the cache write after chunk k must recompute the prefix (chunk k + 1 reads compressed chunks)."""
    return k + 2 > model.config.full_chunk_limit and k < len(partition) - 1


# ------------------------------------------------------------------------------------------------ wrappers
class FARChunkStep(nn.Module):
    """Chunk k: ``(z, t, r, text_embeds[, k_cache, v_cache]) → (u, k_cache_out, v_cache_out)`` (module docstring)."""

    def __init__(self, model: nn.Module, partition: Sequence[int], k: int, height: int, width: int):
        super().__init__()
        _check_merged(model)
        self.model, self.k, self.partition = model, k, list(partition[:k + 1])
        self.rope = _RealCausalRope(model.rope)
        self.rope.prime(_layout(model, partition, k, height, width, False), next(model.parameters()).device)

    def forward(self, z, t, r, text_embeds, k_cache=None, v_cache=None):
        b, f = z.shape[0], z.shape[2]
        ts = (NUM_TRAIN_TIMESTEPS * t).to(z.dtype)[:, None].expand(b, f)
        rs = (NUM_TRAIN_TIMESTEPS * r).to(z.dtype)[:, None].expand(b, f)
        kv = [{} if k_cache is None else {"k": k_cache[i], "v": v_cache[i]} for i in range(len(self.model.blocks))]
        with _functional(self.model, self.rope):
            out = self.model(hidden_states=z.permute(0, 2, 1, 3, 4), timestep=ts, r_timestep=rs,
                             encoder_hidden_states=text_embeds, chunk_partition=self.partition, kv_cache=kv,
                             kv_cache_flag={"num_cached_chunks": self.k, "is_cache_step": False},
                             return_dict=False)[0]
        k_new, v_new = torch.stack([d["k_new"] for d in kv]), torch.stack([d["v_new"] for d in kv])
        if k_cache is not None:
            k_new, v_new = torch.cat([k_cache, k_new], dim=3), torch.cat([v_cache, v_new], dim=3)
        return out.permute(0, 2, 1, 3, 4), k_new, v_new


class FARCacheWrite(nn.Module):
    """Cache step after chunk k: ``(clean prefix (B, C, F_{<=k}, H, W), text_embeds) → (k_cache, v_cache)``, the
    model's own ``_forward_cache`` (t = r = 0, chunk-causal mask, far-context compression)."""

    def __init__(self, model: nn.Module, partition: Sequence[int], k: int, height: int, width: int):
        super().__init__()
        from anyflow.models.far import _dense_mask

        _check_merged(model)
        self.model, self.k, self.partition = model, k, list(partition[:k + 1])
        self.rope = _RealCausalRope(model.rope)
        layout = _layout(model, partition, k, height, width, True)
        device = next(model.parameters()).device
        self.rope.prime(layout, device)
        n = (layout["num_full_frames"] * layout["full_frame_shape"][0] * layout["full_frame_shape"][1]
             + layout["num_compressed_frames"] * layout["compressed_frame_shape"][0]
             * layout["compressed_frame_shape"][1])
        bm = model.build_attention_mask(chunk_partition=self.partition, height=height, width=width, device=device,
                                        mode="cache")
        self.register_buffer("mask", _dense_mask(bm, n, n, device), persistent=False)

    def forward(self, prefix, text_embeds):
        zeros = torch.zeros(prefix.shape[0], prefix.shape[2], dtype=prefix.dtype, device=prefix.device)
        kv = [{} for _ in self.model.blocks]
        with _functional(self.model, self.rope):
            self.model(hidden_states=prefix.permute(0, 2, 1, 3, 4), timestep=zeros, r_timestep=zeros,
                       encoder_hidden_states=text_embeds, chunk_partition=self.partition, attention_mask=self.mask,
                       kv_cache=kv, kv_cache_flag={"num_cached_chunks": self.k, "is_cache_step": True},
                       return_dict=False)
        return torch.stack([d["k_new"] for d in kv]), torch.stack([d["v_new"] for d in kv])


# ------------------------------------------------------------------------------------------------ generation
Graph = Callable[..., tuple]


class GraphChunkStep:
    """The :class:`~anyflow.export.far_runtime.ChunkStep` over per-chunk graphs — name → callable on tensors
    returning a tuple: ``chunk_{k}(z, t, r, text[, k_cache, v_cache]) → (u, k_out, v_out)`` for every k and
    ``cache_{k}(prefix, text) → (k_cache, v_cache)`` where compression starts (ONNX Runtime sessions through
    :func:`chunk_step`, or the torch wrappers). The cache write after chunk k (``commit``) is ``cache_{k}`` on the
    clean prefix where it exists, else chunk k's graph on the clean chunk at t = r = 0, appending its K/V.

    ``partition`` (the exported chunk partition) and ``hw`` (latent H, W) fix what the graphs can run: ``reset``
    refuses another geometry or a longer partition, naming ``where`` (the graphs' directory)."""

    def __init__(self, graphs: Mapping[str, Graph], partition: Optional[Sequence[int]] = None,
                 hw: Optional[Sequence[int]] = None, where: str = "far_onnx"):
        self.graphs, self.where = dict(graphs), where
        self.partition = None if partition is None else list(partition)
        self.hw = None if hw is None else tuple(int(x) for x in hw)

    def reset(self, text, partition, h, w):
        partition = list(partition)
        if self.partition is not None and partition != self.partition[:len(partition)]:
            raise ValueError(f"{self.where}: the graphs are exported for chunk_partition {self.partition} (one graph "
                             f"per chunk index); {partition} is not a prefix of it — use --backend torch for other "
                             "lengths (--length-chunks), or re-export")
        if self.hw is not None and (h, w) != self.hw:
            raise ValueError(f"{self.where}: the graphs are exported for latents {self.hw[0]}×{self.hw[1]}, got {h}×{w}")
        missing = [f"chunk_{k}" for k in range(len(partition)) if f"chunk_{k}" not in self.graphs]
        if missing:
            raise ValueError(f"{self.where}: no graphs {missing} (one chunk graph per chunk index)")
        self.text, self.cache = text, ()
        self.bounds = [sum(partition[:k]) for k in range(len(partition) + 1)]

    def velocity(self, k, z, t, r):
        return self.graphs[f"chunk_{k}"](z, t, r, self.text, *self.cache)[0]

    def commit(self, k, clean):
        recompute = self.graphs.get(f"cache_{k}")
        if recompute is not None:
            self.cache = tuple(recompute(clean, self.text))
        else:
            zeros = torch.zeros(clean.shape[0], dtype=clean.dtype)
            chunk = clean[:, :, self.bounds[k]:self.bounds[k + 1]]
            self.cache = tuple(self.graphs[f"chunk_{k}"](chunk, zeros, zeros, self.text, *self.cache)[1:])


@torch.no_grad()
def far_generate_functional(model, noise, prompt_embeds, num_steps: int, shift: float,
                            chunk_partition: Optional[Sequence[int]] = None, context=None) -> torch.Tensor:
    """:func:`anyflow.models.far.far_generate` (flow-map) through :class:`FARChunkStep` / :class:`FARCacheWrite`
    (:class:`GraphChunkStep` on the torch wrappers, sampled by :func:`anyflow.export.far_runtime.far_sample`)."""
    from anyflow.export.far_runtime import far_sample

    partition = list(chunk_partition or model.config.chunk_partition)
    h, w = noise.shape[3:]
    graphs: dict[str, Graph] = {}
    for k in range(len(partition)):
        graphs[f"chunk_{k}"] = FARChunkStep(model, partition, k, h, w)
        if needs_recompute(model, partition, k):
            graphs[f"cache_{k}"] = FARCacheWrite(model, partition, k, h, w)
    return far_sample(GraphChunkStep(graphs, partition, (h, w)), noise, prompt_embeds, num_steps, shift, partition,
                      context)


def _ort_fn(sess) -> Graph:
    names = [i.name for i in sess.get_inputs()]

    def run(*args):
        feed = {n: a.detach().cpu().numpy().astype(np.float32) for n, a in zip(names, args)}
        return tuple(torch.from_numpy(o) for o in sess.run(None, feed))
    return run


def far_generate_onnx(sessions: Mapping[str, object], noise: torch.Tensor, text_embeds: torch.Tensor,
                      num_steps: int, shift: float, chunk_partition: Sequence[int],
                      context: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`anyflow.models.far.far_generate` (flow-map paradigm) on ONNX Runtime. ``sessions``: name →
    ``onnxruntime.InferenceSession`` (or path) for ``chunk_{k}`` (every k) and ``cache_{k}`` (where exported),
    e.g. :func:`load_far_sessions`. noise (B, C, F, H, W), context (B, C, Fc, H, W) clean first chunks (I2V)."""
    from anyflow.export.far_runtime import far_sample

    fns = {n: _ort_fn(session(s) if isinstance(s, (str, Path)) else s) for n, s in sessions.items()}
    step = GraphChunkStep(fns, where="far_generate_onnx: sessions")
    return far_sample(step, noise, text_embeds, num_steps, shift, chunk_partition, context)


def chunk_step(root: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
               threads: int = 0) -> GraphChunkStep:
    """The ONNX Runtime :class:`~anyflow.export.far_runtime.ChunkStep` of a FAR release (graphs under
    ``<root>/onnx/far``, :data:`RELEASE_SUBDIR`) or of an :func:`export_far` directory ``root``; missing or
    unloadable graphs raise naming the file."""
    root = Path(root)
    where = root if (root / MANIFEST).is_file() else root / RELEASE_SUBDIR
    if not (where / MANIFEST).is_file():
        raise FileNotFoundError(f"{where / MANIFEST}: the FAR transformer graphs are missing from the release "
                                "(re-export it with anyflow export, or use --backend torch)")
    sessions, partition, meta = _load_sessions(where, providers, threads)
    return GraphChunkStep({n: _ort_fn(s) for n, s in sessions.items()}, partition, meta["latent_shape"][2:],
                          where=str(where))


# ------------------------------------------------------------------------------------------------ export
def export_far(model, out_dir: str | Path, latent_shape: Sequence[int], text_shape: Sequence[int],
               opset: int = 18, chunk_partition: Optional[Sequence[int]] = None) -> dict[str, Path]:
    """Export the merged FAR student as ``chunk_{k}.onnx`` (+ ``cache_{k}.onnx`` where compression starts) and
    ``far_onnx.json`` into ``out_dir``; returns name → path (the manifest under ``"manifest"``).

    ``latent_shape`` (C, F, H, W) and ``text_shape`` (L, D) fix the geometry (batch stays dynamic, 1..64);
    ``chunk_partition`` defaults to the model's. Each graph is checked with ``onnx.checker``."""
    from anyflow.utils.io import write_json

    _check_merged(model)
    c, f, h, w = (int(x) for x in latent_shape)
    partition = list(chunk_partition or model.config.chunk_partition)
    if sum(partition) != f:
        raise ValueError(f"export_far: chunk_partition {tuple(partition)} sums to {sum(partition)}, latent_shape "
                         f"has {f} frames")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".far_onnx.", dir=out_dir))
    try:
        names = _export_graphs(model, staging, partition, (c, h, w), text_shape, opset)
        for p in sorted(staging.iterdir()):  # graphs (and any external weight files) first, the manifest last
            os.replace(p, out_dir / p.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    paths = {n: out_dir / name for n, name in names.items()}
    paths["manifest"] = write_json(out_dir / MANIFEST, {
        "chunk_partition": partition, "latent_shape": [c, f, h, w], "text_shape": list(text_shape),
        "full_chunk_limit": model.config.full_chunk_limit, "opset": opset, "graphs": names})
    return paths


def _export_graphs(model, out_dir: Path, partition: list, chw: tuple, text_shape, opset: int) -> dict[str, str]:
    """Trace every graph into ``out_dir`` (the caches of example chunks feed the next graph's example inputs)."""
    c, h, w = chw
    g = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    text = torch.randn(2, *text_shape, generator=g).to(dtype)
    bounds = [sum(partition[:k]) for k in range(len(partition) + 1)]
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    paths: dict[str, Path] = {}
    cache: tuple = ()
    for k in range(len(partition)):
        step = FARChunkStep(model, partition, k, h, w)
        z = torch.randn(2, c, partition[k], h, w, generator=g).to(dtype)
        t = torch.tensor([0.9, 0.4], dtype=dtype)
        args = (z, t, 0.5 * t, text, *cache)
        names = ["z", "t", "r", "text_embeds"] + (["k_cache", "v_cache"] if cache else [])
        dyn = tuple({0: batch} for _ in range(4)) + tuple({1: batch} for _ in cache)
        paths[f"chunk_{k}"] = _export(step, args, out_dir / f"chunk_{k}.onnx", names,
                                      ["u", "k_cache_out", "v_cache_out"], dyn, opset)
        if k == len(partition) - 1:
            break
        prefix = torch.randn(2, c, bounds[k + 1], h, w, generator=g).to(dtype)
        if needs_recompute(model, partition, k):
            write = FARCacheWrite(model, partition, k, h, w)
            paths[f"cache_{k}"] = _export(write, (prefix, text), out_dir / f"cache_{k}.onnx",
                                          ["prefix", "text_embeds"], ["k_cache", "v_cache"],
                                          ({0: batch}, {0: batch}), opset)
            with torch.no_grad():
                cache = write(prefix, text)
        else:
            with torch.no_grad():
                cache = step(prefix[:, :, bounds[k]:], torch.zeros(2), torch.zeros(2), text, *cache)[1:]
    for p in paths.values():
        check_onnx(p)
    return {n: p.name for n, p in paths.items()}


def load_far_sessions(out_dir: str | Path, threads: int = 0,
                      providers: Sequence[str] = ("CPUExecutionProvider",)) -> tuple[dict, list[int]]:
    """``(sessions, chunk_partition)`` from an :func:`export_far` directory (reads ``far_onnx.json``)."""
    sessions, partition, _ = _load_sessions(Path(out_dir), providers, threads)
    return sessions, partition


def _load_sessions(out_dir: Path, providers: Sequence[str], threads: int) -> tuple[dict, list[int], dict]:
    from anyflow.utils.io import read_json

    meta = read_json(out_dir / MANIFEST)
    for field in ("graphs", "chunk_partition", "latent_shape"):
        if field not in meta:
            raise ValueError(f"{out_dir / MANIFEST}: missing field {field!r}")
    missing = [name for name in meta["graphs"].values() if not (out_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"{out_dir / MANIFEST}: graphs listed but missing: "
                                f"{[str(out_dir / m) for m in missing]}")
    sessions = {}
    for n, name in meta["graphs"].items():
        try:
            sessions[n] = session(out_dir / name, providers, threads)
        except Exception as err:  # onnxruntime raises its own pybind exception types
            raise ValueError(f"{out_dir / name}: ONNX Runtime cannot load this graph ({type(err).__name__}: "
                             f"{str(err)[:200]}); re-export the release") from None
    return sessions, list(meta["chunk_partition"]), meta
