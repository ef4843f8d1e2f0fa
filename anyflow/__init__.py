"""AnyFlow Pipeline: any-step flow-map distillation of Wan2.1 video diffusion teachers.

Library code only; orchestration (Prefect) lives in ``tasks/`` and ``flows/`` and is never imported from here.
"""

__version__ = "0.1.0"
