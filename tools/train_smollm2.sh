#!/usr/bin/env bash
# Train the shipped SmolLM2-135M-Instruct drafters on one GPU (~8-9 minutes on an H200):
#   the target answers training prompts -> DFlash drafter -> VP drafter,
# one process (`python -m d2sd.train pipeline`), the target loaded once.
# Measured on an H200 with a random SmolLM2-shaped target (every response 256 tokens, the worst
# case): load 13 s (the GGUF: ~23 s), prompt tokenising 7 s, generation 38 s per 512 prompts at
# batch 512, first training step 47 s (flex_attention compile), then ~0.1 s per step of 64 records
# x 32 blocks x 16 (about 220k tokens/s); the VP run reuses the compiled kernels.
#
# usage: tools/train_smollm2.sh GGUF [OUT_DIR] [extra training flags (`python -m d2sd.train pipeline`, or dflash/vp with PARALLEL=1)...]
#   GGUF     the target, e.g. /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf (or "default")
#   OUT_DIR  where smollm2-dflash/ and smollm2-vp/ go (default d2sd/checkpoints): config.json +
#            model.safetensors (z-lab format, bf16, ~7.3 MB each), train_meta.json, train_log.jsonl
# env: DATA_DIR   prompt files (default .stage/train-data): gsm8k_train.jsonl, gsm8k_test.jsonl
#                 (decontamination), mbpp.jsonl; sharegpt_prompts.jsonl when present
#      WORK_DIR   shards and resume states (default runs/smollm2-train; git-ignored)
#      NUM_PROMPTS, DFLASH_STEPS, VP_STEPS, MAX_NEW_TOKENS   sizes (defaults below: fit ~10 min
#                 on an H200; measured 2026-11-29: 2048 prompts answered in 39 s, 1000 DFlash steps
#                 in 129 s, 1000 VP steps in 90 s)
#      PARALLEL=1 two GPUs: answer the prompts once, then train DFlash on GPU_DFLASH (0) and VP on
#                 GPU_VP (1) at the same time (`gen-data`, `dflash`, `vp` instead of `pipeline`)
#
# Prepare DATA_DIR on a dev machine (it is git-ignored, so name it in the GPU call's carry):
#   mkdir -p .stage/train-data && cp ../shared/datasets/{gsm8k_train,gsm8k_test,mbpp}.jsonl .stage/train-data/
#   python -m d2sd.train export-sharegpt --out .stage/train-data/sharegpt_prompts.jsonl  # optional
# Re-running resumes: finished shards are skipped and trainings continue from their state
# (add --resume to resume an interrupted training; without it a training starts over).
set -euo pipefail
cd "$(dirname "$0")/.."

GGUF=${1:?usage: tools/train_smollm2.sh GGUF [OUT_DIR] [pipeline flags...]}
OUT_DIR=${2:-d2sd/checkpoints}
shift $(( $# >= 2 ? 2 : 1 ))
DATA_DIR=${DATA_DIR:-.stage/train-data}
WORK_DIR=${WORK_DIR:-runs/smollm2-train}
NUM_PROMPTS=${NUM_PROMPTS:-3072}
DFLASH_STEPS=${DFLASH_STEPS:-1200}
VP_STEPS=${VP_STEPS:-1200}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}
PARALLEL=${PARALLEL:-0}

# the GPU image has no `gguf` package: the repo's device wheels bring it
if ! python3 -c "import gguf" 2>/dev/null && [ -f .device/setup.sh ]; then
  # shellcheck disable=SC1091
  source .device/setup.sh
fi
for f in gsm8k_train.jsonl mbpp.jsonl; do
  [ -f "$DATA_DIR/$f" ] || { echo "missing $DATA_DIR/$f (see the header of $0)" >&2; exit 2; }
done
export PYTHONUNBUFFERED=1
mkdir -p "$WORK_DIR" "$OUT_DIR"
gen=(--target "$GGUF" --data-dir "$DATA_DIR" --num-prompts "$NUM_PROMPTS" --max-prompt-len 256
     --max-new-tokens "$MAX_NEW_TOKENS" --gen-batch-size 1024 --shard-size 1024)
train=(--target "$GGUF" --data "$WORK_DIR/data" --num-layers 1 --intermediate-size 1024 --num-taps 3
       --batch-size 64 --max-len 512 --anchors-per-seq 32 --lr 1e-3 --warmup 100 --log-every 50
       --save-every 500)
if [ "$PARALLEL" = 1 ]; then
  # two GPUs: the target answers the prompts once, then the two drafters train side by side
  python3 -m d2sd.train gen-data "${gen[@]}" --out "$WORK_DIR/data" 2>&1 | tee "$WORK_DIR/train.log"
  CUDA_VISIBLE_DEVICES=${GPU_DFLASH:-0} python3 -m d2sd.train dflash "${train[@]}" "$@" \
    --out "$OUT_DIR/smollm2-dflash" --state-dir "$WORK_DIR/smollm2-dflash" \
    --steps "$DFLASH_STEPS" --block-size 16 > "$WORK_DIR/dflash.log" 2>&1 &
  dflash=$!
  CUDA_VISIBLE_DEVICES=${GPU_VP:-1} python3 -m d2sd.train vp "${train[@]}" "$@" \
    --out "$OUT_DIR/smollm2-vp" --state-dir "$WORK_DIR/smollm2-vp" \
    --steps "$VP_STEPS" --block-size 16 > "$WORK_DIR/vp.log" 2>&1 &
  vp=$!
  status=0
  wait "$dflash" || status=$?
  wait "$vp" || status=$?
  tail -n 3 "$WORK_DIR/dflash.log" "$WORK_DIR/vp.log" | tee -a "$WORK_DIR/train.log"
  [ "$status" = 0 ] || { echo "a training failed (logs in $WORK_DIR)" >&2; exit "$status"; }
else
  python3 -m d2sd.train pipeline "${gen[@]}" --data "$WORK_DIR/data" \
    --dflash-out "$OUT_DIR/smollm2-dflash" --vp-out "$OUT_DIR/smollm2-vp" \
    --dflash-steps "$DFLASH_STEPS" --vp-steps "$VP_STEPS" --block-size 16 --vp-block-size 16 \
    --num-layers 1 --intermediate-size 1024 --num-taps 3 \
    --batch-size 64 --max-len 512 --anchors-per-seq 32 \
    --lr 1e-3 --warmup 100 --log-every 50 --save-every 500 \
    --state-root "$WORK_DIR" "$@" 2>&1 | tee "$WORK_DIR/train.log"
fi
cp "$WORK_DIR/data/meta.json" "$OUT_DIR/smollm2-dflash/data_meta.json"
cp "$WORK_DIR/data/meta.json" "$OUT_DIR/smollm2-vp/data_meta.json"
du -b "$OUT_DIR"/smollm2-dflash/* "$OUT_DIR"/smollm2-vp/*
