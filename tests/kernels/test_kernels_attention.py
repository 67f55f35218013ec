"""Paged attention and KV-cache writes: Triton kernels (through Triton's CPU interpreter) against their
pure-torch references, and the references against dense causal attention (torch SDPA).

Triton fixes interpret-or-compile when it is imported, so the kernel tests (named test_interpreted_*)
run in a child pytest process started with TRITON_INTERPRET=1 by `test_kernels_in_triton_interpreter`;
in that child they run directly. The interpreter computes fp32/fp16 correctly but not bf16, so bf16 is
covered by the CUDA tests at the end: evidence for the GPU run, skipped on CPU-only machines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from llmx.common.errors import LlmxError
from llmx.kernels import kv_cache_write, paged_attention as attention
from helpers.triton_interpreter import IN_INTERPRETER, interpreted, needs_cuda, run_interpreted_tests, runs_children
from llmx.kernels._triton_util import triton_available

@runs_children
def test_kernels_in_triton_interpreter():
    """Runs this file's test_interpreted_* tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__)


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D] float32, dequantized: what the cache holds
    values: list[torch.Tensor]
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    scale: float

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                self.scale)

    def scales(self):
        return dict(k_scale=self.k_scale, v_scale=self.v_scale)

    def to(self, device):
        moved = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                 for name, value in vars(self).items() if name not in ("keys", "values")}
        return PagedBatch(keys=self.keys, values=self.values, **moved)


def _quantize(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.round(x / scale).clamp(-128, 127).to(dtype)
    return (x / scale).clamp(-448, 448).to(dtype)


def make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, *, dtype=torch.float32,
               kv_dtype=None, seed=0, table_tokens=0) -> PagedBatch:
    """Random sequences laid out in a paged cache through shuffled (non-contiguous, out-of-order) block ids.

    Cache slots that belong to no sequence hold NaN (or the largest code for int8), so a kernel reading
    anything it should mask shows up as NaN or a wrong number. The block table is two blocks wider than
    the longest sequence, or `table_tokens` wide (as a CUDA graph's, sized for max_seq_len), padded with 0.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    table_width = max(max(blocks_needed, default=0) + 2, math.ceil(table_tokens / block_size))
    block_tables = torch.zeros(len(seq_lens), table_width, dtype=torch.int32)
    cache_dtype = kv_dtype or dtype
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    garbage = 127 if cache_dtype == torch.int8 else float("nan")
    k_cache = torch.full(shape, garbage, dtype=torch.float32).to(cache_dtype)
    v_cache = torch.full(shape, garbage, dtype=torch.float32).to(cache_dtype)
    k_scale = torch.tensor(0.02, dtype=torch.float32) if kv_dtype else None
    v_scale = torch.tensor([0.015], dtype=torch.float32) if kv_dtype else None
    keys, values = [], []
    for seq, seq_len in enumerate(seq_lens):
        table = [block_ids.pop() for _ in range(blocks_needed[seq])]
        block_tables[seq, : len(table)] = torch.tensor(table, dtype=torch.int32)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        if kv_dtype:
            k_stored, v_stored = _quantize(k, kv_dtype, k_scale), _quantize(v, kv_dtype, v_scale)
            k, v = k_stored.float() * k_scale, v_stored.float() * v_scale
        else:
            k, v = k.to(dtype), v.to(dtype)
            k_stored, v_stored = k, v
        positions = torch.arange(seq_len)
        blocks = torch.tensor(table, dtype=torch.long)[positions // block_size]
        k_cache[blocks, positions % block_size] = k_stored
        v_cache[blocks, positions % block_size] = v_stored
        keys.append(k.float())
        values.append(v.float())
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32),
                      query_start_loc, keys, values, k_scale, v_scale, 1.0 / math.sqrt(head_dim))


def dense_attention(batch: PagedBatch, sliding_window: int | None) -> torch.Tensor:
    """Causal attention per sequence on contiguous K/V with torch's scaled_dot_product_attention."""
    out = torch.zeros(batch.q.shape, dtype=torch.float32)
    starts = batch.query_start_loc.tolist()
    for seq, seq_len in enumerate(batch.seq_lens.tolist()):
        begin, end = starts[seq], starts[seq + 1]
        if begin == end:
            continue
        positions = torch.arange(seq_len - (end - begin), seq_len)[:, None]
        kv_positions = torch.arange(seq_len)[None, :]
        mask = kv_positions <= positions
        if sliding_window is not None:
            mask &= kv_positions > positions - sliding_window
        q = batch.q[begin:end].float().transpose(0, 1)[None]
        k = batch.keys[seq].transpose(0, 1)[None]
        v = batch.values[seq].transpose(0, 1)[None]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=batch.scale, enable_gqa=True)
        out[begin:end] = attended[0].transpose(0, 1)
    return out


# (q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, sliding_window, kv_dtype)
CASES = {
    "decode_mha_bs16": ([1, 1, 1], [5, 40, 17], 4, 4, 32, 16, None, None),
    "decode_gqa2_bs32": ([1, 1, 1, 1], [1, 33, 64, 100], 4, 2, 32, 32, None, None),
    "decode_gqa4_long": ([1, 1], [700, 90], 8, 2, 32, 16, None, None),
    "decode_odd_heads_gqa3": ([1, 1], [45, 3], 3, 1, 32, 16, None, None),
    "prefill_from_scratch_gqa4": ([37, 16], [37, 16], 8, 2, 32, 16, None, None),
    "prefill_cached_prefix_bs32": ([13, 5], [77, 40], 4, 2, 64, 32, None, None),
    "mixed_prefill_and_decode": ([9, 1, 20, 1], [30, 17, 20, 66], 6, 2, 40, 16, None, None),
    "odd_heads_mha_head_dim_48": ([6, 1], [19, 34], 5, 5, 48, 16, None, None),
    "sliding_window_prefill": ([25, 1], [60, 50], 4, 2, 32, 16, 7, None),
    "sliding_window_decode": ([1, 1], [300, 6], 4, 1, 32, 16, 37, None),
    "fp8_cache_mixed": ([4, 1], [50, 21], 4, 2, 32, 16, None, torch.float8_e4m3fn),
    "int8_cache_decode": ([1, 1], [70, 9], 4, 1, 32, 32, None, torch.int8),
    "int8_cache_prefill_window": ([12], [40], 4, 4, 32, 16, 9, torch.int8),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reference_matches_dense_causal_attention(case):
    q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window, kv_dtype = case
    batch = make_batch(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, kv_dtype=kv_dtype)
    out = attention.paged_attention_ref(*batch.args(), **batch.scales(), sliding_window=window)
    torch.testing.assert_close(out, dense_attention(batch, window), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@interpreted
def test_interpreted_kernel_matches_reference(case):
    q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window, kv_dtype = case
    batch = make_batch(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, kv_dtype=kv_dtype, seed=1)
    expected = attention.paged_attention_ref(*batch.args(), **batch.scales(), sliding_window=window)
    out = attention.paged_attention(*batch.args(), **batch.scales(), sliding_window=window,
                                    max_query_len=max(q_lens))
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


# (q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, sliding_window, kv_dtype): decode rows first,
# then prompt chunks, as a mixed step of running sequences and newly admitted ones comes
MIXED_CASES = {
    "decodes_then_chunks": ([1, 1, 1, 9, 20], [30, 17, 130, 20, 66], 6, 2, 40, 16, None, None),
    "decodes_then_chunks_window": ([1, 1, 25], [300, 6, 60], 4, 2, 32, 16, 37, None),
    "decodes_then_chunks_fp8": ([1, 1, 4, 1], [50, 21, 8, 40], 4, 2, 32, 16, None, torch.float8_e4m3fn),
}


@pytest.mark.parametrize("case", MIXED_CASES.values(), ids=MIXED_CASES.keys())
@interpreted
def test_interpreted_mixed_step_with_leading_decodes_split_over_both_kernels(case):
    """num_leading_decodes sends the leading one-token sequences to the decode kernel and the rest to the
    prefill kernel (a decode row after a chunk stays with the prefill kernel); the output equals the reference."""
    q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window, kv_dtype = case
    batch = make_batch(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, kv_dtype=kv_dtype, seed=2)
    expected = attention.paged_attention_ref(*batch.args(), **batch.scales(), sliding_window=window)
    leading = next(i for i, n in enumerate(q_lens) if n != 1)
    for num_leading_decodes in (leading, 1, 0):
        out = attention.paged_attention(*batch.args(), **batch.scales(), sliding_window=window,
                                        max_query_len=max(q_lens), num_leading_decodes=num_leading_decodes)
        assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def dense_soft_capped_attention(batch: PagedBatch, sliding_window: int | None, softcap: float) -> torch.Tensor:
    """Gemma 2's eager attention written out: scores * scale, cap * tanh(scores / cap), mask, softmax, @ V."""
    out = torch.zeros(batch.q.shape, dtype=torch.float32)
    starts = batch.query_start_loc.tolist()
    group = batch.q.shape[1] // batch.keys[0].shape[1]
    for seq, seq_len in enumerate(batch.seq_lens.tolist()):
        begin, end = starts[seq], starts[seq + 1]
        positions = torch.arange(seq_len - (end - begin), seq_len)[:, None]
        kv_positions = torch.arange(seq_len)[None, :]
        mask = kv_positions <= positions
        if sliding_window is not None:
            mask &= kv_positions > positions - sliding_window
        k = batch.keys[seq].repeat_interleave(group, dim=1)  # [n, H, D]
        v = batch.values[seq].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,nhd->hqn", batch.q[begin:end].float(), k) * batch.scale
        scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out[begin:end] = torch.einsum("hqn,nhd->qhd", probs, v)
    return out


# (q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, sliding_window, kv_dtype): cap 1.0 bends
# these unit-scale scores hard, so a kernel that skipped or misplaced the cap would be far off.
SOFTCAP_CASES = {
    "prefill_window": ([25, 1], [60, 50], 4, 2, 32, 16, 7, None),
    "decode_long_split": ([1, 1], [300, 6], 4, 1, 32, 16, None, None),
    "mixed_fp8_cache": ([4, 1], [50, 21], 4, 2, 32, 16, 11, torch.float8_e4m3fn),
}


@pytest.mark.parametrize("case", SOFTCAP_CASES.values(), ids=SOFTCAP_CASES.keys())
def test_reference_soft_cap_matches_dense_attention(case):
    q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window, kv_dtype = case
    batch = make_batch(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, kv_dtype=kv_dtype)
    out = attention.paged_attention_ref(*batch.args(), **batch.scales(), sliding_window=window, softcap=1.0)
    torch.testing.assert_close(out, dense_soft_capped_attention(batch, window, 1.0), atol=2e-5, rtol=1e-5)
    uncapped = attention.paged_attention_ref(*batch.args(), **batch.scales(), sliding_window=window)
    assert (out - uncapped).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", SOFTCAP_CASES.values(), ids=SOFTCAP_CASES.keys())
@interpreted
def test_interpreted_soft_capped_kernels_match_reference(case):
    q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window, kv_dtype = case
    batch = make_batch(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, kv_dtype=kv_dtype, seed=1)
    expected = attention.paged_attention_ref(*batch.args(), **batch.scales(), sliding_window=window, softcap=1.0)
    out = attention.paged_attention(*batch.args(), **batch.scales(), sliding_window=window,
                                    max_query_len=max(q_lens), softcap=1.0)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    if max(q_lens) == 1:  # the decode kernel split across the context merges capped partials
        split = attention.paged_attention_decode(*batch.args(), **batch.scales(), sliding_window=window,
                                                 num_splits=4, softcap=1.0)
        torch.testing.assert_close(split, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8, None])
@interpreted
def test_interpreted_decode_split_k_merges_to_the_reference(num_splits):
    # 8 splits of a 416-token table leave some splits empty for the shorter sequences; they must not count.
    batch = make_batch([1, 1, 1], [401, 130, 2], 8, 2, 32, 16, seed=2)
    expected = attention.paged_attention_ref(*batch.args())
    out = attention.paged_attention_decode(*batch.args(), num_splits=num_splits)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


# What a CUDA graph sees: live lengths far below a 4096-token table, different for every sequence.
SHORT_IN_WIDE_TABLE = [1, 7, 255, 1000]


@pytest.mark.parametrize("num_splits", [1, 3, 16, 64])
@interpreted
def test_interpreted_decode_splits_the_live_length_not_the_table(num_splits):
    # 4,000 live tokens are 63 tiles: with 16 or 64 splits, 16 of them hold 4 tiles each and merge in 2 rounds.
    batch = make_batch([1] * 5, SHORT_IN_WIDE_TABLE + [4000], 4, 1, 32, 16, seed=10, table_tokens=4096)
    expected = attention.paged_attention_ref(*batch.args())
    out = attention.paged_attention_decode(*batch.args(), num_splits=num_splits)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    # The merging programs zeroed the arrival counts, ready for the next launch (or graph replay).
    if num_splits > 1:
        assert not attention.split_buffers(batch.q.device, 5, 4, num_splits, 32)[2].any()


# (num_heads, num_kv_heads, head_dim, block_size, sliding_window, dtype, kv_dtype)
WIDE_TABLE_VARIANTS = {
    "gqa8_head_dim_80_fp16": (8, 1, 80, 32, None, torch.float16, None),
    "mha_head_dim_96_window_int8": (2, 2, 96, 64, 300, torch.float32, torch.int8),
    "gqa3_head_dim_64_window_fp8": (6, 2, 64, 16, 77, torch.float32, torch.float8_e4m3fn),
}


@pytest.mark.parametrize("variant", WIDE_TABLE_VARIANTS.values(), ids=WIDE_TABLE_VARIANTS.keys())
@interpreted
def test_interpreted_decode_live_length_splits_with_windows_quantized_kv_and_odd_heads(variant):
    # A window start that is not tile-aligned (1000 - 300, 255 - 77) starts the first split mid-tile.
    heads, kv_heads, head_dim, block_size, window, dtype, kv_dtype = variant
    batch = make_batch([1] * 4, SHORT_IN_WIDE_TABLE, heads, kv_heads, head_dim, block_size, dtype=dtype,
                       kv_dtype=kv_dtype, seed=11, table_tokens=4096)
    expected = attention.paged_attention_ref(*batch.args(), **batch.scales(), sliding_window=window)
    out = attention.paged_attention_decode(*batch.args(), **batch.scales(), sliding_window=window, num_splits=16)
    tolerance = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


@interpreted
def test_interpreted_decode_split_k_with_window_and_fp8():
    batch = make_batch([1, 1], [500, 40], 4, 2, 32, 32, kv_dtype=torch.float8_e4m3fn, seed=3)
    expected = attention.paged_attention_ref(*batch.args(), **batch.scales(), sliding_window=100)
    out = attention.paged_attention_decode(*batch.args(), **batch.scales(), sliding_window=100, num_splits=4)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@interpreted
def test_interpreted_prefill_kernel_handles_decode_rows_and_empty_sequences():
    # A sequence with no tokens this step (q_len 0) sits between others; the dispatcher infers max_query_len.
    batch = make_batch([3, 0, 1], [10, 7, 26], 4, 2, 32, 16, seed=4)
    expected = attention.paged_attention_ref(*batch.args())
    torch.testing.assert_close(attention.paged_attention(*batch.args()), expected, atol=2e-5, rtol=1e-5)
    decode = make_batch([1, 1], [10, 26], 4, 2, 32, 16, seed=5)
    torch.testing.assert_close(attention.paged_attention_prefill(*decode.args()),
                               attention.paged_attention_ref(*decode.args()), atol=2e-5, rtol=1e-5)


@interpreted
def test_interpreted_fp16_kernel_matches_reference():
    batch = make_batch([5, 1], [21, 40], 4, 2, 32, 16, dtype=torch.float16, seed=6)
    expected = attention.paged_attention_ref(*batch.args())
    torch.testing.assert_close(attention.paged_attention(*batch.args()), expected, atol=2e-3, rtol=2e-3)
    decode = make_batch([1, 1], [21, 300], 4, 2, 32, 16, dtype=torch.float16, seed=7)
    torch.testing.assert_close(attention.paged_attention_decode(*decode.args(), num_splits=3),
                               attention.paged_attention_ref(*decode.args()), atol=2e-3, rtol=2e-3)


def test_choose_num_splits_follows_the_sm_count():
    assert attention.choose_num_splits(num_seqs=64, num_kv_heads=8, max_context=8192, num_sms=132) == 1
    one_long = attention.choose_num_splits(num_seqs=1, num_kv_heads=8, max_context=8192, num_sms=132)
    assert 1 < one_long <= attention.MAX_SPLITS and 8192 / one_long >= attention.MIN_TOKENS_PER_SPLIT
    assert attention.choose_num_splits(num_seqs=1, num_kv_heads=8, max_context=100, num_sms=132) == 1
    assert attention.choose_num_splits(num_seqs=1, num_kv_heads=8, max_context=300, num_sms=132) == 4
    assert attention.choose_num_splits(num_seqs=1, num_kv_heads=1, max_context=1 << 20, num_sms=132) == 64


@interpreted
def test_interpreted_chunked_prefill_then_decode_through_the_cache():
    """write_kv_cache + paged_attention step by step (two prefill chunks, two decodes) equal dense attention
    over the whole sequence: the runtime's contract that this step's KV is written before attending."""
    gen = torch.Generator().manual_seed(8)
    heads, kv_heads, head_dim, block_size, total = 4, 2, 32, 16, 43
    q = torch.randn(total, heads, head_dim, generator=gen)
    k = torch.randn(total, kv_heads, head_dim, generator=gen)
    v = torch.randn(total, kv_heads, head_dim, generator=gen)
    k_cache = torch.zeros(6, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    block_table = torch.tensor([[4, 1, 5, 0]], dtype=torch.int32)
    outputs = []
    for begin, end in [(0, 30), (30, 41), (41, 42), (42, 43)]:
        positions = torch.arange(begin, end)
        slots = block_table[0, positions // block_size].long() * block_size + positions % block_size
        kv_cache_write.write_kv_cache(k[begin:end], v[begin:end], k_cache, v_cache, slots)
        outputs.append(attention.paged_attention(
            q[begin:end], k_cache, v_cache, block_table, torch.tensor([end], dtype=torch.int32),
            torch.tensor([0, end - begin], dtype=torch.int32), head_dim**-0.5, max_query_len=end - begin))
    mask = torch.ones(total, total, dtype=torch.bool).tril()
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(torch.cat(outputs), dense, atol=2e-5, rtol=1e-5)


def test_bad_inputs_raise_one_clear_error():
    batch = make_batch([1], [10], 4, 2, 32, 16)
    with pytest.raises(LlmxError, match="block_tables"):
        attention.paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.block_tables.long(),
                                      batch.seq_lens, batch.query_start_loc, batch.scale)
    with pytest.raises(LlmxError, match="multiple"):
        attention.paged_attention_ref(batch.q[:, :3], batch.k_cache, batch.v_cache, batch.block_tables,
                                      batch.seq_lens, batch.query_start_loc, batch.scale)
    fp8 = make_batch([1], [10], 4, 2, 32, 16, kv_dtype=torch.float8_e4m3fn)
    with pytest.raises(LlmxError, match="k_scale"):
        attention.paged_attention_ref(*fp8.args())
    with pytest.raises(LlmxError, match="seq_lens must count"):
        attention.paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                      torch.tensor([0], dtype=torch.int32), batch.query_start_loc, batch.scale)
    with pytest.raises(LlmxError, match="sliding_window"):
        attention.paged_attention_ref(*batch.args(), sliding_window=0)


@pytest.mark.skipif(IN_INTERPRETER or not triton_available(), reason="compiled kernels only (CPU is fine interpreted)")
def test_kernel_refuses_cpu_tensors_without_the_interpreter():
    batch = make_batch([1], [10], 4, 2, 32, 16)
    with pytest.raises(LlmxError, match="CUDA"):
        attention.paged_attention(*batch.args())


# ----------------------------------------------------------------------------------------------------
# write_kv_cache
# ----------------------------------------------------------------------------------------------------


def _write_inputs(kv_dtype, tokens=11, kv_heads=3, head_dim=40, num_blocks=5, block_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # k and v as strided slices of one fused projection output, as the attention layer hands them over.
    fused = torch.randn(tokens, 3 * kv_heads * head_dim, generator=gen)
    k = fused[:, kv_heads * head_dim: 2 * kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    v = fused[:, 2 * kv_heads * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 7]] = -1  # padding tokens
    fill = 5 if kv_dtype == torch.int8 else 0.5
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), fill, dtype=torch.float32).to(kv_dtype)
    v_cache = k_cache.clone()
    # Scales wide enough that randn values stay inside int8/fp8 range (no clamping).
    scales = dict(k_scale=torch.tensor(0.04), v_scale=torch.tensor([0.045]))
    return k, v, k_cache, v_cache, slots, scales


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.float8_e4m3fn, torch.int8])
@interpreted
def test_interpreted_write_kv_cache_kernel_matches_reference_bitwise(kv_dtype):
    k, v, k_cache, v_cache, slots, scales = _write_inputs(kv_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_cache_write.write_kv_cache(k, v, k_cache, v_cache, slots, **scales)
    kv_cache_write.write_kv_cache_ref(k, v, k_ref, v_ref, slots, **scales)
    assert torch.equal(_bits(k_cache), _bits(k_ref)) and torch.equal(_bits(v_cache), _bits(v_ref))


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn, torch.int8])
def test_write_kv_cache_reference_places_and_quantizes(kv_dtype):
    k, v, k_cache, v_cache, slots, scales = _write_inputs(kv_dtype, seed=1)
    untouched = k_cache.clone()
    kv_cache_write.write_kv_cache_ref(k, v, k_cache, v_cache, slots, **scales)
    block_size = k_cache.shape[1]
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        written[slot // block_size, slot % block_size] = True
        stored = k_cache[slot // block_size, slot % block_size].float()
        if kv_dtype == torch.int8:
            # round(x / scale): within half a quantization step of the original.
            assert (stored * scales["k_scale"] - k[token]).abs().max() <= 0.5 * scales["k_scale"] + 1e-6
        elif kv_dtype == torch.float8_e4m3fn:
            # e4m3 keeps 3 mantissa bits: relative error at most 2**-4 (above the subnormal range).
            torch.testing.assert_close(stored * scales["k_scale"], k[token], rtol=2**-4,
                                       atol=2**-10 * float(scales["k_scale"]))
        else:
            assert torch.equal(stored, k[token])
    assert torch.equal(_bits(k_cache[~written]), _bits(untouched[~written]))


@interpreted
def test_interpreted_write_kv_cache_fp8_rounding_is_exact_on_ties_and_saturates():
    """Every e4m3 value, every midpoint between neighbours (ties go to even) and out-of-range values
    (saturate at +-448): the kernel's hand-rolled rounding stores the same bytes as torch's conversion."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.unique(codes[torch.isfinite(codes)])
    midpoints = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, midpoints, torch.tensor([460.0, 500.0, 1e4, -470.0, -1e5])])
    values = values[: (values.numel() // 8) * 8].reshape(-1, 1, 8)
    k_cache = torch.zeros(values.shape[0], 1, 1, 8, dtype=torch.float8_e4m3fn)
    v_cache, k_ref, v_ref = k_cache.clone(), k_cache.clone(), k_cache.clone()
    slots = torch.arange(values.shape[0])
    one = dict(k_scale=torch.tensor(1.0), v_scale=torch.tensor(1.0))
    kv_cache_write.write_kv_cache(values, values, k_cache, v_cache, slots, **one)
    kv_cache_write.write_kv_cache_ref(values, values, k_ref, v_ref, slots, **one)
    assert torch.equal(_bits(k_cache), _bits(k_ref))
    assert k_ref.float().abs().max() == 448.0


def test_write_kv_cache_rejects_mismatched_inputs():
    k, v, k_cache, v_cache, slots, scales = _write_inputs(torch.int8)
    with pytest.raises(LlmxError, match="k_scale"):
        kv_cache_write.write_kv_cache_ref(k, v, k_cache, v_cache, slots)
    with pytest.raises(LlmxError, match="slot_mapping"):
        kv_cache_write.write_kv_cache_ref(k, v, k_cache, v_cache, slots.int(), **scales)
    with pytest.raises(LlmxError, match="kv_heads, head_dim"):
        kv_cache_write.write_kv_cache_ref(k[:, :2], v[:, :2], k_cache, v_cache, slots, **scales)


# ----------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU (bf16, realistic shapes): evidence for the device run, skipped on CPU.
# ----------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("q_lens,seq_lens", [
    ([1] * 8, [1, 17, 100, 513, 1024, 2000, 33, 4096]),
    ([1], [8000]),
    ([300, 1, 64, 1], [300, 900, 1500, 77]),
])
def test_gpu_kernels_match_reference_bf16(kv_dtype, q_lens, seq_lens):
    batch = make_batch(q_lens, seq_lens, 32, 8, 128, 16, dtype=torch.bfloat16, kv_dtype=kv_dtype, seed=9)
    batch = batch.to("cuda")
    expected = attention.paged_attention_ref(*batch.args(), **batch.scales())
    out = attention.paged_attention(*batch.args(), **batch.scales(), max_query_len=max(q_lens))
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("q_lens,seq_lens,window", [([1, 1, 1], [900, 37, 4000], 4096),
                                                    ([64, 1, 200], [64, 900, 700], 256)])
def test_gpu_soft_capped_windowed_kernels_match_reference_bf16(kv_dtype, q_lens, seq_lens, window):
    """Gemma-2-9B's attention: 16 query / 8 KV heads of 256, soft-cap 50 (scaled scores reach it here)."""
    batch = make_batch(q_lens, seq_lens, 16, 8, 256, 16, dtype=torch.bfloat16, kv_dtype=kv_dtype, seed=5)
    batch = batch.to("cuda")
    batch.scale = 2.0  # large scores, so the cap bends them
    expected = attention.paged_attention_ref(*batch.args(), **batch.scales(), sliding_window=window, softcap=50.0)
    out = attention.paged_attention(*batch.args(), **batch.scales(), sliding_window=window,
                                    max_query_len=max(q_lens), softcap=50.0)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 16, 64])
def test_gpu_decode_short_live_lengths_in_a_wide_table(num_splits, kv_dtype):
    # Repeated launches: every split's partials must reach the last-arriving program on real, racing SMs.
    batch = make_batch([1] * 5, SHORT_IN_WIDE_TABLE + [8192], 32, 8, 128, 16, dtype=torch.bfloat16,
                       kv_dtype=kv_dtype, seed=12, table_tokens=8192).to("cuda")
    expected = attention.paged_attention_ref(*batch.args(), **batch.scales()).float()
    for _ in range(20):
        out = attention.paged_attention_decode(*batch.args(), **batch.scales(), num_splits=num_splits)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.gpu
def test_gpu_decode_graph_replays_follow_the_live_lengths():
    """One CUDA graph captured over an 8192-token table, replayed as the live lengths change in place."""
    batch = make_batch([1] * 4, [8192] * 4, 32, 8, 128, 16, dtype=torch.bfloat16, seed=13).to("cuda")
    args = list(batch.args())
    attention.paged_attention_decode(*args)  # compile and allocate the split buffers outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.paged_attention_decode(*args)
    for live in ([1, 7, 255, 1000], [8192, 64, 65, 2], [300] * 4, [8192] * 4):
        batch.seq_lens.copy_(torch.tensor(live, dtype=torch.int32))
        graph.replay()
        expected = attention.paged_attention_ref(*args)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.int8])
def test_gpu_write_kv_cache_matches_reference(kv_dtype):
    k, v, k_cache, v_cache, slots, scales = _write_inputs(kv_dtype, tokens=300, kv_heads=8, head_dim=128,
                                                          num_blocks=40)
    k, v = k.to("cuda", torch.bfloat16), v.to("cuda", torch.bfloat16)
    k_cache, v_cache, slots = k_cache.cuda(), v_cache.cuda(), slots.cuda()
    scales = {name: s.cuda() for name, s in scales.items()}
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_cache_write.write_kv_cache(k, v, k_cache, v_cache, slots, **scales)
    kv_cache_write.write_kv_cache_ref(k, v, k_ref, v_ref, slots, **scales)
    if kv_dtype != torch.float8_e4m3fn:
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        return
    # The kernel rounds to e4m3 by hand (bit-equal to torch on CPU, see the interpreter test); on the GPU
    # torch's converter may give -0 where the kernel gives +0 (values that round to zero) or break an
    # exact tie the other way: equal values, or rarely one e4m3 step apart.
    for got, want in ((k_cache, k_ref), (v_cache, v_ref)):
        differ = got.float() != want.float()
        assert differ.float().mean() < 1e-3, f"{int(differ.sum())} of {differ.numel()} fp8 values differ"
        steps = (_bits(got).int() - _bits(want).int())[differ].abs()
        assert steps.numel() == 0 or int(steps.max()) <= 1
