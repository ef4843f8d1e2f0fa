"""Optimisation pieces shared by the trainers: AdamW + warm-up, EMA of adapter weights, per-step RNG, atomic
checkpoints and loss CSVs (DVC plots)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from anyflow.config import Optim
from anyflow.utils.io import atomic_path


def make_optimizer(params: list[torch.nn.Parameter], o: Optim):
    """AdamW + linear warm-up (LambdaLR)."""
    if not params:
        raise ValueError("optimizer: no trainable parameters (is the LoRA adapter attached and active?)")
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    warm = max(o.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


class Ema:
    """``θ_ema ← d·θ_ema + (1 − d)·θ`` over a named parameter dict (d = 0 keeps the latest weights).

    Warm-up as the reference's ``ShardEMA`` (``far/utils/ema_util.py:71-83``, called from ``far/main.py:171-172``
    with the 0-based count of finished steps): the first ``warmup_steps`` updates use d = 0 — the shadow *is* the
    current weights — and only later updates average, so the EMA never carries the untrained start."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, warmup_steps: int = 0):
        if warmup_steps < 0:
            raise ValueError(f"ema_warmup_steps: must be >= 0 (got {warmup_steps})")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = 0  # updates done so far (the reference's global_step at the call)
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses (``ema_util.py:71-75``: 0 while step < warmup_steps)."""
        return self.decay if self.updates >= self.warmup_steps else 0.0

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        d = self.current_decay()
        for n, p in params.items():
            self.shadow[n].mul_(d).add_(p.detach(), alpha=1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup_steps": self.warmup_steps, "updates": self.updates,
                "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        if "updates" not in sd:
            raise ValueError("checkpoint: EMA state has no update count (written before the EMA warm-up); delete "
                             "it or run the stage with --fresh")
        self.decay = sd["decay"]
        self.warmup_steps = sd["warmup_steps"]
        self.updates = sd["updates"]
        self.shadow = {n: v.clone() for n, v in sd["shadow"].items()}


def step_generator(*key: int) -> torch.Generator:
    """A generator determined by ``key`` (e.g. (seed, step)): a resumed run redraws exactly what an uninterrupted
    one draws, with no RNG state to checkpoint, and every rank can draw the same global batch."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def run_key(cfg, params: dict[str, torch.Tensor], data_fn, *extra) -> str:
    """Fingerprint of what determines a training run: every parameter (the frozen ``Config``'s repr), the trainable
    weights it starts from (base adapter, seeded LoRA init), the data (a probe batch drawn from ``data_fn`` with a
    generator of its own, so the run's RNG is untouched) and ``extra``. A checkpoint is resumed only by the run
    whose key it carries: one left by a killed run under other params, another base adapter or other data would
    otherwise be continued silently and give a result no re-run reproduces."""
    import dataclasses
    import hashlib

    h = hashlib.sha256(repr((cfg, extra)).encode())

    def feed(name: str, x) -> None:
        h.update(name.encode())
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            h.update(str((x.dtype, tuple(x.shape))).encode())
            h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        else:
            h.update(repr(x).encode())

    for name in sorted(params):
        feed(name, params[name])
    probe = data_fn(torch.Generator().manual_seed(0))
    items = (vars(probe) if not dataclasses.is_dataclass(probe) else
             {f.name: getattr(probe, f.name) for f in dataclasses.fields(probe)})
    for name in sorted(items):
        feed(f"data.{name}", items[name])
    return h.hexdigest()


def check_run_key(checkpoint: dict, key: Optional[str], path: Optional[Path]) -> None:
    """Refuse a checkpoint written by another run (:func:`run_key`): continuing it would silently mix two runs."""
    if key is not None and checkpoint.get("run_key") != key:
        raise ValueError(f"{path}: checkpoint was written by another run (params, starting weights or data changed "
                         "since); delete it or run the stage with --fresh")


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_checkpoint(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 — name the file
        raise RuntimeError(f"{path}: unreadable checkpoint ({err}); delete it to start over") from None


def copy_params_(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], what: str) -> None:
    differ = set(params) ^ set(saved)
    if differ:
        raise ValueError(f"checkpoint: {what} parameters differ from the model's ({sorted(differ)[:3]} ...)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


def write_loss_csv(path: Path, history: list[dict], cols: Sequence[str]) -> None:
    """One row per step (a DVC plot)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({c: row.get(c, "") for c in cols})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
