#!/usr/bin/env bash
# Everything lmforge checks on a lent GPU, as one short script (the device is lent for ~15 minutes):
# the MFU benchmark at ~125M and ~1B, then `pytest -m gpu` (bf16/compile/checkpointing, fp16, DDP and
# FSDP2 on NCCL, compiled FlexAttention). Logs go to $OUT when it is set.
#   bash bench/gpu_check.sh
set -u
out=${OUT:-/tmp/lmforge_gpu_check}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 290 python3 bench/gpu_mfu.py --steps 20 2>&1 | tee "$out/gpu_mfu.log" | grep -v Warning
timeout 270 python3 -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_gpu.py tests/test_flex.py 2>&1 \
  | tee "$out/pytest_gpu.log" | tail -25
