"""Random weights for a known shape or a config.json: benchmarks and the simulator's calibration runs
without a checkpoint. Allocated in the target dtype on the target device, never via float32 copies."""
from __future__ import annotations

from pathlib import Path

import torch

from pdserve.errors import ModelLoadError
from pdserve.model.arch import BUILTIN_ARCHS, ModelArch
from pdserve.model.hf_loader import hf_arch
from pdserve.model.llama import LlamaForCausalLM


def dummy_arch(name: str) -> ModelArch:
    """A built-in shape (``llama-3.1-8b``, ``llama-3.1-70b``, ``qwen3-8b``, ``smollm2-135m``, ...) or the
    architecture of a Hugging Face directory / config.json path."""
    if name in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[name]
    path = Path(name).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if (path / "config.json").is_file():
        return hf_arch(path)
    raise ModelLoadError(f"dummy weights need a built-in name ({', '.join(BUILTIN_ARCHS)}) or a folder with "
                         f"config.json; got {name!r}")


def load_dummy(arch: ModelArch, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
               max_model_len: int | None = None, std: float = 0.02) -> LlamaForCausalLM:
    model = LlamaForCausalLM(arch, dtype, device, max_model_len)
    model.init_dummy_weights(seed, std)
    return model.eval()
