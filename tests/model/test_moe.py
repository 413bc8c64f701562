"""Mixtures of experts (Qwen3-MoE, Mixtral, Qwen2-MoE): the grouped expert computation against a per-token
reference, the config fields (from config.json and from GGUF metadata), checkpoints in both expert layouts,
what is refused, and the engine's greedy tokens against transformers with chunked prefill and prefix-cache
hits, from safetensors and GGUF. (Logits of every tiny variant against transformers are in
test_model_vs_transformers.py, which runs the MoE variants of ``TINY_VARIANTS`` too, as safetensors and as
GGUF of several types.)"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.core import EngineCore
from pdserve.errors import ModelLoadError
from pdserve.model.arch import BUILTIN_ARCHS, ModelArch
from pdserve.model.dummy import load_dummy
from pdserve.model.loader import load_model
from pdserve.model.moe import grouped_experts, route
from pdserve.sampling_params import SamplingParams
from model_helpers import hf_logits, prefill_logits, write_tiny_gguf

PROMPT = [1, 17, 45, 99, 3, 150, 8, 23, 77, 5, 64, 120, 9, 31, 2, 88, 42, 13, 100, 7]


def _per_token_reference(h, w13, w2, weights, ids):
    """The textbook loop: for each token, for each of its experts, add the weighted expert output."""
    inter = w2.shape[2]
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate, up = w13[e, :inter] @ h[t], w13[e, inter:] @ h[t]
            out[t] += w * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 33])
@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, True), (3, False)])
def test_grouped_experts_match_per_token_reference(num_tokens, top_k, renormalize):
    torch.manual_seed(num_tokens * 10 + top_k)
    num_experts, hidden, inter = 6, 16, 12
    h = torch.randn(num_tokens, hidden)
    w13, w2 = torch.randn(num_experts, 2 * inter, hidden), torch.randn(num_experts, hidden, inter)
    gate = torch.randn(num_experts, hidden)
    gate[4] = -100.0 * h.mean(0) / h.mean(0).norm()  # expert 4 gets (almost surely) no tokens: skipped
    logits = h @ gate.T  # (T, E)
    weights, ids = route(logits, top_k, renormalize)
    assert ids.shape == (num_tokens, top_k) and (ids.unique().numel() <= num_experts)
    probs = torch.softmax(logits, dim=-1)
    top = probs.topk(top_k, dim=-1)
    expected_w = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
    torch.testing.assert_close(weights, expected_w)
    assert torch.equal(ids, top.indices)
    if num_tokens > 1:
        assert 4 not in ids.tolist()
    got = grouped_experts(h, w13, w2, weights, ids)
    torch.testing.assert_close(got, _per_token_reference(h, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


def test_grouped_experts_with_tokens_all_on_one_expert():
    torch.manual_seed(0)
    h = torch.randn(5, 8)
    w13, w2 = torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    ids = torch.full((5, 1), 2)
    weights = torch.rand(5, 1)
    torch.testing.assert_close(grouped_experts(h, w13, w2, weights, ids),
                               _per_token_reference(h, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


def test_arch_reads_moe_fields(tiny_models):
    a = ModelArch.from_hf_config(json.loads((tiny_models["qwen3-moe"].hf_dir / "config.json").read_text()))
    assert (a.num_experts, a.num_experts_per_tok, a.moe_intermediate_size, a.norm_topk_prob) == (8, 2, 32, True)
    assert [a.is_moe_layer(i) for i in range(3)] == [True, False, True]  # mlp_only_layers=[1]
    step = ModelArch.from_hf_config(json.loads((tiny_models["qwen3-moe-step"].hf_dir / "config.json").read_text()))
    assert [step.is_moe_layer(i) for i in range(2)] == [False, True]  # decoder_sparse_step=2
    assert not step.norm_topk_prob and step.num_experts_per_tok == 3
    mix = ModelArch.from_hf_config(json.loads((tiny_models["mixtral"].hf_dir / "config.json").read_text()))
    assert mix.norm_topk_prob and mix.moe_intermediate_size == 48 and mix.num_moe_layers == 2
    q2 = ModelArch.from_hf_config(json.loads((tiny_models["qwen2-moe"].hf_dir / "config.json").read_text()))
    assert q2.shared_expert_intermediate_size == 48 and q2.attention_bias and not q2.qk_norm
    assert [q2.is_moe_layer(i) for i in range(3)] == [False, True, True]
    # the hub's Qwen3-MoE config.json says num_experts (transformers 5 writes num_local_experts)
    hub = dict(model_type="qwen3_moe", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
               num_attention_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4)
    assert ModelArch.from_hf_config(hub).num_experts == 4 and ModelArch.from_hf_config(hub).qk_norm


def test_builtin_moe_sizes():
    # published: Qwen3-30B-A3B 30.5B total, 3.3B active; Mixtral 8x7B 46.7B total, 12.9B active
    q, m = BUILTIN_ARCHS["qwen3-30b-a3b"], BUILTIN_ARCHS["mixtral-8x7b"]
    assert abs(q.num_params() / 1e9 - 30.53) < 0.01 and abs(q.num_active_params() / 1e9 - 3.35) < 0.01
    assert abs(m.num_params() / 1e9 - 46.70) < 0.01 and abs(m.num_active_params() / 1e9 - 12.88) < 0.01
    assert q.kv_bytes_per_token(torch.bfloat16) == 2 * 48 * 4 * 128 * 2  # experts change no KV


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(shared_expert_intermediate_size=64), "shared experts"),  # Qwen2-MoE's field, on a Qwen3-MoE
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
])
def test_unsupported_moe_configs_fail_clearly(bad, message):
    config = dict(model_type="qwen3_moe", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=4)
    with pytest.raises(ModelLoadError, match=message):
        ModelArch.from_hf_config({**config, **bad})


def test_moe_quantization_is_refused(tiny_models):
    with pytest.raises(ModelLoadError, match="mixture-of-experts"):
        load_model(ModelConfig(model=str(tiny_models["qwen3-moe"].hf_dir), dtype="float32", device="cpu",
                               quantization="int8"))


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral", "qwen2-moe"])
def test_gguf_moe_arch_matches_config(tiny_models, tmp_path, name):
    """A GGUF written as llama.cpp's converter writes it (its expert tensors at the shapes llama.cpp loads:
    ne = {hidden, moe_intermediate, num_experts} for gate and up) reads as the same architecture as the
    config.json: the MoE fields from metadata, the dense layers from where routers are missing."""
    import gguf

    tiny = tiny_models[name]
    path = tmp_path / f"{name}.gguf"
    write_tiny_gguf(tiny, path)
    reader = gguf.GGUFReader(path)
    hf = ModelArch.from_hf_config(json.loads((tiny.hf_dir / "config.json").read_text()))
    ours = ModelArch.from_gguf(reader)
    assert replace(ours, rms_norm_eps=hf.rms_norm_eps) == hf  # GGUF stores eps as float32
    layer = next(i for i in range(hf.num_layers) if hf.is_moe_layer(i))
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    inter, hidden = hf.moe_intermediate_size, hf.hidden_size
    assert shapes[f"blk.{layer}.ffn_gate_exps.weight"] == [hidden, inter, hf.num_experts]
    assert shapes[f"blk.{layer}.ffn_down_exps.weight"] == [inter, hidden, hf.num_experts]


def test_gguf_moe_norm_topk_prob(tiny_models, tmp_path):
    """Qwen3-MoE GGUFs do not carry norm_topk_prob: llama.cpp renormalizes, so does pdserve, unless the file
    says otherwise (``expert_weights_norm``). The variant that does not renormalize matches transformers
    only when its file says so."""
    tiny = tiny_models["qwen3-moe-step"]
    assert not tiny.hf_model.config.norm_topk_prob
    plain, explicit = tmp_path / "plain.gguf", tmp_path / "explicit.gguf"
    write_tiny_gguf(tiny, plain)
    write_tiny_gguf(tiny, explicit, add_fields=lambda w: w.add_expert_weights_norm(False))
    _, arch = load_model(ModelConfig(model=str(plain), dtype="float32", device="cpu"))
    assert arch.norm_topk_prob
    model, arch = load_model(ModelConfig(model=str(explicit), dtype="float32", device="cpu"))
    assert not arch.norm_topk_prob and arch.dense_mlp_layers == (0,)
    ours, ref = prefill_logits(model, PROMPT), hf_logits(tiny.hf_model, PROMPT)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def _gating_sigmoid(w):
    import gguf

    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


@pytest.mark.parametrize("name, add_fields, extra, quantization, message", [
    ("qwen3-moe", _gating_sigmoid, {}, "auto", "gating function SIGMOID"),
    ("mixtral", lambda w: w.add_expert_weights_scale(2.5), {}, "auto", "weights scale"),
    ("qwen3-moe", None, {"blk.0.ffn_gate_shexp.weight": np.zeros((16, 64), np.float32)}, "auto",
     "shared experts"),
    ("qwen3-moe", None, {}, "int8", "mixture-of-experts"),
])
def test_gguf_moe_unsupported_fails_clearly(tiny_models, tmp_path, name, add_fields, extra, quantization,
                                            message):
    """What GGUF MoE files can ask for that pdserve does not do: routing other than softmax, scaled routed
    weights, shared experts outside Qwen2-MoE, quantized experts."""
    path = tmp_path / "moe.gguf"
    write_tiny_gguf(tiny_models[name], path, add_fields=add_fields, extra_tensors=extra)
    with pytest.raises(ModelLoadError, match=message):
        load_model(ModelConfig(model=str(path), dtype="float32", device="cpu", quantization=quantization))


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral", "qwen2-moe"])
def test_stacked_expert_checkpoint_loads(tiny_models, tmp_path, name):
    """transformers' in-memory layout (``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj``,
    Mixtral's router under ``mlp.gate``) written as it is: the same logits as the per-expert hub files."""
    from safetensors.torch import save_file

    tiny = tiny_models[name]
    state = {k: v.contiguous() for k, v in tiny.hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    if tiny.hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny.hf_dir / "config.json").read_text())
    model, _ = load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu"))
    torch.testing.assert_close(prefill_logits(model, PROMPT), hf_logits(tiny.hf_model, PROMPT), atol=1e-4, rtol=1e-4)


def test_missing_expert_tensor_is_named(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny = tiny_models["qwen3-moe"]
    state = load_file(str(tiny.hf_dir / "model.safetensors"))
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny.hf_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"layers\.2\.mlp\.experts\.5\.up_proj"):
        load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu"))


def test_dummy_weights_at_moe_shapes(tiny_models):
    model, arch = load_model(ModelConfig(model=str(tiny_models["qwen3-moe"].hf_dir), load_format="dummy",
                                         dtype="bfloat16", device="cpu", seed=1))
    # 11 Linear, the embedding, 2 x 2 expert stacks
    assert arch.num_experts == 8 and model.weight_formats() == "bfloat16 x16"
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    assert torch.isfinite(prefill_logits(model, PROMPT)).all()
    # a real MoE's widths at reduced depth, as the throughput benchmark builds it
    wide = replace(BUILTIN_ARCHS["qwen3-30b-a3b"], num_layers=1, vocab_size=1024)
    model = load_dummy(wide, torch.bfloat16, "cpu", max_model_len=64)
    assert model.layers[0].mlp.w13.shape == (128, 2 * 768, 2048)
    assert sum(p.numel() for p in model.parameters()) == wide.num_params()
    assert torch.isfinite(prefill_logits(model, [1, 2, 3])).all()


# ---- the engine: greedy tokens against transformers' -----------------------------------------------

NUM_NEW = 10
PROMPTS = [PROMPT, PROMPT[:5], PROMPT[3:17], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13], [42]]


def _reference_choices(hf_model, prompts, outputs):
    """transformers' greedy token at each output position, given the prompt and the outputs before it."""
    with torch.inference_mode():
        return [hf_model(torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1:].argmax(-1).tolist()
                for ids, out in zip(prompts, outputs)]


def _run(core: EngineCore, prompts, tag: str):
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    for i, ids in enumerate(prompts):
        core.add_request(f"{tag}{i}", ids, params)
    tokens = {f"{tag}{i}": [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
        core.scheduler.check_integrity()
    return [tokens[f"{tag}{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral", "qwen2-moe"])
def test_engine_greedy_matches_transformers_with_chunks_and_prefix_hits(tiny_models, tmp_path, name, fmt):
    """Prompts chunked at 8 tokens and batched with other requests' decodes; then the same prompts again,
    their full blocks now prefix-cache hits: every token is transformers' greedy choice (from the
    safetensors checkpoint, and from the same weights as an F32 GGUF)."""
    tiny = tiny_models[name]
    model_path = tiny.hf_dir
    if fmt == "gguf":
        model_path = tmp_path / f"{name}.gguf"
        write_tiny_gguf(tiny, model_path)
    core = EngineCore(EngineConfig(model=ModelConfig(str(model_path), dtype="float32", device="cpu"),
                                   cache=CacheConfig(block_size=4, num_blocks=64),
                                   scheduler=SchedulerConfig(max_num_batched_tokens=8)))
    first = _run(core, PROMPTS, "a")
    assert all(len(out) == NUM_NEW for out in first)
    assert first == _reference_choices(tiny.hf_model, PROMPTS, first)
    hits_before = core.kv.stats.num_hit_tokens
    assert _run(core, PROMPTS, "b") == first
    assert core.kv.stats.num_hit_tokens - hits_before >= len(PROMPT) // 4 * 4 - 4


def test_qwen2_moe_sliding_layers_follow_transformers():
    """Without ``layer_types`` in config.json, Qwen2-MoE windows the layers transformers 5 does."""
    import transformers

    fields = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=5, num_attention_heads=2,
                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4, use_sliding_window=True,
                  sliding_window=6, max_window_layers=3)
    expected = tuple(t == "sliding_attention" for t in transformers.Qwen2MoeConfig(**fields).layer_types)
    arch = ModelArch.from_hf_config(dict(model_type="qwen2_moe", **fields))
    assert arch.sliding_window == 6 and arch.sliding_layers == expected == (True, False, True, False, False)
