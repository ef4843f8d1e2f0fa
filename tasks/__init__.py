"""Thin Prefect tasks: each runs one pipeline stage as a command and passes paths and ids, never tensors.

They import neither torch nor any of ``anyflow``'s model code; the stages run as subprocesses
(``dvc repro --single-item <stage>`` by default), so a task's memory is released when the stage ends.
"""
