"""Workspace package extending DiffSynth-Studio (PyPI `diffsynth`) for mask-guided Qwen-Image-Edit training and serving."""

__version__ = "0.1.0"
