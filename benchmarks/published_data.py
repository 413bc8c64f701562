"""Published end-to-end GPU serving measurements the simulator is validated against (data only).

Each ``Case`` is one published figure set: the engine, model, card, TP, precision, input/output lengths,
load (all requests at once, or a closed loop of ``concurrency`` users) and the published metrics.
``SOURCES`` says where each came from; ``HELD_OUT`` names the source nothing in the simulator was fitted
or tuned to (``docs/sim.md``, "Validation").
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    date: str
    engine: str
    notes: str = ""


SOURCES = {
    "trtllm": Source(
        "TensorRT-LLM performance overview (v1.0 docs), trtllm-bench throughput, PyTorch backend",
        "https://github.com/NVIDIA/TensorRT-LLM/blob/00f37686aa854010d68bcbd0f4ab000221541ca6/"
        "docs/source/performance/perf-overview.md", "2025-08", "trtllm",
        "every request queued at once; ModelOpt FP8 checkpoints; total output tokens/s of the TP group"),
    "vllm": Source(
        "vLLM performance benchmark (Buildkite), latency tests: benchmark_latency.py, batch 8, 32 in / 128 out",
        "https://buildkite.com/vllm/performance-benchmark/builds/9515", "2024 (build 9515)", "vllm",
        "mean end-to-end latency of a batch of 8 requests (LLM.generate), bf16, CUDA graphs; H200"),
    "nim": Source(
        "NVIDIA NIM for LLMs benchmarking guide, Performance: Llama-3.3-70B-Instruct NIM 1.8.0, 2 x H100 80G, "
        "fp8, TP2", "https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance.md", "2025", "nim",
        "AIPerf/genai-perf closed loop at each concurrency; mean TTFT, mean ITL, output tokens/s"),
    "deepseek": Source(
        "DeepSeek-V3/R1 inference system overview (open-infra-index, day 6): per-H800-node throughput",
        "https://github.com/deepseek-ai/open-infra-index/blob/main/202502OpenSourceWeek/"
        "day_6_one_more_thing_deepseekV3R1_inference_system_overview.md", "2025-03-01", "deepseek",
        "decode EP144 at 20-22 tok/s per user, mean KV length 4989: 14.8k output tok/s per node; prefill EP32, "
        "56.3% of input tokens cache hits: 73.7k input tok/s per node (incl. hits); FP8 GEMMs and dispatch, "
        "two micro-batches overlapping communication; MTP not modelled here"),
}
HELD_OUT = "nim"

# DeepSeek's published per-node figures (H800 nodes of 8): computed from the perf model alone (the
# step that meets the per-user speed, or the published prefill layout), no simulation run
DEEPSEEK = {"decode": {"ep": 144, "context": 4989, "tpot_s": 1 / 21, "published_tps_node": 14800},
            "prefill": {"ep": 32, "prompt": 4096, "hit": 0.563, "prompts_per_card": 16,
                        "published_tps_node": 73700}}


@dataclass(frozen=True)
class Case:
    source: str
    model: str
    card: str
    tp: int
    precision: str
    isl: int
    osl: int
    published: dict[str, float]  # output_tps (tokens/s), ttft_ms, itl_ms (= TPOT), e2e_ms
    concurrency: int | None = None  # closed loop; None: every request at t=0
    num_requests: int | None = None
    limits: dict = field(default_factory=dict)  # scheduler settings the engine ran with


# -- TensorRT-LLM perf overview: (model, card, tp) -> {(ISL, OSL): total output tokens/s} ----------------
TRTLLM_REQUESTS = {(128, 128): 30000, (128, 2048): 3000, (128, 4096): 1500, (1000, 2000): 1500,
                   (2048, 128): 3000, (2048, 2048): 1500, (5000, 500): 1500, (1000, 1000): 3000, (500, 2000): 3000}
TRTLLM = {
    ("llama-3.1-8b", "h100-sxm", 1): {
        (128, 128): 28312, (128, 2048): 22714, (128, 4096): 14325, (500, 2000): 17660, (1000, 1000): 15220,
        (1000, 2000): 13899, (2048, 128): 3450, (2048, 2048): 9305, (5000, 500): 3459},
    ("llama-3.1-8b", "h200", 1): {
        (128, 128): 27911, (128, 2048): 26221, (128, 4096): 18027, (500, 2000): 20770, (1000, 1000): 17744,
        (1000, 2000): 16828, (2048, 128): 3538, (2048, 2048): 12194, (5000, 500): 3902},
    ("llama-3.1-70b", "h200", 1): {  # Llama 3.3 70B: Llama 3.1 70B's shape
        (128, 128): 3803, (128, 2048): 4336, (128, 4096): 2872, (500, 2000): 3666, (1000, 1000): 2909,
        (1000, 2000): 2994, (2048, 128): 442, (2048, 2048): 2003, (5000, 500): 566},
    ("llama-3.1-70b", "h100-sxm", 2): {
        (128, 128): 6378, (128, 2048): 6651, (128, 4096): 4199, (500, 2000): 5222, (1000, 1000): 4205,
        (1000, 2000): 4146, (2048, 128): 762, (2048, 2048): 3082, (5000, 500): 898},
}

CASES: list[Case] = [
    Case("trtllm", model, card, tp, "fp8", isl, osl, {"output_tps": tps}, num_requests=TRTLLM_REQUESTS[(isl, osl)])
    for (model, card, tp), table in TRTLLM.items() for (isl, osl), tps in table.items()
]

# -- vLLM dashboard latency tests (H200, bf16): batch 8 at t=0, 32 in, 128 out; vLLM 0.6-era defaults
_VLLM_LIMITS = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "enable_chunked_prefill": False}
CASES += [
    Case("vllm", "llama-3.1-8b", "h200", 1, "bf16", 32, 128, {"e2e_ms": 833.421}, num_requests=8,
         limits=_VLLM_LIMITS),
    Case("vllm", "llama-3.1-70b", "h200", 4, "bf16", 32, 128, {"e2e_ms": 2077.53}, num_requests=8,
         limits=_VLLM_LIMITS),  # Llama-3-70B: Llama 3.1 70B's shape
]

# -- NIM 1.8.0 (TensorRT-LLM engine), Llama-3.3-70B fp8 TP2 on 2 x H100: (concurrency, TTFT ms, ITL ms, tok/s)
_NIM_LIMITS = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "enable_chunked_prefill": True}
_NIM_5000_500 = [(1, 406.77, 18.58, 51.67), (5, 546.7, 21.83, 218.48), (25, 688.69, 38.75, 623.4),
                 (50, 834.51, 59.73, 814.37), (100, 7996.25, 92.91, 917.26), (150, 34794.22, 92.86, 920.9),
                 (200, 61680.22, 93.06, 920.54), (250, 88605.32, 93.2, 920.12)]
CASES += [Case("nim", "llama-3.1-70b", "h100-sxm", 2, "fp8", 5000, 500,
               {"ttft_ms": ttft, "itl_ms": itl, "output_tps": tps}, concurrency=c, limits=_NIM_LIMITS)
          for c, ttft, itl, tps in _NIM_5000_500]
CASES += [Case("nim", "llama-3.1-70b", "h100-sxm", 2, "fp8", 500, 2000,
               {"ttft_ms": 47.77, "itl_ms": 18.91, "output_tps": 52.85}, concurrency=1, limits=_NIM_LIMITS),
          Case("nim", "llama-3.1-70b", "h100-sxm", 2, "fp8", 500, 2000, {"ttft_ms": 126.53}, concurrency=5,
               limits=_NIM_LIMITS)]
