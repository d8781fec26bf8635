"""The decoder-block kernels, the cascade's two kernels and accept's three compile for the H200 (sm_90) here,
without a GPU.

The interpreter runs a kernel's Python, not its compilation: a construct that Triton's compiler or
ptxas rejects passes every CPU test and fails only on the GPU machine. Triton compiles ahead of
time for a named target with its bundled ptxas, so CI catches that class of bug. (Triton here is
the newest release; the GPU machine runs 3.6, so this narrows the gap without closing it.)

The compiles run in a child process without TRITON_INTERPRET: under the interpreter `@triton.jit`
makes interpreter objects, which the compiler cannot take.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("bf16", "fp16")


def _variants():
    """(kernel, signature, constexprs, options) for every variant the launchers make."""
    from kernels.accept import (
        _accept_scan_kernel,
        _group_max_kernel,
        _grouped_top_k_kernel,
        _partials_kernel,
        _select_kernel,
        _thresholds_kernel,
    )
    from kernels.branch_attention import _branch_kernel
    from kernels.emit import _emit_kernel
    from kernels.prefix_attention import _prefix_split_kernel
    from kernels.rms_norm import _rms_norm_kernel
    from kernels.rope import _rope_qk_kernel, _rope_tables_kernel
    from kernels.silu_mul import _silu_mul_kernel

    for dtype in DTYPES:
        for has_residual in (False, True):
            for block_h, block_r in ((1024, 4), (4096, 1), (64, 64)):
                pointers = ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "sum_ptr")
                signature = {name: f"*{dtype}" for name in pointers}
                signature |= {"num_rows": "i32", "hidden_size": "i32", "eps": "fp32"}
                signature |= {"stride_x_row": "i64", "stride_r_row": "i64"}
                const = {"HAS_RESIDUAL": has_residual, "BLOCK_R": block_r, "BLOCK_H": block_h}
                warps = 8 if block_r * block_h > 4096 else 4
                yield _rms_norm_kernel, signature, const, {"num_warps": warps}
        signature = {"gate_up_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "inter_size": "i32"}
        signature |= {"stride_gu_row": "i64"}
        yield _silu_mul_kernel, signature, {"BLOCK": 1024}, {}
        emit_signature = {"tokens_ptr": "*i64", "num_new_ptr": "*i32", "out_tokens_ptr": "*i64"}
        emit_signature |= {"out_len_ptr": "*i32", "cycle_ptr": "*i32", "report_ptr": "*i64"}
        emit_signature |= {"anchor_ptr": "*i64", "cache_len_ptr": "*i32"}
        emit_signature |= {"ctx_positions_ptr": "*i64", "ctx_num_valid_ptr": "*i32"}
        emit_signature |= {"length": "i32", "capacity": "i32", "num_positions": "i32"}
        for has_cache, has_context in ((False, False), (True, False), (True, True)):
            const = {"HAS_CACHE": has_cache, "HAS_CONTEXT": has_context, "BLOCK": 16}
            yield _emit_kernel, emit_signature, const | {"BLOCK_P": 16}, {"num_warps": 1}
        for half, scaled in ((32, False), (64, True)):
            signature = {"positions_ptr": "*i64", "inv_freq_ptr": "*fp32", "cos_ptr": "*fp32"}
            signature |= {"sin_ptr": "*fp32", "num_rows": "i32", "seq_len": "i32"}
            signature |= {"stride_pb": "i64", "stride_pt": "i64", "scaling": "fp32"}
            const = {"HALF": half, "SCALED": scaled, "BLOCK_R": 32}
            yield _rope_tables_kernel, signature, const, {"num_warps": 1, "enable_fp_fusion": False}
        for head_dim in (64, 128):
            for has_norm in (False, True):
                for has_v in (False, True):
                    yield _rope_qk_kernel, *_rope_variant(dtype, head_dim, has_norm, has_v)
            for fused, has_mask in ((False, False), (True, False), (True, True)):
                yield _prefix_split_kernel, *_prefix_variant(dtype, head_dim, fused, has_mask)
            # the smallest row tile (a decode step's few rows)
            yield _prefix_split_kernel, *_prefix_variant(dtype, head_dim, True, False, block_m=16)
            for has_local, has_mask in ((False, False), (True, False), (True, True)):
                yield _branch_kernel, *_branch_variant(dtype, head_dim, has_local, has_mask)
        for greedy in (True, False):
            for pdl in (False, True):
                yield _partials_kernel, *_sampler_variant(dtype, greedy, pdl, select=False)
                yield _select_kernel, *_sampler_variant(dtype, greedy, pdl, select=True)
    for dtype, key_shift in (("bf16", 16), ("fp16", 13), ("fp32", 0)):
        signature = {"logits_ptr": f"*{dtype}", "rows_ptr": "*i32", "group_max_ptr": "*fp32"}
        signature |= {"vocab": "i32", "num_groups": "i32", "stride_row": "i64"}
        const = {"HAS_ROWS": True, "BLOCK": 8192, "GROUP": 64, "PDL": True}
        yield _group_max_kernel, signature, const, {"num_warps": 4, "launch_pdl": True}
        signature = {"logits_ptr": f"*{dtype}", "rows_ptr": "*i32", "group_max_ptr": "*fp32"}
        signature |= {"group_ids_ptr": "*i32", "candidate_x_ptr": "*fp32"}
        signature |= {"candidate_tok_ptr": "*i32", "uniforms_ptr": "*fp32", "tokens_ptr": "*i64"}
        signature |= {"vocab": "i32", "num_groups": "i32", "uniform_period": "i32"}
        signature |= {"top_k": "i32", "top_p": "fp32", "scale": "fp32", "stride_row": "i64"}
        for groups_kept, compact in ((32, False), (128, True)):  # top-k 20; top-k 128
            const = {"HAS_ROWS": True, "KEY_SHIFT": key_shift, "GROUP": 64}
            const |= {"GROUPS_KEPT": groups_kept, "CANDIDATES": 256, "BLOCK_G": 4096}
            const |= {"BLOCK": 4096, "COMPACT": compact, "PDL": True}
            yield _grouped_top_k_kernel, signature, const, {"num_warps": 4, "launch_pdl": True}
        signature = {"logits_ptr": f"*{dtype}", "rows_ptr": "*i32", "threshold_ptr": "*fp32"}
        signature |= {"vocab": "i32", "top_k": "i32", "top_p": "fp32", "scale": "fp32"}
        signature["stride_row"] = "i64"
        const = {"HAS_ROWS": True, "KEY_SHIFT": key_shift, "BLOCK": 8192, "PDL": True}
        yield _thresholds_kernel, signature, const, {"num_warps": 32, "launch_pdl": True}
    for pdl in (False, True):
        signature = {"cand_ptr": "*i64", "rows_ptr": "*i32", "tokens_ptr": "*i64"}
        signature |= {"num_accepted_ptr": "*i32", "bonus_ptr": "*i64", "branch_ptr": "*i32"}
        signature |= {"path_rows_ptr": "*i32", "out_tokens_ptr": "*i64"}
        signature |= {"target_tokens_ptr": "*i64", "num_branches": "i32", "depth": "i32"}
        const = {"HAS_ROWS": True, "BLOCK_B": 8, "BLOCK_T": 32, "PDL": pdl}
        yield _accept_scan_kernel, signature, const, {"num_warps": 4, "launch_pdl": pdl}


def _sampler_variant(dtype: str, greedy: bool, pdl: bool, *, select: bool):
    """accept's partials pass or its select kernel over V = 151936 (chunks of 4096 greedy, 8192
    sampled), greedy or sampled with a top-k/top-p threshold, with or without programmatic
    dependent launch."""
    signature = {"logits_ptr": f"*{dtype}", "rows_ptr": "*i32", "threshold_ptr": "*fp32"}
    signature |= {"chunk_max_ptr": "*fp32", "chunk_mass_ptr": "*fp32"}
    if select:
        signature |= {"uniforms_ptr": "*fp32", "tokens_ptr": "*i64"}
    signature |= {"vocab": "i32", "num_chunks": "i32"}
    if select:
        signature["uniform_period"] = "i32"
    signature |= {"scale": "fp32", "stride_row": "i64"}
    const = {"HAS_ROWS": True, "HAS_THRESHOLD": not greedy, "GREEDY": greedy}
    const |= {"BLOCK": 4096 if greedy else 8192, "PDL": pdl}
    if select:
        const["BLOCK_S"] = 64 if greedy else 32
    return signature, const, {"num_warps": 8 if select else 4, "launch_pdl": pdl}


def _prefix_variant(dtype: str, head_dim: int, fused: bool, has_mask: bool, block_m: int = 64):
    """The cascade's split pass; fused: the one-launch cascade (local keys, the atomic arrival
    and the merge of the last split)."""
    signature = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}"}
    signature |= {"cache_len_ptr": "*i32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32"}
    signature |= {"k_local_ptr": f"*{dtype}", "v_local_ptr": f"*{dtype}", "mask_ptr": "*i32"}
    signature |= {"o_ptr": f"*{dtype}", "lse_ptr": "*fp32", "arrivals_ptr": "*i32"}
    for name in ("num_rows", "seq_len", "group", "max_len", "num_splits", "split_min_keys"):
        signature[name] = "i32"
    strides = ["qb", "qt", "qh", "kn", "kh", "vn", "vh", "os", "ob", "ot", "oh", "ls", "lb"]
    strides += ["lt", "lh", "lkt", "lkh", "lvt", "lvh", "mt", "o_b", "o_t", "o_h"]
    strides += ["lse_b", "lse_t", "lse_h"]
    signature |= {f"stride_{name}": "i64" for name in strides}
    signature |= {"qk_scale": "fp32", "window_left": "i32", "store_empty_o": "i32"}
    signature |= {"causal": "i32", "rows_bucket": "i32"}
    const = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": 64, "DOT_PRECISION": "tf32"}
    const |= {"FUSED": fused, "HAS_MASK": has_mask}
    return signature, const, {"num_warps": 4, "num_stages": 3}


def _branch_variant(dtype: str, head_dim: int, has_local: bool, has_mask: bool):
    """The cascade's second launch (local keys + merge) and prefix_attention's merge (no local);
    without a mask the launcher passes None for it."""
    signature = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}"}
    signature["mask_ptr"] = "*i32" if has_mask else "constexpr"
    signature |= {"state_o_ptr": "*fp32", "state_lse_ptr": "*fp32", "o_ptr": f"*{dtype}"}
    signature |= {"lse_ptr": "*fp32", "seq_len": "i32", "group": "i32", "num_states": "i32"}
    strides = ["qb", "qt", "qh", "kb", "kt", "kh", "vb", "vt", "vh", "mb", "mt"]
    strides += ["so_s", "so_b", "so_t", "so_h", "sl_s", "sl_b", "sl_t", "sl_h"]
    strides += ["ob", "ot", "oh", "lb", "lt", "lh"]
    signature |= {f"stride_{name}": "i64" for name in strides}
    signature |= {"qk_scale": "fp32", "window_left": "i32", "causal": "i32", "rows_bucket": "i32"}
    const = {"HEAD_DIM": head_dim, "BLOCK_M": 32, "BLOCK_N": 32, "HAS_LOCAL": has_local}
    const |= {"HAS_MASK": has_mask, "DOT_PRECISION": "tf32"}
    if not has_mask:
        const["mask_ptr"] = None
    return signature, const, {"num_warps": 4, "num_stages": 2}


def _rope_variant(dtype: str, head_dim: int, has_norm: bool, has_v: bool):
    signature = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}"}
    signature |= {"cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    for name in ("q_weight_ptr", "k_weight_ptr", "q_out_ptr", "k_out_ptr", "v_out_ptr"):
        signature[name] = f"*{dtype}"
    signature |= {"num_q_heads": "i32", "num_kv_heads": "i32", "cos_rows": "i32"}
    signature["eps"] = "fp32"
    for name in ("q", "k", "v", "cos", "sin"):
        signature[f"stride_{name}_row"] = "i64"
    # the launcher's options: one warp, no FMA contraction (torch's roundings)
    options = {"num_warps": 1, "enable_fp_fusion": False}
    return signature, {"HEAD_DIM": head_dim, "HAS_NORM": has_norm, "HAS_V": has_v}, options


def main() -> int:
    """Compile every variant for sm_90; print one line each; exit 1 on the first failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    for kernel, signature, constexprs, options in _variants():
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=options)
        assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"
        print(f"ok {kernel.__name__} {next(iter(signature.values()))} {constexprs}")
    return 0


def test_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launchers' default, stated (no warning)
    proc = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # per dtype: rms_norm, silu_mul, emit, rope tables, rope, prefix, branch, accept's partials
    # and select (greedy / sampled, with and without PDL); then the group maxima, the grouped
    # top-k (a tile of 32 groups, 128 compacted) and the threshold kernels (bf16, fp16, fp32) and
    # the walk (with and without PDL)
    per_dtype = 6 + 1 + 3 + 2 + 8 + 8 + 6 + 8
    assert proc.stdout.count("ok ") == len(DTYPES) * per_dtype + 12 + 2, proc.stdout


if __name__ == "__main__":
    sys.exit(main())
