#!/usr/bin/env bash
# The GPU proof in a few device runs, each under the 10-minute limit; logs and JSON go to $OUT
# (./gpu-out when $OUT is unset), so what a run measured comes back even when it is cut short.
# On a 2-GPU machine run two steps side by side: CUDA_VISIBLE_DEVICES=0 ... & CUDA_VISIBLE_DEVICES=1 ...
#
#   tools/gpu_suite.sh kernels         GPU kernel tests (vs fp32 references, and vs FlashInfer when
#                                      the .device bundle is carried) + `python -m bench.kernels`,
#                                      one kernel at a time so that a slow one cannot lose the rest
#                                      (`kernel-tests` / `kernel-bench`: one half, e.g. one per GPU)
#   tools/gpu_suite.sh system          model/backend/loop GPU tests (tiny models, bf16, CUDA graphs,
#                                      set_sync_debug_mode) and the CLI's CUDA test
#   tools/gpu_suite.sh cycle8b         per-stage cycle cost at Qwen3-8B scale (bench.cycle_8b)
#   tools/gpu_suite.sh train GGUF DIR  train the SmolLM2 drafters (tools/train_smollm2.sh) into DIR
#   tools/gpu_suite.sh e2e GGUF        the main job on the real SmolLM2 target (d2sd.run, with its AR
#                                      baseline) per backend, and the real-target greedy equality test
#   tools/gpu_suite.sh eval GGUF [N]   the benchmark suite (5 datasets x greedy/T=1 x every method)
#                                      on the real target, split over N GPUs by torchrun (default: all)
#
# Before `train`/`e2e`/`eval`: stage the model with ../shared/device/stage-model.sh and send its
# part runs back to back (see ../shared/device/README.md), then pass
# /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf; the machine keeps it while it stays warm.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
# shellcheck disable=SC1091
[ -f .device/setup.sh ] && source .device/setup.sh
export PYTHONUNBUFFERED=1 D2SD_RESULTS_DIR="$out"

step=${1:?usage: tools/gpu_suite.sh kernels|kernel-tests|kernel-bench|system|cycle8b|train GGUF DIR|e2e GGUF|eval GGUF [N]}

kernel_tests() {
  timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_lse_merge.py tests/test_prefix_attention.py tests/test_branch_attention.py \
    tests/test_cascade_attention.py tests/test_topk_confidence.py tests/test_tree_mask.py \
    tests/test_accept.py tests/test_sample_tokens.py tests/test_commit.py tests/test_rms_norm.py \
    tests/test_silu_mul.py tests/test_rope.py 2>&1 | tee "$out/gpu-kernel-tests.log" | tail -n 25
}

kernel_bench() {
  # cascade_attention first compiles FlashInfer's paged two-level cascade (two variants, ~100 s each)
  for kernel in cascade_attention:400 prefix_attention:150 branch_attention:150 lse_merge:90 \
    accept:150 topk_confidence:90 tree_mask:90 commit:90 rms_norm:90 silu_mul:90 rope:90; do
    timeout "${kernel#*:}" python3 -m bench.kernels --only "${kernel%%:*}" --out "$out" 2>&1 | tee -a "$out/bench-kernels.log" | tail -n 40
  done
}

case "$step" in
  kernels)
    kernel_tests
    kernel_bench
    ;;
  kernel-tests) kernel_tests ;;
  kernel-bench) kernel_bench ;;
  system)
    timeout 500 python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_attention_backends.py tests/test_models.py tests/test_drafter.py \
      tests/test_graphs.py tests/test_generate.py tests/test_lossless.py tests/test_run_cli.py tests/test_layers.py \
      tests/test_train.py 2>&1 | tee "$out/gpu-system-tests.log" | tail -n 40
    ;;
  train)
    gguf=${2:?usage: tools/gpu_suite.sh train GGUF DIR}
    dir=${3:?usage: tools/gpu_suite.sh train GGUF DIR}
    WORK_DIR=${WORK_DIR:-/root/smollm2-train} tools/train_smollm2.sh "$gguf" "$dir" 2>&1 | tee "$out/train.log" | tail -n 40
    cp "${WORK_DIR:-/root/smollm2-train}/train.log" "$out/train-full.log" 2>/dev/null || true
    ;;
  e2e)
    gguf=${2:?usage: tools/gpu_suite.sh e2e GGUF}
    for backend in triton flashinfer torch; do
      D2SD_DEFAULT_GGUF="$gguf" timeout 200 python3 -m d2sd.run --backend "$backend" \
        --json "$out/run-$backend.json" 2>&1 | tee "$out/run-$backend.log" | tail -n 40
    done
    D2SD_DEFAULT_GGUF="$gguf" timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider -k smollm2 tests/ 2>&1 | tee "$out/e2e-tests.log" | tail -n 15
    ;;
  eval)
    gguf=${2:?usage: tools/gpu_suite.sh eval GGUF [N]}
    gpus=${3:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
    D2SD_DEFAULT_GGUF="$gguf" NCCL_NVLS_ENABLE=0 python3 -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m d2sd.bench \
      --max-samples "${EVAL_SAMPLES:-20}" --data-dir .stage/datasets --out "$out/suite" 2>&1 | tee "$out/eval.log" | tail -n 60
    ;;
  cycle8b)
    # one backend per process and folder, so that a slow one cannot lose the other's JSON
    for backend in triton flashinfer; do
      mkdir -p "$out/cycle8b-$backend"
      timeout 300 python3 -m bench.cycle_8b --backends "$backend" --out-dir "$out/cycle8b-$backend" 2>&1 | tee -a "$out/cycle8b.log" | tail -n 30
    done
    ;;
  *)
    echo "unknown step '$step' (kernels, kernel-tests, kernel-bench, system, cycle8b, train, e2e or eval)" >&2
    exit 2
    ;;
esac
