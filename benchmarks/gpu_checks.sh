#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md ("GPU"), in one run on a CUDA machine.
# Usage: bash benchmarks/gpu_checks.sh PHANTOM_512_MRC OUT_DIR [DEADLINE_S] [FIT_MINUTES]
# Stages, each under its own timeout so that one failing stage does not stop the others: the Triton kernel
# tests on CUDA; benchmarks/throughput.py --device cuda; time to quality at the paper's scale (the 512 x 512 x
# 180 phantom, 61 tilts, 10 dB, paper profile and volume configuration) in fp32 and then, when time is left
# before DEADLINE_S (default 540 s), with mixed precision; each fit is capped at FIT_MINUTES (default 1.5).
# The numbers of docs/BENCHMARKS.md came from two runs on an H200 whose image lacked mrcfile, pydantic and
# starfile: their wheels were installed first (pip install --target, then PYTHONPATH), and the phantom
# (tomo_001_den.mrc.gz of shared/data/phantoms/polnet_512x512x180_1nm_seed512) was copied beside the repository.
set -u
phantom=$1
out=$2
deadline=${3:-540}
fit_minutes=${4:-1.5}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS
log="$out/log.txt"
stage() { echo "== $(( SECONDS - start )) s: $*" | tee -a "$log"; }

stage gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$log" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$log" 2>&1
stage kernel tests
timeout 120 python3 -m pytest -q -rs tests/test_triton_encoding.py tests/test_recon.py >> "$log" 2>&1
stage throughput
timeout 150 python3 benchmarks/throughput.py --device cuda > "$out/throughput.json" 2>> "$log"
for precision in fp32 mixed; do
  left=$(( deadline - (SECONDS - start) ))
  if (( left < 170 )); then stage "skip paper $precision: ${left} s left"; continue; fi
  stage "paper $precision, fit capped at $fit_minutes min"
  timeout $(( left - 5 )) python3 benchmarks/time_to_quality.py --device cuda --phantom "$phantom" --tilt-step 2 \
    --volume paper --precision "$precision" --epochs 400 --score-epochs 5,10,15,25,40,70 --minutes "$fit_minutes" \
    > "$out/ttq_paper_$precision.json" 2>> "$log"
done
stage done
