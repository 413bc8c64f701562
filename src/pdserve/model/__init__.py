"""The Llama-family model, its weight loaders and tokenizer.

Public entry points (imported lazily, so ``import pdserve.model.attention`` stays cheap):
``load_model``, ``resolve_device``, ``resolve_dtype``, ``checkpoint_path``, ``resolve_model_path``,
``ModelArch``, ``LlamaForCausalLM``, ``Tokenizer``, ``IncrementalDetokenizer``, ``pull_default_model``.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": "loader", "resolve_device": "loader", "resolve_dtype": "loader",
    "checkpoint_path": "registry", "detect_format": "loader",
    "resolve_model_path": "registry", "pull_default_model": "registry", "cache_dir": "registry",
    "DEFAULT_MODEL": "registry",
    "ModelArch": "arch", "BUILTIN_ARCHS": "arch",
    "LlamaForCausalLM": "llama",
    "Tokenizer": "tokenizer", "IncrementalDetokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pdserve.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pdserve.model.{module}"), name)
