"""Helpers shared by the stage entry points: resolved paths and metric files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from anyflow.config import Config


@dataclass(frozen=True)
class StagePaths:
    """Where each stage reads and writes (relative to the working directory)."""

    root: Path
    metrics: Path
    plots: Path
    checkpoints: Path

    @classmethod
    def of(cls, cfg: Config) -> "StagePaths":
        p = cfg.paths
        return cls(Path(p.root), Path(p.metrics), Path(p.plots), Path(p.checkpoints))

    @property
    def teacher(self) -> Path:  # a WanPipeline directory (toy) or a pointer file to the local Wan2.1 dir
        return self.root / "teacher"

    @property
    def shards(self) -> Path:
        return self.root / "data"

    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def stage2(self) -> Path:
        return self.root / "stage2"

    @property
    def gate(self) -> Path:
        return self.root / "gate"

    @property
    def release(self) -> Path:
        return self.root / "release"

    def metric(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"

    def ckpt(self, stage: str) -> Path:
        return self.checkpoints / stage


def teacher_transformer(cfg: Config, paths: Optional[StagePaths] = None):
    """The teacher's ``WanTransformer3DModel`` (toy: ``artifacts/teacher``; local: ``model.pretrained_dir``)."""
    from diffusers import WanTransformer3DModel

    paths = paths or StagePaths.of(cfg)
    root = Path(cfg.model.pretrained_dir) if cfg.model.source == "local" else paths.teacher
    if not (root / "transformer").is_dir():
        raise FileNotFoundError(f"{root / 'transformer'}: teacher transformer not found (run `anyflow teacher`)")
    return WanTransformer3DModel.from_pretrained(root, subfolder="transformer").eval()
