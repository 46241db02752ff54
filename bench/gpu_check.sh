#!/usr/bin/env bash
# Everything lmforge checks on a lent GPU, as one short script (the device is lent for ~15 minutes):
# the MFU benchmark at ~125M and ~1B as `train.compile=true` trains them, the same 125M with the
# loss left eager (the A/B of the compiled loss on the same card), `pytest -m gpu` (bf16/compile/
# checkpointing, fp16, DDP and FSDP2 on NCCL, compiled FlexAttention), then what is left if time
# allows: the BERT-base and T5-base recipes' throughput, 16-row micro-batches at 1B and a kernel
# profile of the 125M step (the last are cut first when a call's 10 minutes run out).
# Logs go to $OUT when it is set. ~6-7 minutes on an H200, compilation included (pytest ~3.5 of them).
# (32 rows at 125M ran slower than 16 over 60 steps, 38% against 40%; untested guess: its logits
# pass 2^31 elements, so the compiled loss indexes in 64 bits.)
#   bash bench/gpu_check.sh
set -u
out=${OUT:-/tmp/lmforge_gpu_check}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
mfu() {  # one bench run, its log kept whole in $out and its result lines shown
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 bench/gpu_mfu.py --steps 60 "$@" >"$out/$name.log" 2>&1
  echo "[$name, exit $?]"
  grep -E "^ *(125m|1b|bert-base|t5-base):|^device|busy|Error|error" "$out/$name.log" | grep -v Warning
}
mfu mfu_main 150
mfu mfu_eager_loss 60 --sizes 125m --eager-loss
timeout 240 python3 -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_gpu.py tests/test_flex.py \
  >"$out/pytest_gpu.log" 2>&1
echo "[pytest -m gpu, exit $?]"
tail -8 "$out/pytest_gpu.log"
mfu mfu_bert_t5 100 --sizes bert-base t5-base --steps 30
mfu mfu_1b_16rows 70 --sizes 1b --rows 16 --steps 30
mfu mfu_profile 60 --sizes 125m --profile
grep -A22 "busy" "$out/mfu_profile.log" | cut -c1-150
