"""D2SD Triton kernels, each with an fp32 torch reference (`<op>_ref`). See ARCHITECTURE.md.

The public API is what this module exports; model code reaches kernels only through it. Each
launcher has the name of its file, so the imports below deliberately bind the function over the
submodule attribute that the import system sets (`kernels.commit` is the function).
"""

from kernels._attention import pack_mask, unpack_mask
from kernels.accept import Accept, accept, accept_ref, sample_tokens, sample_tokens_ref
from kernels.branch_attention import branch_attention, branch_attention_ref
from kernels.cascade_attention import cascade_attention, cascade_attention_ref
from kernels.commit import commit, commit_ref
from kernels.emit import emit, emit_ref
from kernels.lse_merge import lse_merge, lse_merge_, lse_merge_ref
from kernels.prefix_attention import prefix_attention, prefix_attention_ref
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.rope import (
    rope_qk,
    rope_qk_ref,
    rope_qk_store,
    rope_qk_store_ref,
    rope_tables,
    rope_tables_ref,
)
from kernels.silu_mul import silu_mul, silu_mul_ref
from kernels.topk_confidence import topk_confidence, topk_confidence_ref
from kernels.tree_mask import Tree, tree_mask, tree_mask_ref

__all__ = [
    "Accept",
    "Tree",
    "accept",
    "accept_ref",
    "branch_attention",
    "branch_attention_ref",
    "cascade_attention",
    "cascade_attention_ref",
    "commit",
    "commit_ref",
    "emit",
    "emit_ref",
    "lse_merge",
    "lse_merge_",
    "lse_merge_ref",
    "pack_mask",
    "prefix_attention",
    "prefix_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_qk",
    "rope_qk_ref",
    "rope_qk_store",
    "rope_qk_store_ref",
    "rope_tables",
    "rope_tables_ref",
    "sample_tokens",
    "sample_tokens_ref",
    "silu_mul",
    "silu_mul_ref",
    "topk_confidence",
    "topk_confidence_ref",
    "tree_mask",
    "tree_mask_ref",
    "unpack_mask",
]
