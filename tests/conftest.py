"""Shared fixtures: one tiny model tree per test session, written through the real writer and loaded through the
real loader (no mocks)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DIFFSYNTH_SKIP_DOWNLOAD", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO_ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP barriers make every op wait for
# a descheduled thread (a tiny-model test took 28 s with 2 threads and 0.5 s with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from diffsynth_edit.tiny import write_tiny_model

    # a random output projection: the forward tests compare DiT outputs, which a zero proj_out would make all 0
    return write_tiny_model(tmp_path_factory.mktemp("tiny_models"), identity_out=False)


@pytest.fixture(scope="session")
def tiny_sources(tiny_root):
    from diffsynth_edit.loading import ModelSources

    return ModelSources(variant="2511", model_root=tiny_root)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sources):
    """float32 CPU pipeline with every component. Tests must not mutate its weights."""
    import torch

    from diffsynth_edit.loading import load_pipeline

    return load_pipeline(tiny_sources, torch_dtype=torch.float32)


@pytest.fixture()
def editor(tiny_pipe):
    from diffsynth_edit.editing.editor import Editor

    return Editor(tiny_pipe, variant="2511")
