"""One entry point for weights: ``load_model(ModelConfig)`` picks the format (HF directory, GGUF file,
dummy), reads the architecture from the checkpoint's metadata and returns the model ready to run."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pdserve.config import ModelConfig
from pdserve.errors import ModelLoadError
from pdserve.model.arch import BUILTIN_ARCHS, ModelArch
from pdserve.model.dummy import dummy_arch, load_dummy
from pdserve.model.gguf_loader import gguf_arch, iter_gguf_weights, open_gguf
from pdserve.model.hf_loader import hf_arch, iter_safetensors_weights
from pdserve.model.llama import LlamaForCausalLM
from pdserve.model.quant_weight import GGUF_KEPT_TYPES, QUANTIZE_TYPES, quantize_matrices
from pdserve.model.registry import KNOWN_MODELS, checkpoint_path, resolve_model_path
from pdserve.progress import report_stage

logger = logging.getLogger(__name__)

__all__ = ["load_model", "resolve_device", "resolve_dtype", "resolve_model_path", "detect_format",
           "checkpoint_path"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bfloat16 on accelerators and on CPUs with bfloat16 arithmetic (AVX512-BF16 or AMX: 2x
    float32's GEMM rate, half the bytes), float32 on other CPUs (bfloat16 is emulated there, slower)."""
    if name == "auto":
        if torch.device(device).type != "cpu":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_bfloat16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {tuple(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def cpu_has_bfloat16() -> bool:
    """Native bfloat16 dot products on this CPU (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _return_freed_memory() -> None:
    """Hand the heap memory that loading freed back to the OS (glibc's malloc_trim; a no-op elsewhere).
    Loading allocates and frees one tensor's temporaries after another (dequantization, the quantized
    weights' repacking): measured ~190 MiB of them left resident after loading the default model."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_quantization(name: str, device: torch.device) -> str:
    """``none`` where quantized weights cannot run (not the CPU, or its kernels are off or failed to
    build: said once), else ``name``."""
    from pdserve.kernels import cpu_ops

    if name == "none":
        return name
    if device.type != "cpu":
        if name != "auto":
            raise ModelLoadError(f"quantization={name} runs on the CPU only (device {device})")
        return "none"
    if cpu_ops() is None:
        logger.warning("quantization=%s needs the CPU kernels (unavailable): weights are dequantized at load", name)
        return "none"
    return name


def detect_format(model_config: ModelConfig) -> str:
    """``hf``, ``gguf`` or ``dummy``: the config's own choice, else what the path holds."""
    if model_config.load_format != "auto":
        return model_config.load_format
    path = checkpoint_path(model_config.model)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if path.is_file():
        raise ModelLoadError(f"{path}: not a .gguf file (expected a GGUF file or a folder with config.json)")
    if model_config.model in KNOWN_MODELS:
        raise ModelLoadError(f"model {model_config.model!r} is not downloaded yet ({path} missing): "
                             "run `pdserve pull`")
    hint = f"; dummy weights exist for {', '.join(BUILTIN_ARCHS)} (load_format=dummy)" \
        if not path.exists() else ""
    raise ModelLoadError(f"model not found: {model_config.model!r} is neither a known name "
                         f"({', '.join(KNOWN_MODELS)}), a .gguf file nor a folder with config.json{hint}")


def load_model(model_config: ModelConfig, max_model_len: int | None = None
               ) -> tuple[LlamaForCausalLM, ModelArch]:
    """Build and fill the model on the configured device and dtype. ``max_model_len`` (else the config's,
    else the checkpoint's context length) sizes the RoPE tables. Raises ModelLoadError on any problem
    with the checkpoint."""
    device = resolve_device(model_config.device)
    dtype = resolve_dtype(model_config.dtype, device)
    max_len = max_model_len or model_config.max_model_len
    fmt = detect_format(model_config)
    quantization = resolve_quantization(model_config.quantization, device)
    if device.type == "cpu":
        _prepare_cpu_kernels()
    start = time.perf_counter()
    if fmt == "dummy":
        arch = dummy_arch(model_config.model)
        model = load_dummy(arch, dtype, device, model_config.seed, max_len)
    elif fmt == "gguf":
        path = checkpoint_path(model_config.model)
        reader = open_gguf(path)
        arch = gguf_arch(reader)
        model = LlamaForCausalLM(arch, dtype, device, max_len)
        keep = GGUF_KEPT_TYPES if quantization == "auto" else \
            (QUANTIZE_TYPES[quantization],) if quantization in QUANTIZE_TYPES else ()
        model.load_weights(quantize_matrices(iter_gguf_weights(reader, arch, keep), quantization))
    elif fmt == "hf":
        path = checkpoint_path(model_config.model)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no config.json (load_format=hf needs a Hugging Face folder)")
        arch = hf_arch(path)
        model = LlamaForCausalLM(arch, dtype, device, max_len)
        model.load_weights(quantize_matrices(iter_safetensors_weights(path, device), quantization))
    else:
        raise ModelLoadError(f"unknown load_format {fmt!r}")
    if fmt == "dummy" and quantization in QUANTIZE_TYPES:
        model.load_weights(quantize_matrices(model.checkpoint_weights(), quantization))
    model.pack_weights()
    _return_freed_memory()
    if max_len and max_len > arch.max_position_embeddings:
        logger.warning("max_model_len %d exceeds the model's context length %d", max_len,
                       arch.max_position_embeddings)
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, %s, %.1fM params, %s on %s, weights %s) in %.2f s", model_config.model, fmt,
                arch.architecture, arch.num_params() / 1e6, dtype, device, model.weight_formats(), seconds)
    report_stage("weights", seconds=round(seconds, 2), num_params=arch.num_params())
    return model.eval(), arch


def _prepare_cpu_kernels() -> None:
    """Build (or load the cached build of) the CPU kernels now, not inside the first request's step: a
    build takes up to a minute, and a worker in the middle of one cannot answer its frontend."""
    from pdserve.kernels import cpu_ops

    start = time.perf_counter()
    ok = cpu_ops() is not None
    report_stage("kernels", ok=ok, seconds=round(time.perf_counter() - start, 2))
