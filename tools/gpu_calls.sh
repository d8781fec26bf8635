#!/usr/bin/env bash
# The whole GPU proof as three device calls on a 2-GPU machine (nvidia-h200-x2), sent back to back
# so the machine stays warm (/root keeps the GGUF parts, the drafters and the suite's results.json,
# /tmp/site the FlashInfer and gguf installs, ~/.cache/flashinfer its compiled kernels). Each call
# runs one job per GPU, stays under the 10-minute limit and leaves one archive, $OUT/callN.tgz.
#
#   call 1  carry [".device", ".device-ga"]  kernel tests, then the system tests (GPU0) || the 8B
#                                           cycle with kernel profiles, the KV-split sweep and the
#                                           kernel benchmarks (GPU1); FlashInfer compiles meanwhile
#   call 2  carry [".device-gb", ".stage"]   the default GGUF reassembled; drafters trained (answers
#                                           on GPU0, DFlash GPU0 || VP GPU1); then with them d2sd.run
#                                           per backend + the real-target tests (GPU0) || the
#                                           suite, greedy (GPU1)
#   call 3  carry []                        the suite resumed under torchrun on both GPUs, greedy
#                                           and T = 1
# After a change to the decode step or the sampler (session 4), two calls re-measure what it moves:
#   call s1 carry [".device", ".device-ga"] the changed kernels' and the system GPU tests (GPU0) ||
#                                           bench.kernels accept + rope, the 8B cycle (GPU1)
#   call s2 carry [".device-gb"]            d2sd.run per backend on the real target, with the shipped
#                                           drafters (GPU0) || the real-target pytest, all 3 backends
#                                           (GPU1)
#   call s3 carry [".device", ".device-ga"] the attention, sampler, rope and layer GPU tests (GPU0) ||
#                                           bench.accept_chunks (GPU1)
#   call s4 carry [".device-gb"]            d2sd.run (triton), then the system GPU tests split over
#                                           both GPUs, beside the real-target pytest (GPU1)
# Session 5 (one-launch cascade for every B, greedy accept without its select launch):
#   call s5 carry [".device", ".device-ga"] attention, sampler, emit, rope and layer GPU tests
#                                           (GPU0) || bench.accept_chunks, bench.kernels accept,
#                                           the 8B cycle (GPU1)
#   call s6                                 = s4
# Then (fewer launches per step: bf16 logits, one-launch RoPE tables, context K/V in 2 launches a
# layer, the counters advanced by emit):
#   call s7 carry [".device", ".device-ga"] emit/commit/rope/layer and the system GPU tests (GPU0)
#                                           || the SmolLM2-shape cycle with kernel profiles, the
#                                           8B cycle (GPU1)
#   call s8 carry [".device-gb"]            d2sd.run triton, then torch (GPU0) || the real-target
#                                           pytest, then d2sd.run flashinfer (GPU1)
#   call s9 carry []                        after s7's profile (RoPE tables 42 us, the AR step's
#                                           attention 11 us a layer): the RoPE-table and attention
#                                           GPU tests (GPU0) || the SmolLM2-shape cycle (GPU1)
# Session 6 (accept: PDL, the loop-free walk, radix top-k; A/Bs of attention branches carried in
# ./ab; s10-s12 lived on the measured branches):
#   call s13/s14 carry ["ab"]               accept's GPU tests, benchmarks and sweeps (GPU0/1); the
#                                           SmolLM2-shape cycle of this tree and of ./ab on both
#   call s15 carry [".device-ga"]           accept and system GPU tests (GPU0) || accept's
#                                           benchmarks, the SmolLM2-shape cycle (GPU1)
#   call s16 carry [".device-gb"]           right after s15: d2sd.run triton / torch on the real
#                                           GGUF (GPU0) || the real-target tests (GPU1)
#   call s17 carry []                       top-k from the chunks' candidates: accept and sampler
#   call s18 (= s17, after the early stop)  GPU tests (GPU0) || accept's benchmark and sweeps (GPU1)
# Session 7 (greedy partials as one packed int32 max, the chunks' top-k from column maxima):
#   call s19 (= s17) carry []
#   call s20 carry []                       after it (no key math in the passes, a lean chunk top-k,
#                                           the walk's draft-only half before its PDL wait): the
#                                           accept, sampler, lossless and graph GPU tests (GPU0) ||
#                                           accept's benchmark and sweeps (GPU1)
#   call s21 (= s20)                        the grouped top-k (group maxima, then cuts and draw in
#                                           registers over the few groups that hold the top-k)
#   call s22 (= s20)                        the grouped top-k's cuts read off the sorted candidates
#                                           (rejected: slower)
#   call s23                                the grouped top-k capped at 128 registers (two programs
#                                           an SM; rejected, no change): accept, sampler and
#                                           sampled-lossless GPU tests (GPU0) || accept's benchmark
#                                           and sweeps (GPU1)
# Session 8 (greedy partials write the chunk max only; the grouped top-k compacts its candidates):
#   call s24 carry []                       (branch next/fused-tail-rejected) accept in one launch
#   call s25 carry []                       accept, sampler, lossless and graph GPU tests (GPU0) ||
#                                           bench.read_floor, then accept's benchmark and sweeps
#                                           (GPU1)
# Session 9 (the grouped top-k over a tile of 32 groups, uncompacted, for top-k <= 32):
#   call s26 carry []                       accept, sampler, lossless and graph GPU tests, then
#                                           ncu's source-level profile of the grouped top-k (GPU0)
#                                           || accept's benchmark and sweeps (GPU1)
# Session 10 (the grouped top-k: kept group ids without a scan, cuts probing FANOUT keys a step):
#   call s27 carry []                       = s26, with only the top-k sweep and the kernel split
#                                           (rejected: slower)
#   call s28 carry []                       the chunking sweep alone (the walk's and select's warps)
#   call s29 (= s20)                        sampled chunks of 4096 below V = 131072
#   call s30 carry [".device-gb", ".device-ab"]  after `cp .device-ga/part_a /root/stash/`: is the
#                                           triton backend's greedy output reproducible? d2sd.run
#                                           twice on this tree (GPU0) || twice with the accept.py
#                                           in .device-ab (GPU1)
#   call s31 (= s20)                        the walk launched when the sampler's last kernel starts
#                                           (rejected: no measurable change)
#   call s32 carry []                       bench.lm_head_fusion: would accept's greedy partials in
#                                           the lm_head GEMM's epilogue pay? (GPU1)
#   call s33 carry [".device-gb"]           after `cp .device-ga/part_a /root/stash/`, with the
#                                           attention's autotuning kept on disk: d2sd.run triton three
#                                           times in a row (GPU0) || the cascade GPU tests (GPU1)
#
# command of call N:  tools/gpu_calls.sh N
# A call's working tree is capped at 64 MiB: for calls 1 and 2 take the shipped drafters out of the
# index (`git rm -r -q --cached d2sd/checkpoints && echo /d2sd/checkpoints/ >> .git/info/exclude`,
# undone with `git reset -q d2sd/checkpoints` and that exclude line removed); call 2 trains new ones.
# Preparation on the dev machine: tools/split_stage.sh (GGUF parts), ../shared/device/bundle.sh
# gguf==0.19.0 (.device), the data folders named in tools/train_smollm2.sh's header (.stage).
# Sizes: NUM_PROMPTS (3072), STEPS (1500 per drafter), EVAL_SAMPLES (40).
# Observed on 2026-11-29 (session 3): call 1 473 s, call 2 516 s, call 3 315 s (the suite's last
# 34 cells on 2 GPUs). Three limits proved short: the kernel tests need ~300 s while FlashInfer
# compiles beside them (cut at 250 s), the system tests ~230 s (cut at 220 s), the e2e step ~300 s
# (cut at 210 s: the real-target pytest lost its flashinfer and torch cases). The cascade bench
# also compiles FlashInfer's sm90 batch-prefill variants, which tools/flashinfer_warm.py does not
# (~2 min each); its full 60-shape run then takes ~140 s.
set -uo pipefail
cd "$(dirname "$0")/.."
call=${1:?usage: tools/gpu_calls.sh 1|2|3|s1|s2|s3|s4|s5|s6|s7|s8|s9|s13|s14|s15|s16|s17|s18}
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
  CUDA_VISIBLE_DEVICES=$gpu OUT=$work D2SD_RESULTS_DIR=$work timeout "$limit" "$@" >> "$work/$log" 2>&1
}

with_drafters() {  # the drafters trained in call 2, where d2sd.run looks for them
  mkdir -p d2sd/checkpoints && cp -r /root/ck/smollm2-dflash /root/ck/smollm2-vp d2sd/checkpoints/
}

stash_gguf() {  # the default GGUF reassembled at $gguf from /root/stash/part_a (copied by an
  # earlier call) and .device-gb's part_b; with `wheel`, gguf installed from .device-gb first
  if [ "${1:-}" = wheel ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device-gb/gguf-*.whl
  fi
  bash .device-gb/stash.sh > "$work/stash.log" 2>&1 || { cat "$work/stash.log"; exit 1; }
}

real_target() {  # real_target BACKENDS RUN_LIMIT TEST_LIMIT: after stash_gguf, d2sd.run per
  # backend (GPU0) || the real-target tests (GPU1)
  (for backend in $1; do
    D2SD_DEFAULT_GGUF=$gguf run_on 0 "$2" "gpu0-run-$backend.log" python3 -m d2sd.run \
      --backend "$backend" --json "$work/run-$backend.json"
  done) &
  D2SD_DEFAULT_GGUF=$gguf run_on 1 "$3" gpu1-e2e-tests.log python3 -m pytest -m gpu -q \
    -p no:cacheprovider -k smollm2 tests/ &
  wait
}

accept_calls() {  # accept_calls TEST_LIMIT TEST_FILE...: those GPU tests (GPU0) || accept's
  # benchmark and sweeps (GPU1), after the one-read floor (bench.read_floor) with READ_FLOOR=1
  local limit=$1
  shift
  run_on 0 "$limit" gpu0-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider "$@" &
  (if [ -n "${READ_FLOOR:-}" ]; then
    run_on 1 150 gpu1-read-floor.log python3 -m bench.read_floor --out-dir "$work"
  fi
    run_on 1 100 gpu1-kernel-bench.log python3 -m bench.kernels --only accept --out "$work"
    run_on 1 300 gpu1-accept-chunks.log python3 -m bench.accept_chunks --out-dir "$work") &
  wait
}

ncu_grouped() {  # ncu_grouped GPU LIMIT: the grouped top-k's source-level profile (V 151936,
  # T 16, top-k 20 / top-p 0.95), instructions with their stall samples as CSV
  local ncu=/usr/local/cuda/bin/ncu driver
  driver='import torch; from kernels.accept import accept
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(80, 151936, device="cuda", generator=g).bfloat16()
c = torch.randint(0, 3, (5, 16), device="cuda", generator=g)
u = torch.rand(16, device="cuda", generator=g)
for _ in range(2): accept(c, x, temperature=0.6, top_k=20, top_p=0.95, uniforms=u)
torch.cuda.synchronize()'
  run_on "$1" "$2" ncu.log "$ncu" --kernel-name regex:grouped_top_k --launch-skip 1 \
    --launch-count 1 --set full --import-source yes -f -o "$work/grouped" python3 -c "$driver"
  "$ncu" --import "$work/grouped.ncu-rep" --page source --csv --print-source sass \
    > "$work/grouped-sass.csv" 2>> "$work/ncu.log"
  "$ncu" --import "$work/grouped.ncu-rep" --page details --csv > "$work/grouped-details.csv" \
    2>> "$work/ncu.log"
}

suite() {  # suite GPU LIMIT TEMPERATURES: the benchmark suite into /root/suite (resumable)
  D2SD_DEFAULT_GGUF=$gguf run_on "$1" "$2" suite.log python3 -m d2sd.bench --temperatures "$3" \
    --max-samples "${EVAL_SAMPLES:-40}" --data-dir .stage/datasets --out /root/suite
}

case "$call" in
  1)
    cp .device-ga/part_a /root/stash/
    python3 tools/flashinfer_warm.py > "$work/flashinfer-warm.log" 2>&1 &
    (run_on 0 250 gpu0-kernel-tests.log tools/gpu_suite.sh kernel-tests
      run_on 0 220 gpu0-system.log tools/gpu_suite.sh system) &
    (run_on 1 170 gpu1-cycle8b.log python3 -m bench.cycle_8b --backends triton --profile ar,d2sd \
        --out-dir "$work"
      run_on 1 80 gpu1-splits.log python3 -m bench.prefix_splits --out-dir "$work"
      for kernel in cascade_attention:190 rms_norm:25 silu_mul:25 rope:25; do
        run_on 1 "${kernel#*:}" gpu1-kernel-bench.log python3 -m bench.kernels --only "${kernel%%:*}" \
          --out "$work"
      done) &
    wait
    ;;
  2)
    stash_gguf
    NUM_PROMPTS=${NUM_PROMPTS:-3072} DFLASH_STEPS=${STEPS:-1500} VP_STEPS=${STEPS:-1500} PARALLEL=1 \
      WORK_DIR=/root/smollm2-train timeout 360 tools/train_smollm2.sh "$gguf" /root/ck > "$work/train.log" 2>&1
    cp /root/smollm2-train/*.log "$work/" 2>/dev/null
    tar czf "$out/ck.tgz" -C /root ck
    with_drafters
    run_on 0 210 gpu0-e2e.log tools/gpu_suite.sh e2e "$gguf" &
    suite 1 200 0 &
    wait
    ;;
  3)
    with_drafters
    D2SD_DEFAULT_GGUF=$gguf timeout 555 python3 -m torch.distributed.run --standalone --nproc_per_node 2 \
      -m d2sd.bench --temperatures 0,1 --max-samples "${EVAL_SAMPLES:-40}" --data-dir .stage/datasets \
      --out /root/suite > "$work/suite-torchrun.log" 2>&1
    ;;
  s1)
    cp .device-ga/part_a /root/stash/
    python3 tools/flashinfer_warm.py > "$work/flashinfer-warm.log" 2>&1 &
    (run_on 0 200 gpu0-kernel-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_accept.py tests/test_sample_tokens.py tests/test_rope.py tests/test_layers.py
      run_on 0 300 gpu0-system.log tools/gpu_suite.sh system) &
    (run_on 1 200 gpu1-kernel-bench.log python3 -m bench.kernels --only accept --out "$work"
      run_on 1 40 gpu1-kernel-bench.log python3 -m bench.kernels --only rope --out "$work"
      run_on 1 200 gpu1-cycle8b.log python3 -m bench.cycle_8b --backends triton --profile ar \
        --out-dir "$work") &
    wait
    ;;
  s2)
    stash_gguf
    real_target "triton torch flashinfer" 170 520
    ;;
  s3)
    cp .device-ga/part_a /root/stash/
    python3 tools/flashinfer_warm.py > "$work/flashinfer-warm.log" 2>&1 &
    run_on 0 280 gpu0-kernel-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_cascade_attention.py tests/test_prefix_attention.py tests/test_branch_attention.py \
      tests/test_accept.py tests/test_rope.py tests/test_layers.py &
    run_on 1 150 gpu1-accept-chunks.log python3 -m bench.accept_chunks --out-dir "$work" &
    wait
    ;;
  s4 | s6)
    stash_gguf
    (D2SD_DEFAULT_GGUF=$gguf run_on 0 100 gpu0-run-triton.log python3 -m d2sd.run --backend triton \
        --json "$work/run-triton.json"
      run_on 0 190 gpu0-system.log python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_graphs.py tests/test_generate.py tests/test_lossless.py -k "not smollm2") &
    (D2SD_DEFAULT_GGUF=$gguf run_on 1 170 gpu1-e2e-tests.log python3 -m pytest -m gpu -q \
        -p no:cacheprovider -k smollm2 tests/
      run_on 1 120 gpu1-system.log python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_models.py tests/test_drafter.py tests/test_attention_backends.py \
        tests/test_layers.py tests/test_run_cli.py) &
    wait
    ;;
  s5)
    cp .device-ga/part_a /root/stash/
    python3 tools/flashinfer_warm.py > "$work/flashinfer-warm.log" 2>&1 &
    run_on 0 300 gpu0-kernel-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_cascade_attention.py tests/test_prefix_attention.py tests/test_branch_attention.py \
      tests/test_accept.py tests/test_sample_tokens.py tests/test_emit.py tests/test_rope.py \
      tests/test_layers.py &
    (run_on 1 200 gpu1-accept-chunks.log python3 -m bench.accept_chunks --out-dir "$work"
      run_on 1 60 gpu1-kernel-bench.log python3 -m bench.kernels --only accept --out "$work"
      run_on 1 100 gpu1-cycle8b.log python3 -m bench.cycle_8b --backends triton --out-dir "$work") &
    wait
    ;;
  s7)
    cp .device-ga/part_a /root/stash/
    python3 tools/flashinfer_warm.py > "$work/flashinfer-warm.log" 2>&1 &
    run_on 0 420 gpu0-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_emit.py tests/test_commit.py tests/test_rope_tables.py tests/test_rope.py \
      tests/test_layers.py tests/test_graphs.py tests/test_generate.py tests/test_lossless.py \
      tests/test_models.py tests/test_drafter.py tests/test_attention_backends.py \
      tests/test_run_cli.py &
    (run_on 1 200 gpu1-cycle-smollm2.log python3 -m bench.cycle_8b --shape smollm2 \
        --backends triton --profile ar,d2sd --out-dir "$work"
      run_on 1 200 gpu1-cycle8b.log python3 -m bench.cycle_8b --backends triton --out-dir "$work") &
    wait
    ;;
  s8)
    stash_gguf
    (for backend in triton torch; do
      D2SD_DEFAULT_GGUF=$gguf run_on 0 200 "gpu0-run-$backend.log" python3 -m d2sd.run \
        --backend "$backend" --json "$work/run-$backend.json"
    done) &
    (D2SD_DEFAULT_GGUF=$gguf run_on 1 240 gpu1-e2e-tests.log python3 -m pytest -m gpu -q \
        -p no:cacheprovider -k smollm2 tests/
      D2SD_DEFAULT_GGUF=$gguf run_on 1 200 gpu1-run-flashinfer.log python3 -m d2sd.run \
        --backend flashinfer --json "$work/run-flashinfer.json") &
    wait
    ;;
  s9)
    run_on 0 330 gpu0-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_rope_tables.py tests/test_prefix_attention.py tests/test_cascade_attention.py \
      tests/test_layers.py &
    run_on 1 300 gpu1-cycle-smollm2.log python3 -m bench.cycle_8b --shape smollm2 \
      --backends triton --prefixes 64,512,2048 --profile ar,d2sd --out-dir "$work" &
    wait
    ;;
  s13 | s14)  # accept (s13: persistent partials; s14: PDL, one-program-per-chunk partials,
    # loop-free walk); A/B of another attention tree carried in ./ab (s13:
    # next/fused-active-splits, s14: next/split0-direct) against this one, SmolLM2 shape
    cycle() {  # cycle GPU LOG [DIR]
      (cd "${3:-.}" && run_on "$1" 110 "$2" python3 -m bench.cycle_8b --shape smollm2 \
        --backends triton --prefixes 64,512,2048 --out-dir "$work/$2.d")
    }
    (run_on 0 150 gpu0-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_accept.py tests/test_sample_tokens.py
      run_on 0 120 gpu0-kernel-bench.log python3 -m bench.kernels --only accept --out "$work"
      cycle 0 gpu0-cycle-this.log
      cycle 0 gpu0-cycle-ab.log ab) &
    (run_on 1 200 gpu1-accept-chunks.log python3 -m bench.accept_chunks --out-dir "$work"
      cycle 1 gpu1-cycle-ab.log ab
      cycle 1 gpu1-cycle-this.log) &
    wait
    ;;
  s15)  # session 6's accept (PDL, loop-free walk, radix top-k): its GPU tests and the system GPU
    # tests, PDL kernels inside the decode graphs (GPU0) || accept's benchmarks and sweeps, the
    # SmolLM2-shape cycle (GPU1); the GGUF's first part parked for s16
    cp .device-ga/part_a /root/stash/
    run_on 0 480 gpu0-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_accept.py tests/test_sample_tokens.py tests/test_graphs.py tests/test_generate.py \
      tests/test_lossless.py tests/test_models.py tests/test_drafter.py \
      tests/test_attention_backends.py tests/test_run_cli.py &
    (run_on 1 120 gpu1-kernel-bench.log python3 -m bench.kernels --only accept --out "$work"
      run_on 1 200 gpu1-accept-chunks.log python3 -m bench.accept_chunks --out-dir "$work"
      run_on 1 150 gpu1-cycle-smollm2.log python3 -m bench.cycle_8b --shape smollm2 \
        --backends triton --prefixes 64,512,2048 --out-dir "$work") &
    wait
    ;;
  s16)  # after s15 on the same warm machine: the default GGUF reassembled (gguf from the wheel
    # in .device-gb), d2sd.run triton then torch (GPU0) || the real-target tests (GPU1)
    stash_gguf wheel
    real_target "triton torch" 200 280
    ;;
  s17 | s18 | s19)  # top-k from the chunks' candidates (s18: stopped early, tuned warps)
    accept_calls 200 tests/test_accept.py tests/test_sample_tokens.py
    ;;
  s20 | s21 | s22 | s29 | s31)
    accept_calls 400 tests/test_accept.py tests/test_sample_tokens.py \
      tests/test_sampling_lossless.py tests/test_graphs.py tests/test_lossless.py
    ;;
  s23)
    accept_calls 300 tests/test_accept.py tests/test_sample_tokens.py \
      tests/test_sampling_lossless.py
    ;;
  s25)
    READ_FLOOR=1 accept_calls 400 tests/test_accept.py tests/test_sample_tokens.py \
      tests/test_sampling_lossless.py tests/test_graphs.py tests/test_lossless.py
    ;;
  s28)
    run_on 1 300 gpu1-accept-chunks.log python3 -m bench.accept_chunks --out-dir "$work" \
      --only chunks
    ;;
  s30)
    stash_gguf wheel
    rm -rf /root/ab && mkdir -p /root/ab && abs_work=$(cd "$work" && pwd)
    cp -r kernels d2sd tests tools bench pyproject.toml /root/ab/ && cp .device-ab/accept_*.py \
      /root/ab/kernels/accept.py
    (for n in 1 2; do
      D2SD_DEFAULT_GGUF=$gguf run_on 0 200 "gpu0-run-$n.log" python3 -m d2sd.run --backend triton \
        --json "$work/run-head-$n.json"
    done) &
    (cd /root/ab && for n in 1 2; do
      D2SD_DEFAULT_GGUF=$gguf CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m d2sd.run \
        --backend triton --json "$abs_work/run-ab-$n.json" >> "$abs_work/gpu1-run-$n.log" 2>&1
    done) &
    wait
    ;;
  s32)
    run_on 1 330 gpu1-lm-head-fusion.log python3 -m bench.lm_head_fusion --out-dir "$work"
    ;;
  s33)
    stash_gguf wheel
    (for n in 1 2 3; do
      D2SD_DEFAULT_GGUF=$gguf run_on 0 100 "gpu0-run-$n.log" python3 -m d2sd.run --backend triton \
        --json "$work/run-kept-$n.json"
    done) &
    run_on 1 200 gpu1-cascade-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_cascade_attention.py &
    wait
    ;;
  s26 | s27)
    (run_on 0 400 gpu0-tests.log python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_accept.py tests/test_sample_tokens.py tests/test_sampling_lossless.py \
        tests/test_graphs.py tests/test_lossless.py
      ncu_grouped 0 150) &
    sweeps="chunks thresholds split"
    [ "$call" = s27 ] && sweeps="thresholds split"
    # shellcheck disable=SC2086
    (run_on 1 100 gpu1-kernel-bench.log python3 -m bench.kernels --only accept --out "$work"
      run_on 1 300 gpu1-accept-chunks.log python3 -m bench.accept_chunks --out-dir "$work" \
        --only $sweeps) &
    wait
    ;;
  *)
    echo "unknown call '$call' (1, 2, 3, s1-s9, s13-s33; s6 is s4 again)" >&2
    exit 2
    ;;
esac
[ -d /root/suite ] && cp -r /root/suite "$work/"
for log in "$work"/*.log; do
  echo "== $log"
  grep -v "it/s\]\|s/it\]\|prompt/s\]\|s/prompt\]\|cell/s\]\|s/cell\]" "$log" | tail -n 14
done
tar czf "$out/call$call.tgz" -C "$out" w && rm -rf "$work"
