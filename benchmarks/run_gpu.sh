#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA device and PyTorch:
# the CUDA-marked tests, then bench_adapters.py and bench_convnext.py on the
# device (absolute times beside PEFT's). Output goes to ${OUT:-gpu_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    | tee -a "$out/device.txt"
python3 -m pytest tests/test_gpu.py tests/test_flora_cuda.py tests/test_flora_grouped.py \
    -o addopts="" -p no:cacheprovider -q -rs 2>&1 | tee "$out/gpu_tests.txt"
python3 benchmarks/bench_adapters.py --device cuda 2>&1 | tee "$out/bench_adapters_cuda.txt"
python3 benchmarks/bench_convnext.py --device cuda 2>&1 | tee "$out/bench_convnext_cuda.txt"
