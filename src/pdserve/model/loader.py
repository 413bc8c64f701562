"""One entry point for weights: ``load_model(ModelConfig)`` picks the format (HF directory, GGUF file,
dummy), reads the architecture from the checkpoint's metadata and returns the model ready to run."""
from __future__ import annotations

import logging
import time

import torch

from pdserve.config import ModelConfig
from pdserve.devices import DeviceBackend, backend_for_device, resolve_backend
from pdserve.devices.builtin import cpu_has_bfloat16
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
           "checkpoint_path", "cpu_has_bfloat16"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``--device``'s value as the torch device to run on (``auto``: the available backend of highest
    priority, cuda before cpu; see ``pdserve.devices``). DeviceError for an unknown or unavailable one."""
    return resolve_backend(name)[1]


def resolve_dtype(name: str, device: DeviceBackend | torch.device | str) -> torch.dtype:
    """``auto``: the device backend's default (bfloat16 on accelerators and on CPUs with bfloat16 arithmetic:
    AVX512-BF16 or AMX, 2x float32's GEMM rate, half the bytes; float32 on other CPUs, where bfloat16 is
    emulated, slower). ``device``: a backend, or a torch device (its type's backend)."""
    backend = device if isinstance(device, DeviceBackend) else backend_for_device(device)
    if name == "auto":
        return backend.default_dtype()
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {tuple(_DTYPES)}, got {name!r}")
    if _DTYPES[name] not in backend.supported_dtypes():
        supported = ", ".join(str(d).removeprefix("torch.") for d in backend.supported_dtypes())
        raise ModelLoadError(f"dtype {name} is not supported on device {backend.name} (supported: {supported})")
    return _DTYPES[name]


def resolve_kv_dtype(name: str, model_dtype: torch.dtype, backend: DeviceBackend) -> torch.dtype:
    """The KV cache's dtype for ``--kv-cache-dtype``: ``auto`` the model's, ``fp8`` float8_e4m3fn (stored as
    is, no scales; read by pdserve's own attention, so not with a backend that brings its own)."""
    if name == "auto":
        return model_dtype
    if name != "fp8":
        raise ValueError(f"kv_cache_dtype must be auto or fp8, got {name!r}")
    if backend.attention() is not None:
        raise ModelLoadError(f"--kv-cache-dtype fp8: device {backend.name} brings its own attention, which "
                             "may not read a float8 cache; use --kv-cache-dtype auto")
    return torch.float8_e4m3fn


def _return_freed_memory() -> None:
    """Hand the heap memory that loading freed back to the OS (glibc's malloc_trim; a no-op elsewhere).
    Loading allocates and frees one tensor's temporaries after another (dequantization, the quantized
    weights' repacking): measured ~190 MiB of them left resident after loading the default model."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_quantization(name: str, backend: DeviceBackend) -> str:
    """``none`` where quantized weights cannot run (a backend without the CPU kernels, or the kernels are off
    or failed to build: said once), else ``name``."""
    from pdserve.kernels import cpu_ops

    if name == "none":
        return name
    if not backend.uses_cpu_kernels:
        if name != "auto":
            raise ModelLoadError(f"quantization={name} runs on the CPU only (device {backend.name})")
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
    backend, device = resolve_backend(model_config.device)
    dtype = resolve_dtype(model_config.dtype, backend)
    max_len = max_model_len or model_config.max_model_len
    fmt = detect_format(model_config)
    quantization = resolve_quantization(model_config.quantization, backend)
    if backend.uses_cpu_kernels:
        _prepare_cpu_kernels()
    start = time.perf_counter()
    if fmt == "dummy":
        arch = dummy_arch(model_config.model)
        _check_quantization(arch, quantization)
        model = load_dummy(arch, dtype, device, model_config.seed, max_len)
    elif fmt == "gguf":
        path = checkpoint_path(model_config.model)
        reader = open_gguf(path)
        arch = gguf_arch(reader)
        _check_quantization(arch, quantization)
        model = LlamaForCausalLM(arch, dtype, device, max_len)
        keep = GGUF_KEPT_TYPES if quantization == "auto" else \
            (QUANTIZE_TYPES[quantization],) if quantization in QUANTIZE_TYPES else ()
        model.load_weights(quantize_matrices(iter_gguf_weights(reader, arch, keep), quantization))
    elif fmt == "hf":
        path = checkpoint_path(model_config.model)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no config.json (load_format=hf needs a Hugging Face folder)")
        arch = hf_arch(path)
        _check_quantization(arch, quantization)
        model = LlamaForCausalLM(arch, dtype, device, max_len)
        model.load_weights(quantize_matrices(iter_safetensors_weights(path, device), quantization))
    else:
        raise ModelLoadError(f"unknown load_format {fmt!r}")
    if fmt == "dummy" and quantization in QUANTIZE_TYPES:
        model.load_weights(quantize_matrices(model.checkpoint_weights(), quantization))
    model.pack_weights()
    model.set_attention(backend.attention())
    _return_freed_memory()
    if max_len and max_len > arch.max_position_embeddings:
        logger.warning("max_model_len %d exceeds the model's context length %d", max_len,
                       arch.max_position_embeddings)
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, %s, %.1fM params, %s on %s, weights %s) in %.2f s", model_config.model, fmt,
                arch.architecture, arch.num_params() / 1e6, dtype, backend.label(device), model.weight_formats(),
                seconds)
    report_stage("weights", seconds=round(seconds, 2), num_params=arch.num_params())
    return model.eval(), arch


def _check_quantization(arch: ModelArch, quantization: str) -> None:
    if arch.num_experts and quantization in QUANTIZE_TYPES:
        raise ModelLoadError(f"quantization={quantization} is not supported for mixture-of-experts models "
                             f"({arch.architecture}): the expert weights run unquantized only")


def _prepare_cpu_kernels() -> None:
    """Build (or load the cached build of) the CPU kernels now, not inside the first request's step: a
    build takes up to a minute, and a worker in the middle of one cannot answer its frontend."""
    from pdserve.kernels import cpu_ops

    start = time.perf_counter()
    ok = cpu_ops() is not None
    report_stage("kernels", ok=ok, seconds=round(time.perf_counter() - start, 2))

