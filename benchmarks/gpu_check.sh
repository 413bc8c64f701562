#!/usr/bin/env bash
# The prepared GPU check (run on a CUDA machine, after `make venv`): the model tests on CUDA, then
# prefill and decode throughput at Llama-3.1-8B shapes with random weights (batch 1, 16, 64) beside
# transformers on the same GPU, then the served check: 1 prefill + 1 decode worker on this GPU (KV by CUDA
# IPC, layer-wise and whole, and by TCP through pinned memory), the openai client's greedy output against
# the offline engine's, and the KV transfer bandwidth (benchmarks/gpu_served_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'
"$py" -m pytest -q -m gpu tests
"$py" -m pytest -q tests/model -k "vs_transformers"
"$py" benchmarks/gpu_throughput.py --model llama-3.1-8b --batches 1,16,64 "$@"
"$py" benchmarks/gpu_served_check.py
