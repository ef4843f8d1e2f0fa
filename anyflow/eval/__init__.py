"""Evaluation: toy ground-truth scorers, VBench-style quality dimensions, fidelity measures and the gate policy."""
