"""Thin stage entry points: ``main(cfg, args)`` does the I/O and calls the library (one DVC stage each)."""
