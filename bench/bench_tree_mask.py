"""Microbenchmark of `tree_mask` (kernels/tree_mask.py) against its reference.

Shapes: K = 4 VP branches, γ = 16, γ2 in {16, 32}, token ids from the Qwen3 (151936) and SmolLM2
(49152) vocabularies (the vocabulary only sets the id range; the tree size is what matters). The
branches look like a real cycle: the VP drafts agree with the first draft for a few tokens after
their branch point, then drift. The kernel is timed as a CUDA-graph replay; the reference is a
host-side trie walk (it syncs), timed eagerly. GB/s = (inputs + outputs) bytes / time; the
roofline is that byte count at 4.3 TB/s: this kernel is pure latency.
"""

from __future__ import annotations

import torch

from bench._harness import VS_REF_COLUMNS, print_table, time_vs_ref
from kernels.tree_mask import tree_mask, tree_mask_ref

COLUMNS = ["vocab", "gamma", "gamma2", "K", "nodes", *VS_REF_COLUMNS, "x_ref"]


def _branches(vocab: int, gamma: int, gamma2: int, num_branches: int):
    first = torch.randint(0, vocab, (gamma2,), device="cuda")
    branch_len = torch.randint(0, gamma - 1, (num_branches,), device="cuda", dtype=torch.int32)
    branches = torch.randint(0, vocab, (num_branches, gamma2), device="cuda")
    pos = torch.arange(gamma2, device="cuda")
    # keep the first draft up to 2 positions past the branch point, then drift
    same = pos[None, :] <= branch_len[:, None] + 2
    return first, torch.where(same, first[None, :], branches), branch_len


def run(quick: bool = False) -> list[dict]:
    """Time kernel and reference per shape; print a table and return its rows."""
    gamma, num_branches = 16, 4
    shapes = [(v, g2) for v in (151936, 49152) for g2 in ((16,) if quick else (16, 32))]
    rows = []
    for vocab, gamma2 in shapes:
        first, branches, branch_len = _branches(vocab, gamma, gamma2, num_branches)
        args = (first, branches, branch_len)
        n = (num_branches + 1) * gamma2
        nbytes = first.numel() * 8 + branches.numel() * 8 + num_branches * 4  # inputs
        nbytes += n * (8 + 4 + 4) + 4 + n * ((n + 31) // 32) * 4 + n * 4  # outputs
        # the reference is a host trie walk that syncs: timed eagerly
        timed = time_vs_ref(
            lambda a=args: tree_mask(*a),
            lambda a=args: tree_mask_ref(*a),
            nbytes,
            ref_cuda_graph=False,
            speedup_key="x_ref",
        )
        rows.append(
            {
                "kernel": "tree_mask",
                "vocab": vocab,
                "gamma": gamma,
                "gamma2": gamma2,
                "K": num_branches,
                "nodes": int(tree_mask(*args).num_nodes),
                **timed,
            }
        )
    print_table("tree_mask (kernel: CUDA graph replay; reference: eager host trie)", rows, COLUMNS)
    return rows


if __name__ == "__main__":
    run()
