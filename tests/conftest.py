"""Shared fixtures: the default model, skipped with a clear message when it is not downloaded."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default GGUF (``smollm2-135m``) in the pdserve cache; skips the test when it is absent."""
    from pdserve.model.registry import DEFAULT_MODEL, resolve_model_path

    path = resolve_model_path(DEFAULT_MODEL)
    if not path.is_file():
        pytest.skip(f"default model not downloaded ({path} missing): run `pdserve pull`")
    return path
