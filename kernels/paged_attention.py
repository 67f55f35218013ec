"""Causal attention of packed query tokens over a paged KV cache: decode, prefill and chunked prefill.

Contract (shared with llmx.runtime.layers.attention):
  q            [T, num_heads, head_dim]  packed query tokens of num_seqs sequences
  k/v_cache    [num_blocks, block_size, num_kv_heads, head_dim]  bf16/fp16/fp32, or fp8 e4m3 / int8 with
               per-layer float32 scales k_scale / v_scale (stored = round(x / scale))
  block_tables int32 [num_seqs, max_blocks_per_seq]  (padded with 0 where unused)
  seq_lens     int32 [num_seqs]  KV length of each sequence INCLUDING this step's tokens (already written)
  query_start_loc int32 [num_seqs + 1]  cumulative query lengths
Query j of sequence b sits at position p = seq_lens[b] - q_len_b + j and attends to KV positions
[0, p], or with a sliding window W to (p - W, p]. Query head h reads KV head h // (num_heads // num_kv_heads).
Returns out [T, num_heads, head_dim] in q's dtype.

Kernels (Hopper-minded; both read each KV tile once for all query heads that share its KV head):
  * decode (every q_len == 1): one program per (sequence, KV head, context split). When
    num_seqs * num_kv_heads is small next to the SM count, the context is split ("flash-decoding"). The
    grid's NUM_SPLITS depends on shapes only (CUDA-graph safe); each program cuts its sequence's LIVE
    context from seq_lens on the device, so a short context in a max_seq_len-wide table spreads over a
    few splits instead of falling to split 0. Splits write float32 partials (output, log-sum-exp) and
    count themselves in an int32 per (sequence, KV head); the last to arrive merges them and zeroes the
    count. Those buffers are allocated once per shape (`split_buffers`) and shared by every layer and
    graph replay, so decode launches of one shape must be stream-ordered.
  * prefill: one program per (tile of BLOCK_Q queries, sequence, KV head); the rows of a tile are
    (query, head-of-the-group) pairs so GQA heads share K/V loads; online softmax over KV tiles.
The dispatcher `paged_attention` picks by max_query_len. Scores run through exp2 with the softmax scale
folded into log2(e) units; quantized caches fold k_scale into the scores and v_scale into the output.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._triton_util import (
    FLOAT_DTYPES,
    QUANTIZED_KV_DTYPES,
    cdiv,
    check_launch_device,
    check_scale,
    jit,
    next_power_of_2,
    sm_count,
    tl,
)
from llmx.kernels.pdl import pdl_launch, wait_and_release

_LOG2_E = 1.4426950408889634
# The decode kernel gives a split at least one 64-token tile (Llama-3-8B: 2 KiB of float32 partials per
# KV head next to 32 KiB of bf16 K/V read), so a table of N tokens keeps at most N // 64 splits busy.
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 64
# At run time a live context is cut into at most MERGE_CHUNK splits (merged in one round) as long as that
# gives a split no more than FEW_SPLITS_MAX_TILES tiles; longer contexts use every split of the launch.
# This rule won every row of a sweep against fixed tiles per split (BENCHMARKS.md): few splits keep the merge
# cheap for short contexts, every split keeps long ones spread over the SMs.
MERGE_CHUNK = 8
FEW_SPLITS_MAX_TILES = 4
# Stand-in for "no sliding window": larger than any position, small enough for int32 arithmetic.
_NO_WINDOW = 1 << 30
_REF_QUERY_CHUNK = 512


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@jit
def _physical_blocks(block_tables_ptr, seq, kv_positions, kv_mask, stride_table, BLOCK_SIZE: tl.constexpr):
    """The cache block of each of `kv_positions` [BLOCK_N] of sequence `seq`, from its block table (0 where
    masked)."""
    return tl.load(block_tables_ptr + seq * stride_table + kv_positions // BLOCK_SIZE, mask=kv_mask, other=0)


@jit
def _gather_kv(cache_ptr, physical_block, kv_head, kv_positions, kv_mask, dims, dim_mask, stride_block, stride_slot,
               stride_head, BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N, BLOCK_D] K or V rows for `kv_positions`, which lie in the cache blocks `physical_block`.

    Each position resolves its own physical block, so a tile may span cache blocks in any order and the
    tile width is independent of the cache block size.
    """
    row = physical_block.to(tl.int64) * stride_block + (kv_positions % BLOCK_SIZE) * stride_slot + kv_head * stride_head
    return tl.load(cache_ptr + row[:, None] + dims[None, :], mask=kv_mask[:, None] & dim_mask[None, :], other=0.0)


@jit
def _load_kv_tile(cache_ptr, block_tables_ptr, seq, kv_head, kv_positions, kv_mask, dims, dim_mask,
                  stride_table, stride_block, stride_slot, stride_head, BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N, BLOCK_D] K or V rows for `kv_positions` of sequence `seq`, gathered through its block table."""
    physical_block = _physical_blocks(block_tables_ptr, seq, kv_positions, kv_mask, stride_table, BLOCK_SIZE)
    return _gather_kv(cache_ptr, physical_block, kv_head, kv_positions, kv_mask, dims, dim_mask, stride_block,
                      stride_slot, stride_head, BLOCK_SIZE)


@jit
def _online_softmax_step(scores, v, m_i, l_i, acc, compute_dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one tile of masked scores [M, N] (log2 units, -inf = masked) and V [N, D] into the running
    row max m_i [M], denominator l_i [M] and unnormalised output acc [M, D].

    Rows whose scores are all -inf so far keep m = -inf; the max is then replaced by 0 before
    subtracting, so no inf - inf NaN appears and their weights stay exactly zero.
    """
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(compute_dtype), v.to(compute_dtype), input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@jit
def _store_head_rows(out_ptr, token, heads, dims, rows, row_mask, dim_mask, stride_o_token, stride_o_head):
    """rows [GROUP_PAD, BLOCK_D] float32 -> out[token, heads, :] in out's dtype."""
    tl.store(out_ptr + token * stride_o_token + heads[:, None] * stride_o_head + dims[None, :],
             rows.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@jit
def _merge_partials(partial_out_ptr, partial_lse_ptr, first_row, num_partials, out_ptr, token, kv_head,
                    stride_o_token, stride_o_head, GROUP: tl.constexpr, MERGE_GROUP_PAD: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """out = sum_s 2^(lse_s - M) * out_s / sum_s 2^(lse_s - M) for each head of the KV group: every split's
    normalised output re-weighted by its share of the softmax denominator (lse in log2 units, M = max_s).

    Partial row of (split s, group head g) = first_row + s * GROUP + g. All heads of the group merge together,
    SPLIT_CHUNK splits at a time ([SPLIT_CHUNK, MERGE_GROUP_PAD, BLOCK_D] float32 loads, a running max across
    chunks): the loads wait on L2, and one round of them per chunk, not per head, keeps that wait short. The
    loads use .cg (L2, not L1): other SMs wrote these rows during this launch, and a line this SM cached
    earlier could be stale.
    """
    splits = tl.arange(0, SPLIT_CHUNK)
    heads = tl.arange(0, MERGE_GROUP_PAD)
    dims = tl.arange(0, BLOCK_D)
    m = tl.full([MERGE_GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([MERGE_GROUP_PAD], tl.float32)
    acc = tl.zeros([MERGE_GROUP_PAD, BLOCK_D], tl.float32)
    for s0 in range(0, num_partials, SPLIT_CHUNK):
        valid = ((s0 + splits) < num_partials)[:, None] & (heads < GROUP)[None, :]  # [C, G]
        rows = first_row + (s0 + splits)[:, None] * GROUP + heads[None, :]
        lse = tl.load(partial_lse_ptr + rows, mask=valid, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(partial_out_ptr + rows[:, :, None] * HEAD_DIM + dims[None, None, :],
                       mask=valid[:, :, None] & (dims < HEAD_DIM)[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        weights = tl.exp2(lse - m_shift[None, :])  # [C, G]; 0 for empty splits and padding
        alpha = tl.exp2(m - m_shift)
        total = total * alpha + tl.sum(weights, axis=0)
        acc = acc * alpha[:, None] + tl.sum(part * weights[:, :, None], axis=0)
        m = m_new
    merged = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + token * stride_o_token + (kv_head * GROUP + heads)[:, None] * stride_o_head + dims[None, :],
             merged.to(out_ptr.dtype.element_ty), mask=(heads < GROUP)[:, None] & (dims < HEAD_DIM)[None, :])


@jit
def _soft_cap_log2(scores, softcap):
    """Scores in log2 units (natural score * log2 e) -> cap * tanh(score / cap) in log2 units (Gemma 2).
    tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no libdevice call."""
    natural = scores * (1.0 / 1.4426950408889634)
    capped = softcap * (1.0 - 2.0 / (tl.exp(2.0 * natural / softcap) + 1.0))
    return capped * 1.4426950408889634


@jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    k_scale_ptr, v_scale_ptr, out_ptr, partial_out_ptr, partial_lse_ptr, arrivals_ptr,
    qk_scale_log2, sliding_window, softcap,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
    stride_table,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, MERGE_GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_CHUNK: tl.constexpr, FEW_SPLITS_MAX_TILES: tl.constexpr,
    KV_QUANTIZED: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr, SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The step's inputs (seq_lens, query_start_loc, block_tables) are read before the PDL wait. They are written
    # before the step's first kernel, and this kernel starts only once the one before it has passed its own
    # wait, so every kernel two back has completed (kernels/pdl.py): these reads cannot be early, and the block
    # table's latency overlaps the previous kernel's tail.
    seq_len = tl.load(seq_lens_ptr + seq)

    # The one query sits at position seq_len - 1 and sees [window_start, seq_len). Those BLOCK_N tiles
    # (the first aligned down) are shared out as runs of tiles_per_split to the first active_splits
    # programs, from the LIVE length: a CUDA graph's block table is max_seq_len wide, and cutting the
    # table instead would leave a short context to split 0 alone. The other splits exit at once. Up to
    # SPLIT_CHUNK * FEW_SPLITS_MAX_TILES tiles, a context takes at most SPLIT_CHUNK splits: the merge then
    # reads the partials in one round, and fewer programs wait on the arrival count.
    window_start = tl.maximum(seq_len - sliding_window, 0)
    first_tile = window_start // BLOCK_N * BLOCK_N
    num_tiles = tl.cdiv(seq_len - first_tile, BLOCK_N)
    few_splits = tl.minimum(tl.cdiv(num_tiles, SPLIT_CHUNK), FEW_SPLITS_MAX_TILES)
    tiles_per_split = tl.maximum(tl.maximum(tl.cdiv(num_tiles, NUM_SPLITS), few_splits), 1)
    active_splits = tl.maximum(tl.cdiv(num_tiles, tiles_per_split), 1)  # 1 even for an empty sequence
    if split < active_splits:
        token = tl.load(query_start_loc_ptr + seq).to(tl.int64)
        kv_begin = first_tile + split * tiles_per_split * BLOCK_N
        kv_end = tl.minimum(kv_begin + tiles_per_split * BLOCK_N, seq_len)
        # The cache blocks of the next tile are read one tile ahead: the first before the wait, the others
        # while the tile before them is in use, so no K/V read waits on a block-table read.
        next_positions = kv_begin + tl.arange(0, BLOCK_N)
        physical = _physical_blocks(block_tables_ptr, seq, next_positions, next_positions < kv_end, stride_table,
                                    BLOCK_SIZE)
        wait_and_release(PDL)  # q, K and V come from this step's kernels

        group_rows = tl.arange(0, GROUP_PAD)
        row_mask = group_rows < GROUP
        heads = kv_head * GROUP + group_rows
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        q = tl.load(q_ptr + token * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

        qk_scale = qk_scale_log2
        if KV_QUANTIZED:
            qk_scale = qk_scale * tl.load(k_scale_ptr)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
        for tile_start in range(kv_begin, kv_end, BLOCK_N):
            kv_positions = tile_start + tl.arange(0, BLOCK_N)
            kv_mask = (kv_positions >= window_start) & (kv_positions < kv_end)
            # K and V are both asked for before the scores need K.
            k = _gather_kv(k_cache_ptr, physical, kv_head, kv_positions, kv_mask, dims, dim_mask, stride_k_block,
                           stride_k_slot, stride_k_head, BLOCK_SIZE)
            v = _gather_kv(v_cache_ptr, physical, kv_head, kv_positions, kv_mask, dims, dim_mask, stride_v_block,
                           stride_v_slot, stride_v_head, BLOCK_SIZE)
            next_positions = kv_positions + BLOCK_N
            physical = _physical_blocks(block_tables_ptr, seq, next_positions, next_positions < kv_end,
                                        stride_table, BLOCK_SIZE)
            scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
            if SOFTCAP:
                scores = _soft_cap_log2(scores, softcap)
            scores = tl.where(kv_mask[None, :], scores, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, q.dtype, DOT_PRECISION)

        if KV_QUANTIZED:
            acc = acc * tl.load(v_scale_ptr)
        # An empty range (seq_len 0) has l = 0: output 0, log-sum-exp -inf.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        # A lone split writes its rows directly; the constexpr test keeps the partial path out of
        # NUM_SPLITS == 1 kernels (their partial and arrival pointers are stand-ins).
        if NUM_SPLITS == 1:
            _store_head_rows(out_ptr, token, heads, dims, out, row_mask, dim_mask, stride_o_token, stride_o_head)
        elif active_splits == 1:
            _store_head_rows(out_ptr, token, heads, dims, out, row_mask, dim_mask, stride_o_token, stride_o_head)
        else:
            # Partials of (seq, kv_head) are [NUM_SPLITS, GROUP] rows from first_row, float32 [HEAD_DIM] each.
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            first_row = (seq * NUM_HEADS + kv_head * GROUP).to(tl.int64) * NUM_SPLITS
            rows = first_row + split * GROUP + group_rows
            tl.store(partial_lse_ptr + rows, lse, mask=row_mask)
            tl.store(partial_out_ptr + rows[:, None] * HEAD_DIM + dims[None, :], out,
                     mask=row_mask[:, None] & dim_mask[None, :])
            # Last one in merges. The barrier makes every thread's stores precede the (one-thread) release;
            # the acq_rel add orders them before the arrival count that the merging program acquires.
            tl.debug_barrier()
            arrivals = arrivals_ptr + seq * tl.num_programs(1) + kv_head
            arrived_before = tl.atomic_add(arrivals, 1, sem="acq_rel", scope="gpu")
            if arrived_before == active_splits - 1:
                _merge_partials(partial_out_ptr, partial_lse_ptr, first_row, active_splits, out_ptr, token,
                                kv_head, stride_o_token, stride_o_head, GROUP, MERGE_GROUP_PAD, HEAD_DIM, BLOCK_D,
                                SPLIT_CHUNK)
                # Every split of this launch has arrived: zero the count for the next launch (graph replay).
                tl.store(arrivals, 0)


@jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    k_scale_ptr, v_scale_ptr, out_ptr,
    qk_scale_log2, sliding_window, softcap,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
    stride_table,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_QUANTIZED: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    query_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if query_block * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        cached = seq_len - q_len  # KV positions before this step's first query

        # Row r of the tile is query r // GROUP_PAD of this block, head r % GROUP_PAD of the KV group.
        rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
        query_index = query_block * BLOCK_Q + rows // GROUP_PAD
        group_index = rows % GROUP_PAD
        row_mask = (query_index < q_len) & (group_index < GROUP)
        heads = kv_head * GROUP + group_index
        positions = cached + query_index
        tokens = (q_start + query_index).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        q = tl.load(q_ptr + tokens[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

        # KV range of the whole tile: up to its last query (causal), from its first query's window start.
        first_position = cached + query_block * BLOCK_Q
        kv_end = tl.minimum(first_position + BLOCK_Q, seq_len)
        kv_start = tl.maximum(first_position - sliding_window + 1, 0)

        qk_scale = qk_scale_log2
        if KV_QUANTIZED:
            qk_scale = qk_scale * tl.load(k_scale_ptr)
        m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], tl.float32)
        for tile_start in range(kv_start, kv_end, BLOCK_N):
            kv_positions = tile_start + tl.arange(0, BLOCK_N)
            kv_mask = kv_positions < kv_end
            k = _load_kv_tile(k_cache_ptr, block_tables_ptr, seq, kv_head, kv_positions, kv_mask, dims, dim_mask,
                              stride_table, stride_k_block, stride_k_slot, stride_k_head, BLOCK_SIZE)
            scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
            if SOFTCAP:
                scores = _soft_cap_log2(scores, softcap)
            visible = ((kv_positions[None, :] <= positions[:, None])
                       & (kv_positions[None, :] > positions[:, None] - sliding_window)
                       & kv_mask[None, :])
            scores = tl.where(visible, scores, float("-inf"))
            v = _load_kv_tile(v_cache_ptr, block_tables_ptr, seq, kv_head, kv_positions, kv_mask, dims, dim_mask,
                              stride_table, stride_v_block, stride_v_slot, stride_v_head, BLOCK_SIZE)
            m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, q.dtype, DOT_PRECISION)

        if KV_QUANTIZED:
            acc = acc * tl.load(v_scale_ptr)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tokens[:, None] * stride_o_token + heads[:, None] * stride_o_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


# ----------------------------------------------------------------------------------------------------
# Input checks shared by the kernels and the reference
# ----------------------------------------------------------------------------------------------------


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scale, v_scale,
                  sliding_window, softcap=None) -> None:
    op = "paged_attention"
    if q.dim() != 3:
        raise LlmxError(f"{op}: q must be [tokens, num_heads, head_dim], got shape {tuple(q.shape)}.")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise LlmxError(f"{op}: k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
                        f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}.")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise LlmxError(f"{op}: the KV cache's head_dim {k_cache.shape[3]} differs from q's {head_dim}.")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise LlmxError(f"{op}: num_heads {num_heads} must be a multiple of the cache's num_kv_heads {num_kv_heads}.")
    if q.dtype not in FLOAT_DTYPES:
        raise LlmxError(f"{op}: q must be float16/bfloat16/float32, got {q.dtype}.")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype,) + QUANTIZED_KV_DTYPES:
        raise LlmxError(f"{op}: the KV cache must be {q.dtype} (q's dtype), float8_e4m3fn or int8, got "
                        f"{k_cache.dtype} / {v_cache.dtype}.")
    if k_cache.dtype in QUANTIZED_KV_DTYPES:
        check_scale(op, "k_scale", k_scale)
        check_scale(op, "v_scale", v_scale)
    if query_start_loc.dim() != 1 or query_start_loc.dtype != torch.int32 or query_start_loc.shape[0] < 1:
        raise LlmxError(f"{op}: query_start_loc must be int32 [num_seqs + 1], got {query_start_loc.dtype} "
                        f"{tuple(query_start_loc.shape)}.")
    num_seqs = query_start_loc.shape[0] - 1
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32 or seq_lens.shape[0] != num_seqs:
        raise LlmxError(f"{op}: seq_lens must be int32 [num_seqs={num_seqs}], got {seq_lens.dtype} "
                        f"{tuple(seq_lens.shape)}.")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.shape[0] != num_seqs:
        raise LlmxError(f"{op}: block_tables must be int32 [num_seqs={num_seqs}, max_blocks], got "
                        f"{block_tables.dtype} {tuple(block_tables.shape)}.")
    if sliding_window is not None and sliding_window < 1:
        raise LlmxError(f"{op}: sliding_window must be None or a positive number of tokens, got {sliding_window}.")
    if softcap is not None and not softcap > 0:
        raise LlmxError(f"{op}: softcap must be None or a positive number, got {softcap}.")


# ----------------------------------------------------------------------------------------------------
# Pure-torch reference (the CPU runtime's attention)
# ----------------------------------------------------------------------------------------------------


def _gather_sequence_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                        scale: torch.Tensor | None) -> torch.Tensor:
    """[seq_len, num_kv_heads, head_dim] float32 of one sequence, dequantized."""
    block_size = cache.shape[1]
    blocks = block_table[: cdiv(seq_len, block_size)].long()
    kv = cache[blocks].reshape(-1, cache.shape[2], cache.shape[3])[:seq_len].float()
    return kv * scale.float() if cache.dtype in QUANTIZED_KV_DTYPES else kv


def _soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's attention-logit soft cap: cap * tanh(score / cap), op for op as transformers applies it."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale, sliding_window, softcap):
    """All sequences at one query token: one batched gather and softmax instead of a loop per sequence
    (the CPU runtime's decode steps)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    max_len = int(seq_lens.max())
    tables = block_tables[:, :cdiv(max_len, block_size)].long()

    def gather(cache, kv_scale):
        kv = cache[tables].reshape(num_seqs, -1, num_kv_heads, head_dim).float()
        return kv * kv_scale.float() if cache.dtype in QUANTIZED_KV_DTYPES else kv

    keys, values = gather(k_cache, k_scale), gather(v_cache, v_scale)
    queries = q.float().reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = _soft_cap(torch.einsum("bkgd,bnkd->bkgn", queries, keys) * scale, softcap)
    positions = torch.arange(keys.shape[1], device=q.device)[None, :]
    last = seq_lens.long()[:, None] - 1
    visible = positions <= last
    if sliding_window is not None:
        visible &= positions > last - sliding_window
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None, :], float("-inf")), dim=-1)
    # Slots past a sequence's end hold stale (possibly non-finite) data: 0 * NaN would poison the sum.
    values = values.masked_fill(~visible[:, :, None, None], 0.0)
    return torch.einsum("bkgn,bnkd->bkgd", probs, values).reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, *,
                        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                        sliding_window: int | None = None, max_query_len: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Pure-torch paged attention (same contract as `paged_attention`), one masked float32 softmax per
    sequence. `max_query_len` is accepted for signature parity and not needed."""
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scale, v_scale, sliding_window,
                  softcap)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    capacity = block_tables.shape[1] * k_cache.shape[1]
    for seq, seq_len in enumerate(lengths):
        q_len = starts[seq + 1] - starts[seq]
        if not q_len <= seq_len <= capacity:
            raise LlmxError(f"paged_attention: sequence {seq} has seq_len {seq_len} for {q_len} query tokens and "
                            f"{block_tables.shape[1]} table blocks; seq_lens must count this step's tokens.")
    if all(starts[i + 1] - starts[i] == 1 for i in range(len(lengths))):
        return _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale, sliding_window,
                           softcap)
    out = torch.zeros_like(q)
    for seq, seq_len in enumerate(lengths):
        q_begin, q_end = starts[seq], starts[seq + 1]
        q_len = q_end - q_begin
        if q_len == 0:
            continue
        keys = _gather_sequence_kv(k_cache, block_tables[seq], seq_len, k_scale)
        values = _gather_sequence_kv(v_cache, block_tables[seq], seq_len, v_scale)
        kv_positions = torch.arange(seq_len, device=q.device)[None, :]
        # Chunks of queries bound the float32 score matrix ([kv_heads, group, chunk, seq_len]) on long prompts.
        for chunk_begin in range(0, q_len, _REF_QUERY_CHUNK):
            chunk = min(_REF_QUERY_CHUNK, q_len - chunk_begin)
            first = q_begin + chunk_begin
            queries = q[first:first + chunk].float().reshape(chunk, num_kv_heads, group, head_dim)
            scores = _soft_cap(torch.einsum("qkgd,nkd->kgqn", queries, keys) * scale, softcap)
            first_position = seq_len - q_len + chunk_begin
            positions = torch.arange(first_position, first_position + chunk, device=q.device)[:, None]
            visible = kv_positions <= positions
            if sliding_window is not None:
                visible &= kv_positions > positions - sliding_window
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            attended = torch.einsum("kgqn,nkd->qkgd", probs, values)
            out[first:first + chunk] = attended.reshape(chunk, num_heads, head_dim).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# Launching wrappers
# ----------------------------------------------------------------------------------------------------


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Context splits per (sequence, KV head) for decode: enough programs for ~2 per SM, and no more than
    the block table could give MIN_TOKENS_PER_SPLIT each. Depends on shapes only (max_context = block-table
    width * block size), so a CUDA graph captured for a batch size stays valid; the kernel then shares each
    sequence's live context among as many of these splits as it fills with whole tiles."""
    work = num_seqs * num_kv_heads
    if work >= num_sms:
        return 1
    by_occupancy = cdiv(2 * num_sms, max(work, 1))
    by_length = max(1, max_context // MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


_SplitBuffers = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_split_buffers: dict[tuple, _SplitBuffers] = {}


def split_buffers(device: torch.device, num_seqs: int, num_heads: int, num_splits: int,
                  head_dim: int) -> _SplitBuffers:
    """Split decode's partial_out float32 [num_seqs * num_heads * num_splits, head_dim], partial_lse
    float32 [same rows] and arrivals int32 [num_seqs * num_heads] (zero between launches), allocated once
    per shape and reused.

    A CUDA graph replays the addresses it captured, and the arrival counts must start at zero on every
    launch: the merging program of each (sequence, KV head) resets its count, so one zeroed allocation
    stays valid for every layer, step and replay. Launches sharing these buffers must be stream-ordered
    (one stream, as llmx's decode steps are). arrivals has num_heads >= num_kv_heads slots per sequence.
    """
    key = (device, num_seqs, num_heads, num_splits, head_dim)
    if key not in _split_buffers:
        rows = num_seqs * num_heads * num_splits
        _split_buffers[key] = (torch.empty((rows, head_dim), dtype=torch.float32, device=device),
                               torch.empty(rows, dtype=torch.float32, device=device),
                               torch.zeros(num_seqs * num_heads, dtype=torch.int32, device=device))
    return _split_buffers[key]


def _common_launch_args(q, k_cache, v_cache, block_tables, k_scale, v_scale, out):
    quantized = k_cache.dtype in QUANTIZED_KV_DTYPES
    # Unused scale pointers still need a tensor; the cache is a harmless stand-in.
    scale_args = (k_scale, v_scale) if quantized else (k_cache, v_cache)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1),
               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0))
    constants = dict(HEAD_DIM=q.shape[2], BLOCK_D=max(16, next_power_of_2(q.shape[2])),
                     BLOCK_SIZE=k_cache.shape[1], KV_QUANTIZED=quantized,
                     DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)
    return scale_args, strides, constants


def _prepare(q, k_cache, v_cache, block_tables):
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise LlmxError("paged_attention: the KV caches and block_tables need a contiguous last dimension.")
    return q


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           scale: float, *, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           sliding_window: int | None = None, num_splits: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """Decode attention (one query per sequence) with split-K over the context; num_splits None = automatic."""
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scale, v_scale, sliding_window,
                  softcap)
    device = check_launch_device("paged_attention", _decode_kernel, q, k_cache, v_cache, block_tables, seq_lens,
                                 query_start_loc)
    num_seqs = seq_lens.shape[0]
    if q.shape[0] != num_seqs:
        raise LlmxError(f"paged_attention_decode: expected one query token per sequence ({num_seqs}), got "
                        f"{q.shape[0]}; use paged_attention for prefill.")
    q = _prepare(q, k_cache, v_cache, block_tables)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * k_cache.shape[1]
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context, sm_count(device))
    if num_splits < 1:
        raise LlmxError(f"paged_attention_decode: num_splits must be >= 1, got {num_splits}.")
    if num_splits > 1:
        partial_out, partial_lse, arrivals = split_buffers(q.device, num_seqs, num_heads, num_splits, head_dim)
    else:
        partial_out = partial_lse = arrivals = out  # not touched by the kernel when NUM_SPLITS == 1
    scale_args, strides, constants = _common_launch_args(q, k_cache, v_cache, block_tables, k_scale, v_scale, out)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *scale_args, out, partial_out, partial_lse,
        arrivals, scale * _LOG2_E, sliding_window or _NO_WINDOW, softcap or 0.0, *strides,
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)),
        MERGE_GROUP_PAD=next_power_of_2(group), BLOCK_N=64 if head_dim <= 128 else 32, NUM_SPLITS=num_splits,
        SPLIT_CHUNK=min(MERGE_CHUNK, next_power_of_2(num_splits)), FEW_SPLITS_MAX_TILES=FEW_SPLITS_MAX_TILES,
        **constants, SOFTCAP=softcap is not None, num_warps=4, num_stages=3, **pdl_launch(q.device),
    )
    return out


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, *, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None, sliding_window: int | None = None,
                            max_query_len: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Prefill / chunked-prefill / mixed-batch attention: tiles of queries x KV blocks, online softmax."""
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scale, v_scale, sliding_window,
                  softcap)
    check_launch_device("paged_attention", _prefill_kernel, q, k_cache, v_cache, block_tables, seq_lens,
                        query_start_loc)
    q = _prepare(q, k_cache, v_cache, block_tables)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if max_query_len is None:
        max_query_len = _max_query_len(query_start_loc)
    num_seqs = seq_lens.shape[0]
    if q.shape[0] == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    # 64 or 128 rows of (query, head) pairs per tile; tl.dot needs at least 16.
    rows = 128 if max_query_len * group_pad >= 128 and head_dim <= 128 else 64
    rows = max(rows, 16, group_pad)
    block_q = rows // group_pad
    block_n = 64 if head_dim <= 128 else 32
    scale_args, strides, constants = _common_launch_args(q, k_cache, v_cache, block_tables, k_scale, v_scale, out)
    _prefill_kernel[(cdiv(max_query_len, block_q), num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *scale_args, out,
        scale * _LOG2_E, sliding_window or _NO_WINDOW, softcap or 0.0, *strides,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, **constants, SOFTCAP=softcap is not None,
        num_warps=8 if rows >= 128 else 4, num_stages=2,
    )
    return out


def _max_query_len(query_start_loc: torch.Tensor) -> int:
    if query_start_loc.shape[0] < 2:
        return 0
    return int((query_start_loc[1:] - query_start_loc[:-1]).max())


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, *,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    sliding_window: int | None = None, max_query_len: int | None = None,
                    softcap: float | None = None, num_leading_decodes: int = 0) -> torch.Tensor:
    """Triton paged attention: the decode kernel when every sequence brings one query token, the prefill
    kernel otherwise. Pass max_query_len (known to the scheduler) to avoid a device-to-host sync.
    softcap: Gemma 2's attention-logit cap, scores -> cap * tanh(scores / cap) before the softmax.
    num_leading_decodes: in a mixed step, how many sequences at the front bring one query token each; they go
    to the decode kernel (split over the context), the rest to the prefill kernel, where a decode row would
    fill one of a tile's 64-128 query rows and walk its whole context in one program."""
    if max_query_len is None:
        _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scale, v_scale,
                      sliding_window, softcap)
        max_query_len = _max_query_len(query_start_loc)
    kwargs = dict(k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window, softcap=softcap)
    if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
        return paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, **kwargs)
    d = num_leading_decodes
    if 0 < d < seq_lens.shape[0]:
        decoded = paged_attention_decode(q[:d], k_cache, v_cache, block_tables[:d], seq_lens[:d],
                                         query_start_loc[:d + 1], scale, **kwargs)
        prefilled = paged_attention_prefill(q[d:], k_cache, v_cache, block_tables[d:], seq_lens[d:],
                                            query_start_loc[d:] - d, scale, max_query_len=max_query_len, **kwargs)
        return torch.cat([decoded, prefilled])
    return paged_attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                   max_query_len=max_query_len, **kwargs)
