"""W4A16 GEMV: int4 group-wise weights times a few activation rows (decode) on the CUDA cores.

`w4a16_gemv(x [M, K], qweight, scales, group_size, bias=None, pre_scale=None) -> [M, N]` in x's dtype computes
what `w4a16_gemm_ref` computes (the storage format and input checks of w4a16_format.py) for M <= GEMV_MAX_M (4),
K % 8 == 0 and group_size % 8 == 0. `w4a16_dispatch.w4a16_matmul` hands those calls here (`tuning.int4_kernel_for`),
so every caller (the runtime's Linears) gets it, except the M = 2..4 calls that the tensor-core decode kernel
takes on Hopper (w4a16_mma_decode.py; at M = 1 this GEMV is faster there).

Why a GEMV: at M = 1..4 a GEMM is a stream of weight bytes, half a byte per weight and M multiply-adds each.
The tensor-core kernel pads the batch to 16 and reshapes every weight into a dot operand; here each weight is
read once, converted in two instructions and multiplied on the CUDA cores, so the time should be that of
reading N * K / 2 weight bytes (+ 2 * N * K / group_size scale bytes) from HBM.

Layout math. qweight uint8 [N, K / 2] is read as int32 [N, K / 8] (a free view: 4 little-endian bytes, low
nibble first): word w of row n holds the inputs k = 8w + i, i = 0..7, nibble i at bits 4i..4i+3. Program
(pid_n, pid_k) owns the rows pid_n * BLOCK_N + [0, BLOCK_N) and the pid_k-th of SPLIT_K slices of the K loop,
which walks int32 [BLOCK_N, BLOCK_K / 8] weight tiles: 16-byte reads of 4 words of one row per thread, copied
asynchronously NUM_STAGES - 1 tiles ahead of their use (Triton's software pipeline; cp.async on Hopper).

Dequantization with no shift per weight and no int-to-float conversion (a quarter of the FMA rate): a nibble at
bits p..p+3 of a 32-bit word, OR-ed in place into the bits of the float 2^(23 - p) (whose last mantissa bit is
worth 2^-p), gives exactly the float 2^(23 - p) + nibble. One AND-OR (a LOP3) per weight. Two loops use it:
  * subtract (M >= 3, and float32 activations): nibble i of the word and of its high half sits at p = 4 (i % 4);
    subtracting 2^(23 - p) + 8 leaves nibble - 8, then a float32 multiply-add per activation row. One shift per
    word, one subtract per weight, shared by the rows.
  * folded offset (M <= 2, 16-bit activations): the word shifted left by 11, the word itself and the word
    shifted right by 9 put nibble i at p = 11, 15, 19 (i = 0-2), 12, 16 (i = 3-4) and 11, 15, 19 (i = 5-7), and
    the loop multiplies 2^(23 - p) + nibble itself into x. The offsets sum_i (2^(23 - p_i) + 8) x_i are the same
    for every weight row: computed once per word column, they start the row sums. Two shifts per word and no
    subtract, so the K loop is shorter at M = 1 and 2 (sm_90 SASS, `measurements/gemv_sass.py`); at M = 4 it would
    be longer, since the subtract loop shares each subtract among the rows. The price is precision: the
    products carry a part up to 4,096x the activation that the offset cancels, which costs float32 about 12 of
    its 24 bits. The error stays near 2^-14 of the largest output (K = 4,096), under a bf16 or fp16 output's own
    rounding (2^-9, 2^-11); float32 activations keep the exact loop.

The nibble masks reach the kernel as a runtime argument (15), not as literals. A LOP3 takes one immediate, so a
literal mask needs a second constant in a register, and ptxas rematerialises it before every LOP3 instead of
keeping it live; from an argument the masks stay in registers. At decode sizes the GEMV is bound by instruction
issue, not by HBM, so every instruction taken out of the K loop shows in its time. Instruction counts and
timings of these choices: BENCHMARKS.md and the run notes it links.

Activations: the tile needs x[m, 8w + i] as 8 vectors over its words, i = 0..7. 16-bit activations are read
as int32 pairs (x[2j], x[2j + 1]), 4 vectors with a stride of 4 pairs, which Triton copies ahead with the
weights (2-byte reads it would not, and every iteration would wait for them), then split into two floats by a
shift and a mask. pre_scale (AWQ) is read the same way and multiplies x.

Scales: the 8 products of a word are summed in float32 and multiplied once by the word's group scale
scales[n, 8w // GROUP_SIZE] (a word never straddles groups: GROUP_SIZE % 8 == 0), a multiply-add per 8 weights.
When the tile holds whole groups whose scales can be read 4 bytes at a time (GROUPED_SCALES: pairs of 16-bit
scales, or float32 ones), its [BLOCK_N, BLOCK_K / GROUP_SIZE] scales are copied ahead with the weights and
repeated over each group's words; otherwise each word reads its own scale.

The products accumulate in float32 per (row, word) lane, [BLOCK_N, BLOCK_K / 8] per activation row; the lanes
are summed once, after the K loop. With SPLIT_K > 1 the partial rows are added atomically into a zeroed
float32 output, as in the tensor-core kernel, and split 0 adds the bias.

Gated variant (GATED, w4a16_gemv_gated.py): the weight is a fused [gate | up]; each program gathers BLOCK_N / 2
gate rows and the matching up rows and writes silu(gate) * up (times an optional out_scale) for them.

Launch: with programmatic dependent launch (kernels/pdl.py) the programs wait for the previous kernel before
their first read, and ask nothing of L2 before it (a prefetch of the first weight tiles there, which never
depend on the previous kernel, measured slower). The plain GEMV lets the next kernel launch right after its
wait; the gated one only after its K loop, since its next kernel is the down GEMV, whose early-launched
programs would hold SM resources through every wave of this one.

Tile configs are `tuning.TileConfig`s under the kernel name "w4a16_gemv" (block_m is unused); tuning.py says
which table entries serve which M.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels import tuning
from llmx.kernels._gemm_common import as_int32_words, finish_output, new_output
from llmx.kernels._triton_util import check_launch_device, jit, tl, triton
from llmx.kernels.pdl import pdl_launch, release, wait_only
from llmx.kernels.tuning import GEMV_MAX_M, TileConfig, w4a16_uses_gemv
from llmx.kernels.w4a16_format import check_int4_inputs, int4_tuning_case

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32} if tl else {}
# Folding pays at M <= 2 only: at M = 4 the offsets cost 4 multiply-adds per word column where the subtract
# loop shares one subtract per weight among the rows (gemv_sass.py: 1,096 -> 1,143 instructions at M = 4).
FOLD_MAX_ROWS = 2
FOLD_DTYPES = (torch.float16, torch.bfloat16)


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None, *,
               config: TileConfig | dict | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(qweight, scales)^T (+ bias) -> [M, N] in x's dtype, for M <= GEMV_MAX_M.

    `config` overrides the tile configuration (else the tuned table, else the default).
    """
    check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, "w4a16_gemv")
    check_gemv_shape(x, group_size, "w4a16_gemv", "call w4a16_matmul, which picks the kernel")
    check_launch_device("w4a16_gemv", _w4a16_gemv_kernel, x, qweight, scales, bias, pre_scale)
    return launch_w4a16_gemv(x, qweight, scales, group_size, bias, pre_scale, config)


def check_gemv_shape(x: torch.Tensor, group_size: int, what: str, instead: str) -> None:
    """Refuse an x [M, K] and group size the GEMV does not run (`w4a16_uses_gemv`), saying what to call `instead`."""
    m, k = x.shape
    if not w4a16_uses_gemv(m, k, group_size):
        raise LlmxError(f"{what} takes M <= {GEMV_MAX_M} rows, K % 8 == 0 and group_size % 8 == 0, got "
                        f"M={m}, K={k}, group_size={group_size}; {instead}.")


def launch_w4a16_gemv(x, qweight, scales, group_size, bias, pre_scale, config, *, gated: bool = False,
                      out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The launch of `w4a16_gemv` for inputs already checked (w4a16_matmul's dispatch checked them), and of the
    gated variant (w4a16_gemv_gated.py checks its inputs): silu(gate) * up [M, N / 2] (times out_scale [N / 2])."""
    m, k = x.shape
    n = qweight.shape[0]
    cfg = tuning.gemm_config("w4a16_gemv", m, n, k, config)
    if gated and cfg.split_k > 1:
        cfg = cfg.replace(split_k=1)  # the activation needs whole sums: no atomically added partial ones
    block_k = cfg.block_k  # a power of two >= 16: at least 2 words per row
    act, wide = x.dtype, x.dtype == torch.float32
    scales = scales.to(act)
    # 16-bit activations, pre_scale and grouped scales are read as int32 pairs of elements (see above).
    grouped = block_k % group_size == 0 if wide else block_k % (2 * group_size) == 0 and (k // group_size) % 2 == 0
    x_words = x.contiguous() if wide else as_int32_words(x)
    pre_words = x_words  # a placeholder pointer unless HAS_PRE_SCALE
    if pre_scale is not None:
        pre = pre_scale.to(act).reshape(1, k)
        pre_words = pre.contiguous() if wide else as_int32_words(pre)
    scale_words = as_int32_words(scales) if grouped and not wide else scales.contiguous()
    qwords = as_int32_words(qweight)  # [N, K / 8]
    y = torch.empty((m, n // 2), device=x.device, dtype=act) if gated else new_output(m, n, act, x.device, cfg)
    _w4a16_gemv_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k)](
        x_words, qwords, scale_words, pre_words, x if bias is None else bias.to(act).contiguous(),
        x if out_scale is None else out_scale.to(act).contiguous(), y,
        n, k, x_words.stride(0), qwords.stride(0), scale_words.stride(0), y.stride(0), 0xF,
        M_ROWS=m, GROUP_SIZE=group_size, ACT=_TL_DTYPES[act], GROUPED_SCALES=grouped,
        HAS_PRE_SCALE=pre_scale is not None, HAS_BIAS=bias is not None, GATED=gated,
        HAS_OUT_SCALE=out_scale is not None, FOLD_OFFSET=folds_offset(m, act),
        EVEN_K=k % (block_k * cfg.split_k) == 0,
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT_K=cfg.split_k, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, **pdl_launch(x.device),
    )
    return y if gated else finish_output(y, act)


def folds_offset(m: int, dtype: torch.dtype) -> bool:
    """Whether the K loop for m activation rows of `dtype` folds the weights' offset into per-column sums
    (see above): for 16-bit activations, whose outputs round away more than folding loses."""
    return m <= FOLD_MAX_ROWS and dtype in FOLD_DTYPES


def w4a16_gemv_tuning_case(m: int, n: int, k: int, device: str = "cuda", group_size: int = 128,
                           dtype: torch.dtype = torch.bfloat16):
    """(run(config), check(output)) for `tuning.autotune`: random int4 inputs, launching the GEMV."""
    if not w4a16_uses_gemv(m, k, group_size):
        raise LlmxError(f"w4a16_gemv does not run M={m}, K={k}, group_size={group_size}; tune w4a16 there.")
    return int4_tuning_case(launch_w4a16_gemv, m, n, k, device, group_size, dtype)


@jit
def _load(ptrs, mask, EVEN_K: tl.constexpr):
    """A K-loop read; zeros past K (masks only when the K loop does not divide evenly)."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0)


@jit
def _pair_to_float(pair, ACT: tl.constexpr):
    """int32 pairs of 16-bit floats -> (lower element, upper element) in float32."""
    if ACT == tl.bfloat16:
        # A bfloat16 is the upper half of a float32: shift or mask it into place.
        return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
    low = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@jit
def _x_tile(row_ptr, pre_ptr, words, w_ok, ACT: tl.constexpr, HAS_PRE_SCALE: tl.constexpr, EVEN_K: tl.constexpr):
    """x[m, 8w + i] (times pre_scale) for i = 0..7 over the tile's words: 8 float32 [1, BLOCK_K / 8] vectors.
    `row_ptr` and `pre_ptr` address float32 elements, or int32 pairs of 16-bit ones."""
    xs = ()
    for j in tl.static_range(4):  # inputs 2j and 2j + 1 of every word
        if ACT == tl.float32:
            low = _load(row_ptr + words * 8 + 2 * j, w_ok, EVEN_K)
            high = _load(row_ptr + words * 8 + 2 * j + 1, w_ok, EVEN_K)
            if HAS_PRE_SCALE:
                low *= _load(pre_ptr + words * 8 + 2 * j, w_ok, EVEN_K)
                high *= _load(pre_ptr + words * 8 + 2 * j + 1, w_ok, EVEN_K)
        else:
            low, high = _pair_to_float(_load(row_ptr + words * 4 + j, w_ok, EVEN_K), ACT)
            if HAS_PRE_SCALE:
                pre_low, pre_high = _pair_to_float(_load(pre_ptr + words * 4 + j, w_ok, EVEN_K), ACT)
                low, high = low * pre_low, high * pre_high
        xs = xs + (low[None, :], high[None, :])
    return xs


@jit
def _accumulate(acc, words_in, masks, s, row_ptr, pre_ptr, words, w_ok, ACT: tl.constexpr,
                HAS_PRE_SCALE: tl.constexpr, EVEN_K: tl.constexpr, FOLD_OFFSET: tl.constexpr):
    """acc + s * sum_i (nibble_i - 8) * x_i per word of the tile, float32 [BLOCK_N, BLOCK_K / 8]: one activation
    row. `words_in` and `masks` are what `_shifted_words` and `_nibble_masks` give. The dequantized weights are
    the same expressions for every row, so the compiler computes them once."""
    xs = _x_tile(row_ptr, pre_ptr, words, w_ok, ACT, HAS_PRE_SCALE, EVEN_K)
    if FOLD_OFFSET:
        # sum_i (2^(23 - p_i) + nibble_i) * x_i - sum_i (2^(23 - p_i) + 8) * x_i: the second sum is the same for
        # every weight row, so it is computed per word column [1, WORDS] and starts the row sums.
        # Nibble i's lowest bit sits at p in its copy (`_shifted_words`): nibbles 0-2 at 11, 15, 19 of word << 11,
        # 3-4 at 12, 16 of the word, 5-7 at 11, 15, 19 of word >> 9; `masks` holds 0xF << 11, 15, 19, 12, 16.
        offset = tl.zeros(xs[0].shape, dtype=tl.float32)
        for i in tl.static_range(8):
            p = 11 + 4 * i if i < 3 else (4 * i if i < 5 else 4 * i - 9)
            offset += ((1 << (23 - p)) + 8.0) * xs[i]
        dots = tl.zeros(acc.shape, dtype=tl.float32) - offset
        for i in tl.static_range(8):
            p = 11 + 4 * i if i < 3 else (4 * i if i < 5 else 4 * i - 9)
            copy = words_in[0] if i < 3 else (words_in[1] if i < 5 else words_in[2])
            bits = (copy & masks[i if i < 5 else i - 5]) | ((150 - p) << 23)
            dots += bits.to(tl.float32, bitcast=True) * xs[i]
    else:
        dots = tl.zeros(acc.shape, dtype=tl.float32)
        for i in tl.static_range(8):
            half = words_in[0] if i < 4 else words_in[1]
            bits = (half & masks[i % 4]) | ((150 - 4 * (i % 4)) << 23)
            dots += (bits.to(tl.float32, bitcast=True) - ((1 << (23 - 4 * (i % 4))) + 8.0)) * xs[i]
    return acc + dots * s


@jit
def _nibble_masks(nibble_mask, shape, FOLD_OFFSET: tl.constexpr):
    """The masks of the nibble positions the loop reads, int32 tensors of `shape` built from the runtime argument
    `nibble_mask` (15) before the K loop, so they stay in registers (see the module docstring)."""
    nibble = nibble_mask + tl.zeros(shape, dtype=tl.int32)
    if FOLD_OFFSET:
        masks = (nibble << 11, nibble << 15, nibble << 19, nibble << 12, nibble << 16)
    else:
        masks = (nibble, nibble << 4, nibble << 8, nibble << 12)
    return masks


@jit
def _shifted_words(qw, FOLD_OFFSET: tl.constexpr):
    """The copies of the weight words the nibble masks apply to: the word shifted left by 11, the word itself and
    the word shifted right by 9, or the word and its high half (logical shifts: no sign extension)."""
    unsigned = qw.to(tl.uint32, bitcast=True)
    if FOLD_OFFSET:
        copies = ((unsigned << 11).to(tl.int32, bitcast=True), qw, (unsigned >> 9).to(tl.int32, bitcast=True))
    else:
        copies = (qw, (unsigned >> 16).to(tl.int32, bitcast=True))
    return copies


@jit
def _word_scales(scales_ptr, rows, stride_sn, words, tile, K, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ACT: tl.constexpr, GROUPED_SCALES: tl.constexpr, EVEN_K: tl.constexpr):
    """The group scale of every word of K tile `tile`, float32 [BLOCK_N, BLOCK_K / 8]."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    if GROUPED_SCALES:
        if ACT == tl.float32:
            offs_g = tile * GROUPS + tl.arange(0, GROUPS)
            s = _load(scales_ptr + rows[:, None] * stride_sn + offs_g[None, :], (offs_g < K // GROUP_SIZE)[None, :],
                      EVEN_K)
        else:
            offs_p = tile * (GROUPS // 2) + tl.arange(0, GROUPS // 2)
            pair = _load(scales_ptr + rows[:, None] * stride_sn + offs_p[None, :],
                         (offs_p < K // GROUP_SIZE // 2)[None, :], EVEN_K)
            low, high = _pair_to_float(pair, ACT)
            s = tl.reshape(tl.join(low, high), (BLOCK_N, GROUPS))
        s = tl.broadcast_to(s[:, :, None], (BLOCK_N, GROUPS, GROUP_SIZE // 8))
        return tl.reshape(s, (BLOCK_N, BLOCK_K // 8))
    groups = tl.minimum(words, K // 8 - 1) // (GROUP_SIZE // 8)  # clamped past K, where x is zero
    return tl.load(scales_ptr + rows[:, None] * stride_sn + groups[None, :]).to(tl.float32)


@jit
def _store_row(acc, m, out_ptr, bias_ptr, out_scale_ptr, rows, pid_n, pid_k, N, stride_om, ACT: tl.constexpr,
               HAS_BIAS: tl.constexpr, GATED: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
               SPLIT_K: tl.constexpr):
    """Sum one activation row's [BLOCK_N, BLOCK_K / 8] lanes into its BLOCK_N outputs (weight rows `rows`), plus
    the bias (by split 0 only), and write them to row m of the output: stored, or added atomically into the
    float32 buffer when SPLIT_K > 1. GATED: the tile's first half are gate rows and its second the matching up
    rows; it writes the BLOCK_N / 2 values silu(gate) * up, rounded as silu_and_mul rounds them after a 16-bit
    gate_up output, times out_scale (HAS_OUT_SCALE) before the last rounding."""
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows).to(tl.float32)
        y += tl.where(pid_k == 0, bias, 0.0)
    if GATED:
        HALF: tl.constexpr = BLOCK_N // 2
        halves = tl.reshape(y.to(ACT).to(tl.float32), (2, HALF))
        which = tl.arange(0, 2)[:, None]
        gate = tl.sum(tl.where(which == 0, halves, 0.0), axis=0)
        up = tl.sum(tl.where(which == 1, halves, 0.0), axis=0)
        out = (gate / (1.0 + tl.exp(-gate))).to(ACT).to(tl.float32) * up
        offs = pid_n * HALF + tl.arange(0, HALF)
        ok = offs < N // 2
        if HAS_OUT_SCALE:
            out *= tl.load(out_scale_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs, out.to(ACT), mask=ok)
    else:
        offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if SPLIT_K > 1:
            tl.atomic_add(out_ptr + m * stride_om + offs, y, mask=offs < N, sem="relaxed")
        else:
            tl.store(out_ptr + m * stride_om + offs, y.to(out_ptr.dtype.element_ty), mask=offs < N)


@jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, scales_ptr, pre_ptr, bias_ptr, out_scale_ptr, out_ptr,
    N, K, stride_xm, stride_qn, stride_sn, stride_om, nibble_mask,
    M_ROWS: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT: tl.constexpr, GROUPED_SCALES: tl.constexpr,
    HAS_PRE_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
    FOLD_OFFSET: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr,
):
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GATED:
        # Gate rows pid_n * HALF + [0, HALF), then the up rows N / 2 further on, each clamped to its half.
        HALF: tl.constexpr = BLOCK_N // 2
        idx = tl.arange(0, BLOCK_N)
        rows = tl.minimum(pid_n * HALF + idx % HALF, N // 2 - 1) + (idx // HALF) * (N // 2)
    else:
        # Rows past N read row N - 1 (in bounds: no mask on the weight stream); their sums are never stored.
        rows = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    offs_w = tl.arange(0, WORDS)
    masks = _nibble_masks(nibble_mask, (BLOCK_N, WORDS), FOLD_OFFSET)

    # One accumulator per activation row; those past M_ROWS are never touched, and the compiler drops them.
    acc0 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    wait_only(PDL)
    if not GATED:
        release(PDL)
    iters = tl.cdiv(K, BLOCK_K * SPLIT_K)
    for it in tl.range(0, iters, num_stages=NUM_STAGES):
        tile = pid_k * iters + it
        words = tile * WORDS + offs_w  # [WORDS]: the int32 words of this K tile
        w_ok = words < K // 8
        qw = _load(qw_ptr + rows[:, None] * stride_qn + words[None, :], w_ok[None, :], EVEN_K)
        s = _word_scales(scales_ptr, rows, stride_sn, words, tile, K, GROUP_SIZE, BLOCK_N, BLOCK_K, ACT,
                         GROUPED_SCALES, EVEN_K)
        words_in = _shifted_words(qw, FOLD_OFFSET)
        acc0 = _accumulate(acc0, words_in, masks, s, x_ptr, pre_ptr, words, w_ok, ACT, HAS_PRE_SCALE,
                           EVEN_K, FOLD_OFFSET)
        if M_ROWS > 1:
            acc1 = _accumulate(acc1, words_in, masks, s, x_ptr + stride_xm, pre_ptr, words, w_ok, ACT,
                               HAS_PRE_SCALE, EVEN_K, FOLD_OFFSET)
        if M_ROWS > 2:
            acc2 = _accumulate(acc2, words_in, masks, s, x_ptr + 2 * stride_xm, pre_ptr, words, w_ok, ACT,
                               HAS_PRE_SCALE, EVEN_K, FOLD_OFFSET)
        if M_ROWS > 3:
            acc3 = _accumulate(acc3, words_in, masks, s, x_ptr + 3 * stride_xm, pre_ptr, words, w_ok, ACT,
                               HAS_PRE_SCALE, EVEN_K, FOLD_OFFSET)
    if GATED:
        # Late: the gated GEMV's dependent is the down GEMV, whose early programs would hold SM resources
        # through all of this kernel's waves (kernels/pdl.py). The other GEMVs release early: their dependents
        # are light kernels, which a late release would only delay.
        release(PDL)

    _store_row(acc0, 0, out_ptr, bias_ptr, out_scale_ptr, rows, pid_n, pid_k, N, stride_om, ACT, HAS_BIAS, GATED,
               HAS_OUT_SCALE, BLOCK_N, SPLIT_K)
    if M_ROWS > 1:
        _store_row(acc1, 1, out_ptr, bias_ptr, out_scale_ptr, rows, pid_n, pid_k, N, stride_om, ACT, HAS_BIAS,
                   GATED, HAS_OUT_SCALE, BLOCK_N, SPLIT_K)
    if M_ROWS > 2:
        _store_row(acc2, 2, out_ptr, bias_ptr, out_scale_ptr, rows, pid_n, pid_k, N, stride_om, ACT, HAS_BIAS,
                   GATED, HAS_OUT_SCALE, BLOCK_N, SPLIT_K)
    if M_ROWS > 3:
        _store_row(acc3, 3, out_ptr, bias_ptr, out_scale_ptr, rows, pid_n, pid_k, N, stride_om, ACT, HAS_BIAS,
                   GATED, HAS_OUT_SCALE, BLOCK_N, SPLIT_K)
