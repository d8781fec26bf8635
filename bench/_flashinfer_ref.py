"""FlashInfer reference sequences (FlashInfer 0.7.x) for the attention GPU tests and benchmarks.

The reference code's per-layer verify attention, which our `cascade_attention` replaces:
1. one `single_prefill_with_kv_cache` of all B*T queries, non-causal, against the shared prefix
   (`return_lse=True`);
2. per branch: `single_prefill_with_kv_cache` of its T queries against its T local keys (causal
   for target verify), then `merge_state_in_place` of the prefix state into it.
And FlashInfer's own two-level `MultiLevelCascadeAttentionWrapper` over a paged copy of the same
K/V (plan once, then `run`). Layouts follow ARCHITECTURE.md: q [B, T, Hq, D], prefix K/V
[L, Hkv, D] (a host-sized slice of the cache: FlashInfer's single prefill takes its length from the
shape), local K/V [B, T, Hkv, D]. FlashInfer's LSE is base 2, like ours.

Every entry point needs `import flashinfer` to work; `flashinfer_module()` says whether it does.
Each FlashInfer kernel variant JIT-compiles on first use (~70-85 s per prefill variant on an H200).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from bench._harness import print_table


def flashinfer_module():
    """The flashinfer module, or None where it is not installed (benchmarks then print None)."""
    try:
        import flashinfer
    except Exception:  # missing wheel or a broken CUDA toolchain: same outcome, no FlashInfer
        return None
    return flashinfer


def prefix_prefill(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    *,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: all B*T queries against the prefix, non-causal. Returns o [B, T, Hq, D] (q.dtype)
    and lse [B, T, Hq] float32 (base 2)."""
    import flashinfer

    batch, seq, num_q_heads, head_dim = q.shape
    o, lse = flashinfer.single_prefill_with_kv_cache(
        q.reshape(batch * seq, num_q_heads, head_dim),
        k_prefix,
        v_prefix,
        causal=False,
        sm_scale=sm_scale,
        return_lse=True,
    )
    return o.view(batch, seq, num_q_heads, head_dim), lse.view(batch, seq, num_q_heads)


def branch_sequence(
    q: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    prefix_o: torch.Tensor | None,
    prefix_lse: torch.Tensor | None,
    *,
    causal: bool,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 for every branch: local prefill, then merge the prefix state (same dtype as q) into
    it. Returns the stacked o [B, T, Hq, D] and lse [B, T, Hq]."""
    outs = _branches(q, k_local, v_local, prefix_o, prefix_lse, causal=causal, sm_scale=sm_scale)
    return torch.stack([o for o, _ in outs]), torch.stack([lse for _, lse in outs])


def _branches(q, k_local, v_local, prefix_o, prefix_lse, *, causal, sm_scale):
    import flashinfer

    outs = []
    for b in range(q.shape[0]):
        o, lse = flashinfer.single_prefill_with_kv_cache(
            q[b], k_local[b], v_local[b], causal=causal, sm_scale=sm_scale, return_lse=True
        )
        if prefix_o is not None:
            flashinfer.merge_state_in_place(o, lse, prefix_o[b], prefix_lse[b])
        outs.append((o, lse))
    return outs


def cascade_sequence(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    causal: bool,
    sm_scale: float | None = None,
) -> list[torch.Tensor]:
    """The whole reference sequence (1 + 2B launches, plus B merges). Returns the per-branch o
    [T, Hq, D] as a list (stacking would add a copy the reference code does not make)."""
    prefix_o = prefix_lse = None
    if k_prefix.shape[0] > 0:  # FlashInfer's prefill wants at least one key
        prefix_o, prefix_lse = prefix_prefill(q, k_prefix, v_prefix, sm_scale=sm_scale)
    outs = _branches(q, k_local, v_local, prefix_o, prefix_lse, causal=causal, sm_scale=sm_scale)
    return [o for o, _ in outs]


class MultiLevelCascade:
    """FlashInfer's two-level cascade (shared prefix, then each branch's local keys) over a paged
    copy of the K/V. Construction copies the K/V into pages and calls plan(); `run(q)` is the
    timed part. Needs a nonempty prefix."""

    def __init__(
        self,
        k_prefix: torch.Tensor,
        v_prefix: torch.Tensor,
        k_local: torch.Tensor,
        v_local: torch.Tensor,
        num_q_heads: int,
        *,
        causal: bool,
        sm_scale: float | None = None,
        page_size: int = 16,
    ) -> None:
        import flashinfer

        batch, seq, num_kv_heads, head_dim = k_local.shape
        prefix_len = k_prefix.shape[0]
        assert prefix_len > 0, "MultiLevelCascade needs a nonempty prefix"
        device, dtype = k_local.device, k_local.dtype
        prefix_pages = -(-prefix_len // page_size)
        local_pages = -(-seq // page_size)
        num_pages = prefix_pages + batch * local_pages
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_pages = torch.zeros(shape, dtype=dtype, device=device)
        self.v_pages = torch.zeros(shape, dtype=dtype, device=device)
        for pages, src in ((self.k_pages, k_prefix), (self.v_pages, v_prefix)):
            pages[:prefix_pages].view(-1, num_kv_heads, head_dim)[:prefix_len] = src
        for pages, src in ((self.k_pages, k_local), (self.v_pages, v_local)):
            for b in range(batch):
                first = prefix_pages + b * local_pages
                pages[first : first + local_pages].view(-1, num_kv_heads, head_dim)[:seq] = src[b]

        def i32(values) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.int32, device=device)

        self.workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, self.workspace, "NHD")
        self.wrapper.plan(
            [i32([0, batch * seq]), i32([b * seq for b in range(batch + 1)])],
            [i32([0, prefix_pages]), i32([b * local_pages for b in range(batch + 1)])],
            [i32(list(range(prefix_pages))), i32(list(range(prefix_pages, num_pages)))],
            [
                i32([prefix_len - (prefix_pages - 1) * page_size]),
                i32([seq - (local_pages - 1) * page_size] * batch),
            ],
            num_q_heads,
            num_kv_heads,
            head_dim,
            page_size,
            causal=causal,  # applies to the last (branch-local) level only
            sm_scale=sm_scale,
            q_data_type=dtype,
            kv_data_type=dtype,
        )

    def run(self, q_flat: torch.Tensor) -> torch.Tensor:
        """q_flat [B*T, Hq, D] -> o [B*T, Hq, D]."""
        return self.wrapper.run(q_flat, (self.k_pages, self.v_pages))


def run_vs_flashinfer(
    title: str,
    columns: Sequence[str],
    shapes: Iterable[tuple],
    measure: Callable[..., dict],
) -> list[dict]:
    """The rows of an attention benchmark: `measure(*shape, fi)` per shape, fi = the FlashInfer
    module or None (its baselines then stay empty), the CUDA cache freed between shapes (the
    32k-prefix shapes hold GBs); prints the table and returns the rows."""
    fi = flashinfer_module()
    rows = []
    for shape in shapes:
        rows.append(measure(*shape, fi))
        torch.cuda.empty_cache()
    print_table(title, rows, columns)
    return rows
