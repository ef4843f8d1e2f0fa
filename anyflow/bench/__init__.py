"""Benchmarks recorded as DVC metrics (``anyflow bench <name>``); not timed tests.

Each benchmark is a module ``anyflow.bench.<name>`` exposing ``main(cfg, args) -> int`` and optionally
``add_arguments(parser)``; :data:`BENCHMARKS` in :mod:`anyflow.stages.bench` registers it.
"""
