"""D2SD Triton kernels, each with an fp32 torch reference (`<op>_ref`). See ARCHITECTURE.md.

The public API is what this module exports; model code reaches kernels only through it.
Each name is imported from its kernel file on first use, so importing `kernels` stays cheap and a
CPU-only caller that never touches a kernel never compiles one.
"""

from importlib import import_module

# public name -> the kernel file (one file per op) that defines it
_EXPORTS = {
    **dict.fromkeys(("lse_merge", "lse_merge_", "lse_merge_ref"), "lse_merge"),
    **dict.fromkeys(("prefix_attention", "prefix_attention_ref"), "prefix_attention"),
    **dict.fromkeys(("branch_attention", "branch_attention_ref"), "branch_attention"),
    **dict.fromkeys(("cascade_attention", "cascade_attention_ref"), "cascade_attention"),
    **dict.fromkeys(("topk_confidence", "topk_confidence_ref"), "topk_confidence"),
    **dict.fromkeys(("tree_mask", "tree_mask_ref", "Tree"), "tree_mask"),
    **dict.fromkeys(
        ("accept", "accept_ref", "Accept", "sample_tokens", "sample_tokens_ref"), "accept"
    ),
    **dict.fromkeys(("commit", "commit_ref"), "commit"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
