"""The latent shard format shared by ``synthesize``, ``encode-clips`` and the trainers.

A shard directory holds::

    manifest.json              {"format": 1, "shards": [{"file", "sha256", "num_samples", "prompts", "seeds"}],
                                "negative": {"file", "sha256"}, "meta": {...}}
    negative.safetensors       negative_prompt_embeds (1, L, D): the empty/negative prompt, stored once
    shard-00000.safetensors    latents (N, C, F, H, W)   teacher ODE solution x0 in the transformer's latent space
                               noise   (N, C, F, H, W)   the ε it started from (for fidelity metrics)
                               prompt_embeds (N, L, D)

Latents are in the teacher transformer's (normalised) space, Wan layout (B, C, F, H, W). Every file is written
atomically; :class:`ShardSet` verifies sha256 on load and names the file that is missing or corrupt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from anyflow.utils.io import read_json, sha256_file, write_json, write_safetensors

FORMAT = 1
MANIFEST = "manifest.json"
NEGATIVE = "negative.safetensors"


class ShardError(RuntimeError):
    """A shard or manifest is missing, corrupt or inconsistent; the message names the file."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Atomic safetensors write; returns the file's sha256."""
    return write_safetensors(path, tensors, metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def write_shard(path: str | Path, *, latents: torch.Tensor, noise: torch.Tensor, prompt_embeds: torch.Tensor,
                prompts: Sequence[str], seeds: Sequence[int]) -> dict:
    """Write one shard; returns its manifest entry."""
    n = latents.shape[0]
    if not (noise.shape == latents.shape and prompt_embeds.shape[0] == n == len(prompts) == len(seeds)):
        raise ValueError(f"{path}: inconsistent shard contents (latents {tuple(latents.shape)}, noise "
                         f"{tuple(noise.shape)}, prompt_embeds {tuple(prompt_embeds.shape)}, {len(prompts)} prompts)")
    digest = write_tensors(path, {"latents": latents.float(), "noise": noise.float(),
                                  "prompt_embeds": prompt_embeds.float()},
                           metadata={"prompts": list(prompts), "seeds": [int(s) for s in seeds]})
    return {"file": Path(path).name, "sha256": digest, "num_samples": int(n), "prompts": list(prompts),
            "seeds": [int(s) for s in seeds]}


def write_manifest(root: str | Path, shards: list[dict], negative: dict, meta: dict) -> Path:
    return write_json(Path(root) / MANIFEST, {"format": FORMAT, "shards": shards, "negative": negative,
                                              "meta": meta})


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, F, H, W)
    noise: torch.Tensor
    prompt_embeds: torch.Tensor  # (B, L, D)
    prompts: list[str]
    index: torch.Tensor  # global sample indices (B,)


class ShardSet:
    """All shards of a directory, verified and held in memory (toy scale) — or one shard at a time."""

    def __init__(self, root: str | Path, verify: bool = True):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            raise ShardError(f"{manifest_path}: shard manifest not found (run `anyflow synthesize` first)")
        try:
            self.manifest = read_json(manifest_path)
        except ValueError as err:
            raise ShardError(str(err)) from None
        if self.manifest.get("format") != FORMAT:
            raise ShardError(f"{manifest_path}: unsupported format {self.manifest.get('format')!r}")
        self.verify = verify
        self._negative: torch.Tensor | None = None

    @property
    def entries(self) -> list[dict]:
        return list(self.manifest["shards"])

    def __len__(self) -> int:
        return sum(e["num_samples"] for e in self.entries)

    def _load(self, entry: dict) -> dict[str, torch.Tensor]:
        path = self.root / entry["file"]
        if not path.exists():
            raise ShardError(f"{path}: shard listed in {MANIFEST} is missing")
        if self.verify and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 mismatch (corrupt or modified shard)")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ShardError(f"{path}: unreadable shard ({err})") from None

    def negative_embeds(self) -> torch.Tensor:
        if self._negative is None:
            self._negative = self._load(self.manifest["negative"])["negative_prompt_embeds"]
        return self._negative

    def load_all(self) -> Batch:
        parts = [self._load(e) for e in self.entries]
        if not parts:
            raise ShardError(f"{self.root / MANIFEST}: no shards listed")
        prompts = [p for e in self.entries for p in e["prompts"]]
        return Batch(
            latents=torch.cat([p["latents"] for p in parts]),
            noise=torch.cat([p["noise"] for p in parts]),
            prompt_embeds=torch.cat([p["prompt_embeds"] for p in parts]),
            prompts=prompts,
            index=torch.arange(len(prompts)),
        )
