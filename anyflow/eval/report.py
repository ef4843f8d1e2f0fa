"""What people look at after a gate run: the step-scaling table/plot, a markdown summary, preview videos.

All functions are pure apart from writing the file they are given (atomically); the report layout is the one
:mod:`anyflow.eval.gate` documents, plus ``"baselines": {name: {"by_nfe": ...}}`` for compared students.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np

from anyflow.utils.io import atomic_write_bytes, atomic_write_text

STEP_COLUMNS = ("nfe", "model", "total", "quality", "semantic", "color", "shape", "direction", "latent_distance",
                "frechet", "fvd")


BUDGET_MODEL = "teacher_n_steps"  # the teacher at N Euler steps × CFG, one row per gate NFE N



def _interval(t: dict) -> str:
    """`` at t > τ only (w = 1 below)`` for a teacher sampled under a guidance interval (``model.guidance_min_t``)."""
    return f" at t > {t['guidance_min_t']:g} only (w = 1 below: guidance interval)" if t.get("guidance_min_t") else ""

def step_rows(report: Mapping) -> list[dict]:
    """One row per (model, NFE): the candidate, each baseline, the teacher at the same budget (``teacher_n_steps``:
    N steps × CFG at NFE N) and the reference teacher at its own NFE (steps × 2)."""
    rows = []
    series = [("student", report["candidate"])] + sorted(report.get("baselines", {}).items())
    if report.get("teacher_at_budget"):
        series.append((BUDGET_MODEL, report["teacher_at_budget"]))
    for name, entry in series:
        for nfe, r in sorted(entry["by_nfe"].items(), key=lambda kv: int(kv[0])):
            rows.append(_row(int(nfe), name, r))
    t = report["teacher"]
    rows.append(_row(int(t["nfe"]), "teacher", t))
    return rows


def _row(nfe: int, model: str, r: Mapping) -> dict:
    dims, fid = r.get("dimensions", {}), r.get("fidelity", {})
    return {"nfe": nfe, "model": model, "total": r["total"], "quality": r["quality"], "semantic": r["semantic"],
            "color": dims.get("color"), "shape": dims.get("shape"), "direction": dims.get("direction"),
            "latent_distance": fid.get("latent_distance", 0.0), "frechet": fid.get("frechet", 0.0),
            "fvd": (fid.get("fvd") or {}).get("procedural")}


def write_steps_csv(report: Mapping, path: str | Path) -> Path:
    """``plots/gate_steps.csv`` for DVC plots, one row per NFE: ``<model>_total``, ``<model>_semantic``,
    ``<model>_latent_distance`` for the candidate ("student") and each baseline, and ``teacher_total`` repeated on
    every row (a horizontal reference line). The long table (every column, every model) is in summary.md."""
    rows = step_rows(report)
    teacher = next(r for r in rows if r["model"] == "teacher")
    models = [m for m in dict.fromkeys(r["model"] for r in rows) if m != "teacher"]
    cols = ["nfe"] + [f"{m}_{k}" for m in models for k in ("total", "semantic", "latent_distance")] + [
        "teacher_total"]
    table: dict[int, dict] = {}
    for r in rows:
        if r["model"] != "teacher":
            table.setdefault(r["nfe"], {"nfe": r["nfe"], "teacher_total": teacher["total"]}).update(
                {f"{r['model']}_{k}": r[k] for k in ("total", "semantic", "latent_distance")})
    lines = [",".join(cols)] + [",".join(_fmt(table[n].get(c)) for c in cols) for n in sorted(table)]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_step_plot(report: Mapping, path: str | Path) -> Path:
    """PNG: Total / Semantic and latent distance to the teacher versus NFE (log2 axis), teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = step_rows(report)
    teacher = next(r for r in rows if r["model"] == "teacher")
    models = [m for m in dict.fromkeys(r["model"] for r in rows) if m != "teacher"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("total", "semantic", "latent_distance"),
                              ("VBench-style Total", "Semantic", "latent RMS distance to teacher")):
        for m in models:  # a group whose every dimension was dropped as dead is None (README, "The gate")
            pts = [(r["nfe"], r[key]) for r in rows if r["model"] == m and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        if key != "latent_distance" and teacher[key] is not None:
            ax.axhline(teacher[key], color="k", ls="--", lw=1, label=f"teacher {teacher['nfe']} NFE")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if report.get("policy") and "total_tolerance" in report["policy"]:
        axes[0].axhline(teacher["total"] - report["policy"]["total_tolerance"], color="r", ls=":", lw=1,
                        label="gate threshold @4")
    axes[0].legend(fontsize=8)
    verdict = "PASSED" if report.get("passed") else "FAILED"
    fig.suptitle(f"any-step quality (gate {verdict})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def summary_markdown(report: Mapping) -> str:
    """A markdown page: verdict, failed criteria, the per-NFE table, the teacher row, every criterion."""
    verdict = "**PASSED**" if report.get("passed") else "**FAILED**"
    out = [f"# Gate {verdict}", ""]
    if report.get("failed"):
        out += ["Failed criteria: " + ", ".join(f"`{c}`" for c in report["failed"]), ""]
    c, t = report["candidate"], report["teacher"]
    out += [f"Candidate: `{c.get('adapter', '?')}` (paradigm {c.get('paradigm', '?')}); "
            f"{report.get('num_samples', '?')} held-out samples; teacher {t['nfe']} NFE "
            f"({t.get('steps', '?')} steps × CFG, guidance scale w = {t.get('guidance_scale', '?')}"
            f"{_interval(t)}, {t.get('guidance_convention', 'u + w·(c − u)')}).", ""]
    if report.get("teacher_at_budget"):
        b = report["teacher_at_budget"]
        out += [f"`{BUDGET_MODEL}`: the teacher at the same budget — N Euler steps × CFG (w = "
                f"{b.get('guidance_scale', '?')}{_interval(b)}) at gate NFE N, i.e. "
                f"{'N + the guided steps' if b.get('guidance_min_t') else '2N'} network evaluations against the "
                "student's N.", ""]
    dead = report.get("dead_dimensions") or {}
    if dead:
        out += ["Dropped from Quality / Semantic / Total (dead dimensions): "
                + "; ".join(f"`{d}` — {why}" for d, why in dead.items()), ""]
    out += ["| model | NFE | Total | Quality | Semantic | colour | shape | direction | latent dist. | Fréchet | toy FVD |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in step_rows(report):
        out.append("| " + " | ".join([r["model"], str(r["nfe"])] + [
            "" if r[k] is None else f"{r[k]:.3f}" for k in STEP_COLUMNS[2:]]) + " |")
    out += ["", "| criterion | passed | value | threshold |", "|---|---|---:|---:|"]
    for crit in report.get("criteria", []):
        v, t = crit["value"], crit["threshold"]
        out.append(f"| {crit['name']} | {'yes' if crit['passed'] else '**no**'} | "
                   f"{'' if v is None else f'{v:.4f}'} | {'' if t is None else f'{t:.4f}'} |")
    return "\n".join(out) + "\n"


def preview_grid(columns: Mapping[str, np.ndarray], scale: int = 2, gap: int = 2) -> np.ndarray:
    """uint8 (F, H', W', 3): rows = clips, columns = the given models (each ``(n, F, H, W, 3)``), white gaps."""
    arrays = [np.asarray(v, np.uint8) for v in columns.values()]
    n, f, h, w, _ = arrays[0].shape
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"preview columns differ in shape: {[a.shape for a in arrays]}")
    hs, ws = h * scale, w * scale
    grid = np.full((f, n * (hs + gap) + gap, len(arrays) * (ws + gap) + gap, 3), 255, np.uint8)
    for j, a in enumerate(arrays):
        big = a.repeat(scale, 2).repeat(scale, 3)
        for i in range(n):
            y, x = gap + i * (hs + gap), gap + j * (ws + gap)
            grid[:, y:y + hs, x:x + ws] = big[i]
    return grid


def write_previews(columns: Mapping[str, np.ndarray], out_dir: str | Path, fps: int = 8) -> dict[str, Path]:
    """``grid.gif`` and ``grid.mp4`` (animated), ``grid.png`` (first, middle and last frame stacked) and
    ``columns.txt`` (left-to-right model labels) under ``out_dir`` — a directory the caller builds atomically
    (the gate writes into :func:`anyflow.utils.io.atomic_dir`)."""
    import imageio.v2 as imageio

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = preview_grid(columns)
    f = grid.shape[0]
    still = np.concatenate([grid[0], grid[f // 2], grid[-1]], axis=0)
    paths = {"png": out / "grid.png", "gif": out / "grid.gif", "mp4": out / "grid.mp4"}
    imageio.imwrite(paths["png"], still)
    imageio.mimwrite(paths["gif"], list(grid), duration=1000 / fps, loop=0)
    pad = [(0, 0), (0, grid.shape[1] % 2), (0, grid.shape[2] % 2), (0, 0)]  # yuv420p needs even sizes
    imageio.mimwrite(paths["mp4"], list(np.pad(grid, pad, constant_values=255)), fps=fps, macro_block_size=1)
    atomic_write_text(out / "columns.txt", " | ".join(columns) + "\n")
    return paths

