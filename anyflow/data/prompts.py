"""Prompts for real models (``data.prompts_file``): a user-supplied text file, or VBench's prompt suite.

``data.prompts_file`` is either

- a path to a UTF-8 text file, one prompt per non-empty line (surrounding whitespace stripped), or
- the literal ``vbench``: the prompt suite of the *installed* ``vbench`` package, read from the
  ``VBench_full_info.json`` its wheel ships next to ``vbench/__init__.py`` (a list of records with ``prompt_en``;
  the 946 unique prompts of VBench's standard suite, in file order, each once).

The package is located with :func:`importlib.util.find_spec`, which does not import it (``vbench``'s ``__init__``
pulls in its evaluation models). No prompt list is copied into this repository and nothing is downloaded; when
neither source is there the error names the field and both options.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

VBENCH = "vbench"
VBENCH_INFO = "VBench_full_info.json"
FIELD = "data.prompts_file"
OPTIONS = (f"set {FIELD} to a text file with one prompt per line, or to '{VBENCH}' to read VBench's prompt suite "
           f"({VBENCH_INFO}) from the installed `vbench` package")


class PromptsError(FileNotFoundError):
    """No usable prompt source; the message names ``data.prompts_file`` and both options."""


def _installed() -> bool:
    try:
        return importlib.util.find_spec(VBENCH) is not None
    except (ImportError, ValueError):
        return False


def vbench_info_path() -> Optional[Path]:
    """``VBench_full_info.json`` of the installed ``vbench`` package, or None (package or file absent)."""
    try:
        spec = importlib.util.find_spec(VBENCH)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        path = Path(root) / VBENCH_INFO
        if path.is_file():
            return path
    return None


def read_vbench_info(path: str | Path) -> list[str]:
    """The unique ``prompt_en`` values of a VBench full-info file, in file order."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PromptsError(f"{FIELD}: {path}: not a readable VBench full-info JSON file ({err})") from None
    if not isinstance(records, list):
        raise PromptsError(f"{FIELD}: {path}: expected a JSON list of records with 'prompt_en'")
    prompts = []
    for i, rec in enumerate(records):
        text = rec.get("prompt_en") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise PromptsError(f"{FIELD}: {path}: record {i} has no 'prompt_en' string")
        prompts.append(text.strip())
    prompts = list(dict.fromkeys(p for p in prompts if p))
    if not prompts:
        raise PromptsError(f"{FIELD}: {path}: no prompts")
    return prompts


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line (stripped), order kept."""
    path = Path(path)
    if not path.is_file():
        raise PromptsError(f"{FIELD} {path}: not found; {OPTIONS}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise PromptsError(f"{FIELD} {path}: no prompts (one prompt per non-empty line)")
    return lines


def load_prompts(source: Optional[str]) -> list[str]:
    """The prompts named by ``data.prompts_file`` (see the module docstring); :class:`PromptsError` otherwise."""
    if not source:
        raise PromptsError(f"{FIELD}: not set (required when model.source is not toy); {OPTIONS}")
    if source == VBENCH:
        path = vbench_info_path()
        if path is None:
            where = f"ships no {VBENCH_INFO}" if _installed() else "is not installed"
            raise PromptsError(f"{FIELD}: '{VBENCH}': the vbench package {where}; {OPTIONS}")
        return read_vbench_info(path)
    return read_prompt_file(source)
