"""Single-request decode speed on the default model (a Q4_1 GGUF): pdserve with its weights kept quantized
(``--quantization auto``), pdserve dequantizing them at load (``none``, the baseline), and llama.cpp on the
same file with the same number of threads, in the same run, interleaved; medians of ``--repeats`` runs.

Each run: one request, a random ``--input-len``-token prompt, ``--output-len`` tokens greedy (EOS
ignored); decode tokens/s = (output_len - 1) / (time of the whole request - time of a 1-token request).
llama.cpp is driven through llama-cpp-python (PyPI), in its own environment so that it is no dependency
of pdserve; install it once (it compiles llama.cpp for this CPU, a few minutes):

    python3 -m venv /tmp/llamacpp-venv && CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llamacpp-venv/bin/pip install llama-cpp-python
    .venv/bin/python benchmarks/single_decode.py [--llama-cpp-python /tmp/llamacpp-venv/bin/python] [--repeats 5]

Also prints the resident memory each pdserve engine adds to a fresh process by loading (weights and
tables, a 64 MiB KV cache).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time

import torch

from pdserve import LLM, SamplingParams
from pdserve.model.registry import resolve_model_path

_LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, prompt, out_len = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512, verbose=False)
def run(n):
    llm.reset()
    start = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
        if i + 1 == n:
            return time.perf_counter() - start
run(4)
print("ready", flush=True)
for _ in sys.stdin:
    one = run(1)
    print(json.dumps({"decode_tps": (out_len - 1) / (run(out_len) - one)}), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=129)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--llama-cpp-python", default="/tmp/llamacpp-venv/bin/python",
                    help="a Python with llama-cpp-python installed ('' to skip llama.cpp)")
    ap.add_argument("--out", help="write the figures to this JSON file")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    rng = random.Random(0)
    prompt = [rng.randint(1000, 48000) for _ in range(args.input_len)]
    path = resolve_model_path(args.model)
    print(f"model {path.name}, {threads} threads, prompt {args.input_len} tokens, {args.output_len} output tokens, "
          f"{args.repeats} runs each, interleaved")

    memory = {name: _memory_at_rest(args.model, name, args.dtype) for name in ("auto", "none")}
    for name, m in memory.items():
        print(f"pdserve --quantization {name}: weights {m['formats']}, {m['weight_bytes'] / 2**20:.0f} MiB; "
              f"{m['rss_bytes'] / 2**20:.0f} MiB resident at rest (fresh process, after loading, KV budget "
              f"{m['kv_bytes'] / 2**20:.0f} MiB)")
    engines = {name: LLM(args.model, quantization=name, dtype=args.dtype, kv_cache_memory="256MiB")
               for name in ("auto", "none")}
    llama = None
    if args.llama_cpp_python:
        llama = subprocess.Popen([args.llama_cpp_python, "-c", _LLAMA_CPP, str(path), str(threads), json.dumps(prompt),
                                  str(args.output_len)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert llama.stdout.readline().strip() == "ready", "llama.cpp did not start"

    results: dict[str, list[float]] = {"pdserve_quantized": [], "pdserve_dequantized": [], "llama_cpp": []}
    for name, llm in engines.items():  # warm-up
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for _ in range(args.repeats):
        for name, llm in engines.items():
            key = "pdserve_quantized" if name == "auto" else "pdserve_dequantized"
            results[key].append(_pdserve_decode_tps(llm, prompt, args.output_len))
        if llama is not None:
            llama.stdin.write("go\n")
            llama.stdin.flush()
            results["llama_cpp"].append(json.loads(llama.stdout.readline())["decode_tps"])
    if llama is not None:
        llama.stdin.close()
        llama.wait()

    med = {k: statistics.median(v) for k, v in results.items() if v}
    for key, runs in results.items():
        if runs:
            print(f"{key}: {med[key]:.1f} tokens/s (median; best {max(runs):.1f}; runs "
                  f"{', '.join(f'{r:.1f}' for r in runs)})")
    print(f"ratio quantized / dequantized: {med['pdserve_quantized'] / med['pdserve_dequantized']:.2f}x")
    if "llama_cpp" in med:
        print(f"ratio quantized / llama.cpp: {med['pdserve_quantized'] / med['llama_cpp']:.2f}x (medians), "
              f"{max(results['pdserve_quantized']) / max(results['llama_cpp']):.2f}x (best runs)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": results, "medians": med, "threads": threads, "memory": memory}, f, indent=2)


_MEMORY = r"""
import json, os, sys, psutil
from pdserve import LLM
rss = psutil.Process(os.getpid()).memory_info().rss
llm = LLM(sys.argv[1], quantization=sys.argv[2], dtype=sys.argv[3], kv_cache_memory="64MiB")
model, engine = llm.engine.model, llm.engine
print(json.dumps({"rss_bytes": psutil.Process(os.getpid()).memory_info().rss - rss, "formats": model.weight_formats(),
                  "weight_bytes": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
                  "kv_bytes": engine.kv_cache.numel() * engine.kv_cache.element_size()}))
"""


def _memory_at_rest(model: str, quantization: str, dtype: str) -> dict:
    """Resident memory an engine adds to a fresh process by loading (weights, tables, a 64 MiB KV cache)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY, model, quantization, dtype], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _pdserve_decode_tps(llm: LLM, prompt: list[int], output_len: int) -> float:
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1))
    one = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    return (output_len - 1) / (time.perf_counter() - start - one)


if __name__ == "__main__":
    sys.exit(main())
