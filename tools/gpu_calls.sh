#!/usr/bin/env bash
# The whole GPU proof as four device calls on a 2-GPU machine (nvidia-h200-x2), sent back to back so
# the machine stays warm (/root keeps the model, the FlashInfer cache, the drafters and the suite's
# results.json between calls). Each call runs one job per GPU, stays under the 10-minute limit and
# leaves one archive, $OUT/callN.tgz, with every log and JSON.
#
#   call 1  carry [".device", ".device-ga"]            kernel tests, then the system tests (GPU0) ||
#                                                      the kernel benchmarks (GPU1)
#   call 2  carry [".device-gb", ".stage/train-data"]  the default GGUF reassembled; drafters trained
#                                                      (answers on GPU0, DFlash GPU0 || VP GPU1)
#   call 3  carry [".device", ".stage"]                d2sd.run + real-target tests with the new
#                                                      drafters, then the 8B cycle (GPU0) || the
#                                                      suite, greedy (GPU1)
#   call 4  carry [".device", ".stage"]                the suite resumed under torchrun on both GPUs
#
# command of call N:  tools/gpu_calls.sh N
# Preparation on the dev machine: tools/split_stage.sh (GGUF parts), ../shared/device/bundle.sh
# gguf==0.19.0 (.device), the data folders named in tools/train_smollm2.sh's header (.stage).
# Sizes: NUM_PROMPTS (6144), STEPS (3000 per drafter), EVAL_SAMPLES (40).
set -uo pipefail
cd "$(dirname "$0")/.."
call=${1:?usage: tools/gpu_calls.sh 1|2|3|4}
out=${OUT:-gpu-out}
work="$out/w"
mkdir -p "$work" /root/stash
gguf=/root/stash/SmolLM2-135M-Instruct.Q4_1.gguf
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# shellcheck disable=SC1091
[ -f .device/setup.sh ] && source .device/setup.sh
nvidia-smi --query-gpu=name,memory.used --format=csv > "$work/gpus-call$call.txt" 2>&1

# run_on GPU LIMIT LOG COMMAND...: a job on one GPU, its output in $work/LOG
run_on() {
  local gpu=$1 limit=$2 log=$3
  shift 3
  CUDA_VISIBLE_DEVICES=$gpu OUT=$work timeout "$limit" "$@" > "$work/$log" 2>&1
}

with_drafters() {  # the drafters trained in call 2, where d2sd.run looks for them
  mkdir -p d2sd/checkpoints && cp -r /root/ck/smollm2-dflash /root/ck/smollm2-vp d2sd/checkpoints/
}

case "$call" in
  1)
    cp .device-ga/part_a /root/stash/
    python3 tools/flashinfer_warm.py > "$work/flashinfer-warm.log" 2>&1 &
    (run_on 0 300 gpu0-kernel-tests.log tools/gpu_suite.sh kernel-tests
      run_on 0 260 gpu0-system.log tools/gpu_suite.sh system) &
    run_on 1 565 gpu1-kernel-bench.log tools/gpu_suite.sh kernel-bench &
    wait
    ;;
  2)
    bash .device-gb/stash.sh > "$work/stash.log" 2>&1 || { cat "$work/stash.log"; exit 1; }
    NUM_PROMPTS=${NUM_PROMPTS:-6144} DFLASH_STEPS=${STEPS:-3000} VP_STEPS=${STEPS:-3000} PARALLEL=1 \
      WORK_DIR=/root/smollm2-train timeout 570 tools/train_smollm2.sh "$gguf" /root/ck > "$work/train.log" 2>&1
    cp /root/smollm2-train/*.log "$work/" 2>/dev/null
    tar czf "$out/ck.tgz" -C /root ck
    ;;
  3)
    with_drafters
    (run_on 0 300 gpu0-e2e.log tools/gpu_suite.sh e2e "$gguf"
      run_on 0 260 gpu0-cycle8b.log tools/gpu_suite.sh cycle8b) &
    D2SD_DEFAULT_GGUF=$gguf run_on 1 560 gpu1-suite.log python3 -m d2sd.bench --temperatures 0 \
      --max-samples "${EVAL_SAMPLES:-40}" --data-dir .stage/datasets --out /root/suite &
    wait
    cp -r /root/suite "$work/"
    ;;
  4)
    with_drafters
    D2SD_DEFAULT_GGUF=$gguf timeout 570 python3 -m torch.distributed.run --standalone --nproc_per_node 2 \
      -m d2sd.bench --max-samples "${EVAL_SAMPLES:-40}" --data-dir .stage/datasets --out /root/suite \
      > "$work/suite-torchrun.log" 2>&1
    cp -r /root/suite "$work/"
    ;;
  *)
    echo "unknown call '$call' (1, 2, 3 or 4)" >&2
    exit 2
    ;;
esac
for log in "$work"/*.log; do
  echo "== $log"
  grep -v "it/s\]\|s/it\]\|prompt/s\]\|s/prompt\]\|cell/s\]\|s/cell\]" "$log" | tail -n 12
done
tar czf "$out/call$call.tgz" -C "$out" w && rm -rf "$work"
