"""``anyflow bench <name>``: benchmarks recorded as DVC metrics/plots (simulation cost, inference latency).

Adding a benchmark is one line in :data:`BENCHMARKS`: a name → module ``anyflow.bench.<module>`` exposing
``main(cfg, args) -> int`` and optionally ``add_arguments(parser)``.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "simulation": ("simulation", "flow-map vs consistency backward simulation cost at N = 4, 16 (paper Table 4)"),
    "derivative": ("derivative", "stage-1 step cost: dF/dt by central difference vs exact JVP"),
    "latency": ("latency", "per-video latency: 1/2/4/8-step student on ONNX Runtime vs torch, teacher 50x2 NFE"),
}


def _module(name: str):
    return importlib.import_module(f"anyflow.bench.{BENCHMARKS[name][0]}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = _module(name)
        except ModuleNotFoundError as err:
            if err.name != f"anyflow.bench.{module}":
                raise
            continue
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)


def main(cfg, args) -> int:
    return int(_module(args.bench).main(cfg, args) or 0)
