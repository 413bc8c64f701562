"""Weights from a Hugging Face directory: config.json plus *.safetensors (one file or sharded)."""
from __future__ import annotations

import json
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path

import torch

from pdserve.errors import ModelLoadError
from pdserve.model.arch import ModelArch


def hf_arch(path: str | Path) -> ModelArch:
    """The architecture from ``config.json``, eos ids extended by ``generation_config.json``'s."""
    path = Path(path)
    config = read_json(path / "config.json")
    arch = ModelArch.from_hf_config(config)
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        eos = read_json(gen_path).get("eos_token_id")
        extra = (eos,) if isinstance(eos, int) else tuple(eos or ())
        ids = tuple(dict.fromkeys(arch.eos_token_ids + tuple(int(e) for e in extra)))
        arch = replace(arch, eos_token_ids=ids)
    return arch


def safetensors_files(path: str | Path) -> list[Path]:
    """Shards named by ``model.safetensors.index.json``, else every ``*.safetensors`` in the folder."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
        result = [path / f for f in files]
        for f in result:
            if not f.is_file():
                raise ModelLoadError(f"{index} names missing shard {f.name}")
        return result
    result = sorted(path.glob("*.safetensors"))
    if not result:
        raise ModelLoadError(f"no *.safetensors files in {path}")
    return result


def iter_safetensors_weights(path: str | Path, device: torch.device | str = "cpu"
                             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one tensor at a time, read straight onto ``device``."""
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from e


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path} not found") from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
