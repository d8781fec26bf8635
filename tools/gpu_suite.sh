#!/usr/bin/env bash
# The GPU proof in a few device runs, each under the 10-minute limit; logs and JSON go to $OUT
# (./gpu-out when $OUT is unset), so what a run measured comes back even when it is cut short.
#
#   tools/gpu_suite.sh kernels   GPU kernel tests (vs fp32 references, and vs FlashInfer when the
#                                .device bundle is carried) + `python -m bench.kernels`
#   tools/gpu_suite.sh system    model/backend/loop GPU tests (tiny models, bf16, CUDA graphs,
#                                set_sync_debug_mode) and the CLI's CUDA test
#   tools/gpu_suite.sh e2e GGUF  the main job on the real SmolLM2 target (d2sd.run, with its AR
#                                baseline), the real-target greedy equality test, a small suite run
#   tools/gpu_suite.sh cycle8b   per-stage cycle cost at Qwen3-8B scale (bench.cycle_8b)
#
# Before `e2e`: stage the model with ../shared/device/stage-model.sh and send its part runs back to
# back (see ../shared/device/README.md); carry [".device-partN", ".device"] on the last one and
# chain `bash .device-partN/stash.sh && tools/gpu_suite.sh e2e /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf`.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
# shellcheck disable=SC1091
[ -f .device/setup.sh ] && source .device/setup.sh
export PYTHONUNBUFFERED=1 D2SD_RESULTS_DIR="$out"

step=${1:?usage: tools/gpu_suite.sh kernels|system|e2e GGUF|cycle8b}
case "$step" in
  kernels)
    timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_lse_merge.py tests/test_prefix_attention.py tests/test_branch_attention.py \
      tests/test_cascade_attention.py tests/test_topk_confidence.py tests/test_tree_mask.py \
      tests/test_accept.py tests/test_sample_tokens.py tests/test_commit.py 2>&1 | tee "$out/gpu-kernel-tests.log" | tail -n 25
    timeout 300 python3 -m bench.kernels --out "$out" 2>&1 | tee "$out/bench-kernels.log" | tail -n 120
    ;;
  system)
    timeout 500 python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_attention_backends.py tests/test_models.py tests/test_drafter.py \
      tests/test_graphs.py tests/test_generate.py tests/test_lossless.py tests/test_run_cli.py \
      tests/test_train.py 2>&1 | tee "$out/gpu-system-tests.log" | tail -n 40
    ;;
  e2e)
    gguf=${2:?usage: tools/gpu_suite.sh e2e GGUF}
    for backend in triton torch; do
      D2SD_DEFAULT_GGUF="$gguf" timeout 200 python3 -m d2sd.run --target default --backend "$backend" --max-new-tokens 128 \
        --json "$out/run-$backend.json" 2>&1 | tee "$out/run-$backend.log" | tail -n 40
    done
    D2SD_DEFAULT_GGUF="$gguf" timeout 150 python3 -m pytest -m gpu -q -k smollm2 tests/ 2>&1 | tail -n 15
    D2SD_DEFAULT_GGUF="$gguf" timeout 200 python3 -m d2sd.bench --max-samples 4 --max-new-tokens 64 \
      --data-dir .stage/datasets --out "$out/suite" --no-plots 2>&1 | tail -n 30
    ;;
  cycle8b)
    timeout 560 python3 -m bench.cycle_8b --out-dir "$out" 2>&1 | tee "$out/cycle8b.log" | tail -n 60
    ;;
  *)
    echo "unknown step '$step' (kernels, system, e2e or cycle8b)" >&2
    exit 2
    ;;
esac
