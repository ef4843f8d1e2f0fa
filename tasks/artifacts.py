"""Publish a stage's declared DVC metrics and plots as Prefect artefacts (table + markdown; images inline)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import yaml
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

_MAX_INLINE_IMAGE = 2 << 20
_MAX_IMAGES = 8


def declared_outputs(repo: Path, stage: str) -> tuple[list[Path], list[Path]]:
    """(metrics files, plot files or directories) that ``dvc.yaml`` declares for ``stage``.

    Metrics fall back to ``metrics/<stage>.json``; the stage's ``outs`` directories count as plot directories too,
    so a PNG the stage writes beside its report (the gate's step-scaling plot) is published even when the DVC
    plot itself is declared as CSV/JSON data.
    """
    metrics, plots = [], []
    dvc_yaml = repo / "dvc.yaml"
    spec = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).get(stage, {}) if dvc_yaml.exists() else {}
    for key, bucket in (("metrics", metrics), ("plots", plots), ("outs", plots)):
        for item in spec.get(key, []) or []:
            bucket.append(repo / (next(iter(item)) if isinstance(item, dict) else item))
    if not metrics:
        metrics.append(repo / "metrics" / f"{stage}.json")
    return metrics, plots


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists of scalars are joined."""
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and all(not isinstance(v, (dict, list)) for v in obj):
        return {prefix.rstrip("."): ", ".join(map(str, obj))}
    if isinstance(obj, list):
        out = {}
        for i, item in enumerate(obj):
            out.update(flatten(item, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


def artifact_key(*parts: str) -> str:
    """Prefect artefact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_stage_artifacts(repo: Path, stage: str) -> dict[str, object]:
    """Create table + markdown artefacts for the stage's metrics and an image/link artefact per plot image.

    Returns the flattened metrics (small, JSON-serialisable) so flows can branch on them.
    """
    metrics_files, plot_files = declared_outputs(Path(repo), stage)
    flat: dict[str, object] = {}
    for path in metrics_files:
        if path.suffix == ".json" and path.exists():
            flat.update(flatten(json.loads(path.read_text())))
    if flat:
        create_table_artifact([{"metric": k, "value": v} for k, v in flat.items()],
                              key=artifact_key(stage, "metrics"), description=f"{stage}: declared DVC metrics")
        lines = [f"### {stage}", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
        create_markdown_artifact("\n".join(lines), key=artifact_key(stage, "summary"),
                                 description=f"{stage}: metrics summary")
    images: list[Path] = []
    for path in plot_files:
        for image in ([path] if path.is_file() else sorted(path.glob("*.png")) if path.is_dir() else []):
            if image.suffix.lower() == ".png" and image not in images:
                images.append(image)
    for image in images[:_MAX_IMAGES]:
        publish_image(image, key=artifact_key(stage, image.stem))
    return flat


def publish_image(image: Path, key: str, title: str | None = None) -> None:
    """A markdown artefact with the PNG inline (renders in the Prefect UI without a file server) + a file link."""
    title = title or image.stem.replace("_", " ")
    data = image.read_bytes()
    body = f"### {title}\n\n"
    if len(data) <= _MAX_INLINE_IMAGE:
        body += f"![{title}](data:image/png;base64,{base64.b64encode(data).decode()})\n"
    body += f"\nFile: `{image.resolve()}`\n"
    create_markdown_artifact(body, key=key, description=title)
    create_link_artifact(image.resolve().as_uri(), link_text=title, key=artifact_key(key, "file"))


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
