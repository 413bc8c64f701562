"""Fixtures for the model tests: tiny random checkpoints, written once per session."""
from __future__ import annotations

import pytest
from model_helpers import TINY_VARIANTS, Tiny, make_tiny_hf


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Tiny]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_hf(name, root / name, seed=i) for i, name in enumerate(TINY_VARIANTS)}
