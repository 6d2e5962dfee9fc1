#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md ("GPU"), in one run on a CUDA machine.
# Usage: bash benchmarks/gpu_checks.sh PHANTOM_512_MRC OUT_DIR [DEADLINE_S] [FIT_MINUTES]
# Stages, each under its own timeout so that one failing stage does not stop the others: the CUDA tests (Triton
# kernels against the PyTorch path, activation recomputation, no host synchronisation in a training step);
# benchmarks/local_field.py (separable local fields vs grid_sample, 61 tilts of 512 x 512); benchmarks/host_syncs.py (synchronisations per epoch: one band, bands, rays); benchmarks/band_memory.py (epoch
# time and peak memory by band size and recomputation, fp32 and mixed); time to quality at the paper's scale
# (the 512 x 512 x 180 phantom, 61 tilts, 10 dB, paper profile and volume configuration) with --max-memory 3.5
# (mixed), 4 (mixed, fp32) and without a budget (fp32; there also with --validation pass, for the effect of
# scoring the held-out pixels in the steps, and with --binned-epochs 0, for the effect of the binned epochs that
# are the default), each fit capped at FIT_MINUTES (default 0.55) and each
# stage run only while time is left before DEADLINE_S (default 560 s). With THROUGHPUT=1 in the environment,
# benchmarks/throughput.py --device cuda runs first.
# The machine's image lacked mrcfile, pydantic and starfile: their wheels were installed first (pip install
# --target, then PYTHONPATH), and the phantom (tomo_001_den.mrc.gz of
# shared/data/phantoms/polnet_512x512x180_1nm_seed512) was copied beside the repository. The numbers of
# docs/BENCHMARKS.md came from several runs of these stages (the device time of one session did not hold all).
set -u
phantom=$1
out=$2
deadline=${3:-560}
fit_minutes=${4:-0.55}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS
log="$out/log.txt"
stage() { echo "== $(( SECONDS - start )) s: $*" | tee -a "$log"; }
left() { echo $(( deadline - (SECONDS - start) )); }

stage gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$log" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$log" 2>&1
stage CUDA tests
timeout 150 python3 -m pytest -q -rs tests/test_triton_encoding.py tests/test_recon.py \
  tests/test_fit.py::test_a_training_step_never_waits_for_the_gpu >> "$log" 2>&1
if [[ ${THROUGHPUT:-0} == 1 ]]; then
  stage throughput
  timeout 150 python3 benchmarks/throughput.py --device cuda > "$out/throughput.json" 2>> "$log"
fi
stage local field
timeout 90 python3 benchmarks/local_field.py --device cuda --size 512 --tilts 61 > "$out/local_field.json" 2>> "$log"
stage host syncs
timeout 60 python3 benchmarks/host_syncs.py --size 128 > "$out/syncs_one_band.json" 2>> "$log"
timeout 60 python3 benchmarks/host_syncs.py --size 256 --lattice-rows 32 > "$out/syncs_bands.json" 2>> "$log"
timeout 60 python3 benchmarks/host_syncs.py --renderer rays > "$out/syncs_rays.json" 2>> "$log"
stage band memory
timeout 150 python3 benchmarks/band_memory.py --phantom "$phantom" --variants 86:0,43:0,24:0,12:0,86:524288,86:2097152 \
  --precisions fp32 --profile 86:524288 > "$out/band_memory_fp32.json" 2>> "$log"
timeout 80 python3 benchmarks/band_memory.py --phantom "$phantom" --variants 86:0,24:0,86:524288 --precisions mixed \
  > "$out/band_memory_mixed.json" 2>> "$log"
for run in "mixed 3.5 steps auto" "mixed 4 steps auto" "fp32 4 steps auto" "fp32 none steps auto" \
           "fp32 none steps 0" "fp32 none pass 0"; do
  read -r precision budget validation binned <<< "$run"
  if (( $(left) < 80 )); then stage "skip paper $precision, budget $budget: $(left) s left"; continue; fi
  stage "paper $precision, budget $budget GB, validation $validation, binned epochs $binned, fit capped at $fit_minutes min"
  extra=()
  [[ $budget != none ]] && extra+=(--max-memory "$budget")
  [[ $binned != auto ]] && extra+=(--binned-epochs "$binned")
  timeout $(( $(left) - 5 )) python3 benchmarks/time_to_quality.py --device cuda --phantom "$phantom" --tilt-step 2 \
    --volume paper --precision "$precision" "${extra[@]}" --validation "$validation" --epochs 400 \
    --score-epochs 10,15,25,40,80,90 --minutes "$fit_minutes" \
    > "$out/ttq_paper_${precision}_${budget}_${validation}_${binned}.json" 2>> "$log"
done
stage done
