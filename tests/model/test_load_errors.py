"""Every checkpoint problem is a ModelLoadError that names the file or tensor."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_helpers import write_tiny_gguf
from pdserve.config import ModelConfig
from pdserve.errors import ModelLoadError
from pdserve.model.loader import load_model


def _load(path, **kw):
    return load_model(ModelConfig(model=str(path), device="cpu", **kw))


def test_unknown_path(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found.*nope"):
        _load(tmp_path / "nope")


def test_known_name_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="pdserve pull"):
        _load("smollm2-135m")


def test_truncated_gguf(tiny_models, tmp_path):
    full = tmp_path / "full.gguf"
    write_tiny_gguf(tiny_models["llama"], full)
    data = full.read_bytes()
    for cut in (len(data) // 2, 100, len(data) - 64):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=f"cut{cut}.gguf"):
            _load(bad)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="junk.gguf"):
        _load(bad)


def _copy_hf(tiny, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny.hf_dir, d)
    return d, load_file(d / "model.safetensors")


def test_missing_tensor_safetensors(tiny_models, tmp_path):
    d, tensors = _copy_hf(tiny_models["llama"], tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        _load(d)


def test_unexpected_tensor_safetensors(tiny_models, tmp_path):
    d, tensors = _copy_hf(tiny_models["llama"], tmp_path)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"unexpected tensor.*self_attn\.extra\.weight"):
        _load(d)


def test_wrong_shape_safetensors(tiny_models, tmp_path):
    d, tensors = _copy_hf(tiny_models["llama"], tmp_path)
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*shape"):
        _load(d)


def test_sharded_safetensors(tiny_models, tmp_path):
    d, tensors = _copy_hf(tiny_models["llama"], tmp_path)
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, group in shards.items():
        save_file({n: tensors[n] for n in group}, d / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = _load(d, dtype="float32")
    torch.testing.assert_close(model.norm.weight, tensors["model.norm.weight"])
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002"):
        _load(d)


def test_missing_and_unexpected_tensor_gguf(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    missing = tmp_path / "missing.gguf"
    write_tiny_gguf(tiny, missing, drop=("model.layers.0.self_attn.v_proj.weight",))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight"):
        _load(missing)
    extra = tmp_path / "extra.gguf"
    import numpy as np

    write_tiny_gguf(tiny, extra, extra_tensors={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(ModelLoadError, match=r"blk\.0\.mystery\.weight"):
        _load(extra)


def test_unsupported_architecture(tiny_models, tmp_path):
    d, _ = _copy_hf(tiny_models["llama"], tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="gpt2"):
        _load(d)
