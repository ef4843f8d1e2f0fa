"""Prefect flows: each reads like the pipeline's table of contents and calls the thin tasks in ``tasks/``."""
