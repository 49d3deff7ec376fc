"""Shared numpy-only pre/post-processing for the deploy scripts (no Ultralytics, no yolocomp, no torch)."""
