import json

import pytest

from pdserve.sim.hardware import get_hardware, load_catalogue
from pdserve.sim.models import CATALOGUE, from_hf_config, get_model

REQUIRED_HARDWARE = ("h100-sxm", "h200", "a100-80gb", "l40s", "b200", "ascend-910b", "domestic-card",
                     "cpu-this-machine")


def test_catalogue_has_required_entries_with_sources():
    cat = load_catalogue()
    for name in REQUIRED_HARDWARE:
        hw = cat[name]
        assert hw.flops("bf16") > 0 and hw.memory_bw > 0 and hw.memory_bytes > 0
        assert hw.price_source and hw.price_date and hw.power_w > 0
    assert cat["domestic-card"].placeholder
    assert cat["cpu-this-machine"].calibrated
    assert cat["h100-sxm"].tflops["bf16"] == 989 and cat["h100-sxm"].memory_bw_tbs == 3.35


def test_missing_precision_falls_back_to_bf16_rate():
    a100 = get_hardware("a100-80gb")
    assert a100.flops("fp8") == a100.flops("bf16")


def test_unknown_hardware_and_bad_file(tmp_path):
    with pytest.raises(ValueError, match="known"):
        get_hardware("tpu-v9")
    bad = tmp_path / "hw.yaml"
    bad.write_text("hardware:\n  x: {tflops: {fp8: 1}, memory_gb: 1, memory_bw_tbs: 1, intra_node_gbs: 1, "
                   "inter_node_gbs: 1}\n")
    with pytest.raises(ValueError, match="bf16"):
        load_catalogue(bad)


@pytest.mark.parametrize("name,total_b,active_b", [
    ("llama-3.1-8b", 8.03, 8.03), ("llama-3.1-70b", 70.6, 70.6), ("qwen3-8b", 8.2, 8.2),
    ("qwen3-32b", 32.8, 32.8), ("qwen3-235b-a22b", 235, 22), ("deepseek-v3", 671, 37),
    ("gpt-oss-120b", 116.8, 5.7), ("smollm2-135m", 0.135, 0.135),
])
def test_parameter_counts_match_published_sizes(name, total_b, active_b):
    m = CATALOGUE[name]
    assert m.num_params / 1e9 == pytest.approx(total_b, rel=0.02)
    assert m.num_active_params / 1e9 == pytest.approx(active_b, rel=0.03)


def test_mla_kv_cache_is_the_latent():
    m = get_model("deepseek-ai/DeepSeek-V3")
    assert m.kv_bytes_per_token(2) == 61 * (512 + 64) * 2
    assert get_model("llama-3.1-8b").kv_bytes_per_token(2) == 32 * 2 * 8 * 128 * 2


def test_hf_config_json(tmp_path):
    cfg = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30,
           "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = get_model(str(tmp_path))
    assert m.num_params == from_hf_config(tmp_path / "config.json").num_params == CATALOGUE["smollm2-135m"].num_params
    with pytest.raises(ValueError, match="unknown model"):
        get_model(str(tmp_path / "nope"))


def test_hf_config_json_qwen2_moe_shared_expert(tmp_path):
    """Qwen1.5-MoE-A2.7B's config.json: its one shared expert is 4 routed experts wide, so the model has
    14.3B parameters as published, not 13.3B without it."""
    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 2048, "num_attention_heads": 16,
           "num_key_value_heads": 16, "num_hidden_layers": 24, "intermediate_size": 5632,
           "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
           "num_experts_per_tok": 4, "vocab_size": 151936, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = from_hf_config(tmp_path / "config.json")
    assert m.num_shared_experts == 4 and m.num_params == pytest.approx(14.3e9, rel=0.01)
