"""The decoder-block kernels compile for the H200 (sm_90) here, without a GPU.

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
    from kernels.rms_norm import _rms_norm_kernel
    from kernels.rope import _rope_qk_kernel
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
        for head_dim in (64, 128):
            for has_norm in (False, True):
                for has_v in (False, True):
                    yield _rope_qk_kernel, *_rope_variant(dtype, head_dim, has_norm, has_v)


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


def test_decoder_block_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launchers' default, stated (no warning)
    proc = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == len(DTYPES) * (6 + 1 + 8), proc.stdout


if __name__ == "__main__":
    sys.exit(main())
