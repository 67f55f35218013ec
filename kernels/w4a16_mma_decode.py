"""W4A16 decode GEMM on Hopper's tensor cores: int4 group-wise weights times a few activation rows.

`w4a16_mma_decode(x [M, K], qweight, scales, group_size, bias=None, pre_scale=None) -> [M, N]` computes what
`w4a16_gemm_ref` computes (w4a16_format.py's storage format) for M <= 64 rows of fp16/bf16 activations,
K % 128 == 0 and group_size % 128 == 0, on GPUs with wgmma (compute capability 9.x). `w4a16_dispatch.w4a16_matmul`
hands it the calls with M = 2..64 where `mma_decode_available` (`tuning.int4_kernel_for`), so the runtime's Linears
and the gated MLP get it.

Why: the CUDA-core GEMV (w4a16_gemv.py) does a multiply-add per weight and activation row, so its time grows
with M, and the tensor-core GEMM (w4a16_gemm.py) pads every weight tile through a slow conversion. Here the
multiply-adds go to the tensor cores, where padding the batch to 16 rows is free, and each weight is converted
once, in registers: the time hardly depends on M up to 16, and the batch is padded to 32 or 64 rows above that.
At M = 1 the GEMV is faster, so M = 1 stays there. On Llama-3.1-8B's layers this kernel took less time than
what ran those rows before it (the GEMV at M = 2..4, the tensor-core GEMM above) at every measured M from 2 to
64, except the LM head (N = 128,256) at M = 48..64, which the dispatch, by M and K alone, accepts. Per-shape
timings: BENCHMARKS.md.

The tile: program (pid_n, pid_k, pid_m) takes BLOCK_N weight rows, the pid_k-th of SPLIT_K slices of the K loop
and BLOCK_M (16, 32 or 64) activation rows, and computes out^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, 128] @
x^T [128, BLOCK_M] per 128-input K tile with one wgmma whose A operand (the weights) comes from registers and
whose B operand (x) Triton copies into shared memory. The tile lies in one quantization group, so the group
scale multiplies the [BLOCK_N, BLOCK_M] partial product.
(Scaling the weights instead, so that the wgmmas could run ahead without a wait per tile, measured slower: its
extra packed multiply per two weights costs more than the waits.)

Conversion: a word of 8 nibbles (inputs 8w + 2j + e, j < 4, e < 2) becomes 4 registers of two 16-bit
values, (nibble 2j, nibble 2j + 1), each a PRMT (byte j of the word and of the word >> 4), a LOP3 (mask the
two nibbles, OR in the exponent of 2^7 for bf16 or 2^10 for fp16: 128 + nibble, 1024 + nibble exactly) and a
packed subtract of 136 or 1032: 13 instructions per 8 weights (inline PTX; Triton's interpreter runs the same
arithmetic in plain Triton instead), about two thirds of what the tensor-core GEMM's conversion of the same tile
takes.

Operand order: a wgmma A register holds the weights of two adjacent dot positions (2a + 8i + {0, 1} for the
thread's lane a = lane % 4), and a thread's positions stride by 8. So the dot does not take the inputs in
memory order: the tile's word w = a * 4 + ib (a < 4, ib < 4) feeds dot positions d = 8 (4 ib + j) + 2 a + e.
Every thread then converts the 4 consecutive words of a 16-byte read into exactly its own A registers, with
no data moved between threads, and x is read in the same permuted order (`_dot_order_inputs`: pairs of
adjacent inputs, 4-byte asynchronous copies). The permutation is a relabelling the compiler resolves; the
result is x W^T as usual.

Split-K: wgmma tiles are 64 weight rows at least, so N = 4096 makes only 64 tiles for 132 SMs. With
SPLIT_K > 1 each program writes its float32 partial tile to a workspace and takes a ticket from a per-tile
counter; the last of a tile's programs adds the partials and writes the output (bias, gate, rounding). It
then resets the counter, so the counters (one buffer per GPU, zeroed once) are ready for the next launch, and
no zero-fill or cast kernel is needed. With programmatic dependent launch a kernel touches the workspace only
after its wait, when the previous launch has completed.

Gated variant (GATED): the weight is a fused [gate | up]; a tile gathers BLOCK_N / 2 gate rows and the
matching up rows and writes silu(gate) * up (times out_scale) rounded as w4a16_gemv_gated.py rounds it.
`pre_scale` (AWQ) multiplies x in registers before it goes to shared memory.

Tile configs are `tuning.TileConfig`s under the kernel name "w4a16_mma_decode" (block_m 16, 32 or 64, block_k
128; block_n 64 or 128, split_k, num_stages, num_warps 4).
"""

from __future__ import annotations

import functools

import torch

from llmx.common.errors import LlmxError
from llmx.kernels import tuning
from llmx.kernels._gemm_common import as_int32_words
from llmx.kernels._triton_util import check_launch_device, interpreter_active, jit, tl, triton
from llmx.kernels.pdl import pdl_launch, release, wait_only
from llmx.kernels.tuning import MMA_BLOCK_K, MMA_KERNEL_MAX_M, TileConfig, mma_block_m, w4a16_mma_decode_fits
from llmx.kernels.w4a16_format import check_int4_inputs, int4_tuning_case

MMA_DTYPES = (torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16} if tl else {}

# Per-GPU split-K tile counters (int32, zero between launches). Launches on one GPU must run one after another
# (one stream, as the runtime's do): two at once would share counters.
_COUNTERS: dict[str, torch.Tensor] = {}
_MIN_COUNTERS = 4096


def mma_decode_available(dtype: torch.dtype, device: torch.device | str = "cuda") -> bool:
    """Whether this kernel runs `dtype` activations on `device` (`tuning.int4_kernel_for` decides the rows, K and
    group size it takes there)."""
    device = torch.device(device)
    if dtype not in MMA_DTYPES or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _hopper(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _hopper(index: int) -> bool:
    """GPU `index` has wgmma and packed bf16 arithmetic (compute capability 9.x), and kernels compile for it (not
    Triton's interpreter). Cached: w4a16_matmul asks on every call."""
    return not interpreter_active() and torch.cuda.get_device_capability(index)[0] == 9


def w4a16_mma_decode(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                     bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None, *,
                     config: TileConfig | dict | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(qweight, scales)^T (+ bias) -> [M, N] in x's dtype, for M <= 64 rows.

    `config` overrides the tile configuration (else the tuned table, else the default)."""
    check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, "w4a16_mma_decode")
    check_mma_decode_shape(x, group_size, "w4a16_mma_decode")
    check_launch_device("w4a16_mma_decode", _w4a16_mma_decode_kernel, x, qweight, scales, bias, pre_scale)
    return launch_w4a16_mma_decode(x, qweight, scales, group_size, bias, pre_scale, config)


def check_mma_decode_shape(x: torch.Tensor, group_size: int, what: str) -> None:
    """Refuse an x [M, K] and group size the kernel does not run, saying what to call instead."""
    m, k = x.shape
    if not w4a16_mma_decode_fits(m, k, group_size) or x.dtype not in MMA_DTYPES:
        raise LlmxError(f"{what} takes M <= {MMA_KERNEL_MAX_M} rows of float16/bfloat16, K and group_size "
                        f"multiples of {MMA_BLOCK_K}, got M={m}, {x.dtype}, K={k}, group_size={group_size}; "
                        f"call w4a16_matmul, which picks the kernel.")


def mma_decode_config(m: int, n: int, k: int, override: TileConfig | dict | None = None) -> TileConfig:
    """The launch's tiles: `override`, else the tuned entry, else the default (tuning.py); block_m is cut to the
    batch padded to 16, 32 or 64 rows (the M = 64 bucket's entry, timed at M = 64, also serves M = 17..32, where
    64-row tiles would be half padding), and split_k to a power of two that divides the K tiles."""
    cfg = tuning.gemm_config("w4a16_mma_decode", m, n, k, override)
    split = cfg.split_k
    while split > 1 and (k // MMA_BLOCK_K) % split:
        split //= 2
    block_m = min(cfg.block_m, mma_block_m(m))
    return cfg if (split, block_m) == (cfg.split_k, cfg.block_m) else cfg.replace(split_k=split, block_m=block_m)


def launch_w4a16_mma_decode(x, qweight, scales, group_size, bias, pre_scale, config, *, gated: bool = False,
                            out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The launch for inputs already checked; `gated`: silu(gate) * up [M, N / 2] (times out_scale [N / 2])."""
    m, k = x.shape
    n = qweight.shape[0]
    cfg = mma_decode_config(m, n, k, config)
    act = x.dtype
    x = x if x.stride(1) == 1 else x.contiguous()
    width = n // 2 if gated else n
    y = torch.empty((m, width), device=x.device, dtype=act)
    tiles = triton.cdiv(width, cfg.block_n // 2) if gated else triton.cdiv(n, cfg.block_n)
    m_tiles = triton.cdiv(m, cfg.block_m)
    split = cfg.split_k
    workspace = torch.empty((split, m, tiles * cfg.block_n) if split > 1 else (1,), device=x.device,
                            dtype=torch.float32)
    counters = _tile_counters(x.device, tiles * m_tiles) if split > 1 else workspace
    qwords = as_int32_words(qweight)  # [N, K / 8]: a view unless the rows are not 4-byte aligned
    _w4a16_mma_decode_kernel[(tiles, split, m_tiles)](
        x, qwords, scales.to(act).contiguous(),
        x if pre_scale is None else pre_scale.to(act).contiguous(),
        x if bias is None else bias.to(act).contiguous(),
        x if out_scale is None else out_scale.to(act).contiguous(), y, workspace, counters,
        m, n, k, x.stride(0), qwords.stride(0), scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, ACT=_TL_DTYPES[act], USE_ASM=not interpreter_active(),
        HAS_PRE_SCALE=pre_scale is not None, HAS_BIAS=bias is not None, GATED=gated,
        HAS_OUT_SCALE=out_scale is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=MMA_BLOCK_K,
        SPLIT_K=split, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps, **pdl_launch(x.device),
    )
    return y


def w4a16_mma_decode_tuning_case(m: int, n: int, k: int, device: str = "cuda", group_size: int = 128,
                                 dtype: torch.dtype = torch.bfloat16):
    """(run(config), check(output)) for `tuning.autotune`: random int4 inputs, launching this kernel."""
    if not w4a16_mma_decode_fits(m, k, group_size) or dtype not in MMA_DTYPES:
        raise LlmxError(f"w4a16_mma_decode does not run M={m}, {dtype}, K={k}, group_size={group_size}; tune "
                        f"w4a16 there.")
    return int4_tuning_case(launch_w4a16_mma_decode, m, n, k, device, group_size, dtype)


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The zeroed int32 counters of `device` for `tiles` split-K tiles (allocated once, grown if needed; never
    while a CUDA graph is captured, since the runtime warms every shape up first)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    counters = _COUNTERS.get(str(device))
    if counters is None or counters.numel() < tiles:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise LlmxError("w4a16_mma_decode: its split-K counters must exist before CUDA-graph capture; run "
                            "the shape once eagerly first (the runtime's warm-up does).")
        counters = torch.zeros(max(tiles, _MIN_COUNTERS), device=device, dtype=torch.int32)
        _COUNTERS[str(device)] = counters
    return counters


def _conversion_ptx(magic: str, sub: str) -> str:
    """The PTX of `_unpack_pairs`: $4 (= $5) is the word, $0..$3 get (nibble 2j, nibble 2j + 1) - 8. `magic` is
    the 16-bit float 2^7 (bf16) or 2^10 (fp16), twice; m holds that plus 8."""
    offset = f"0x{int(magic, 16) + 0x00080008:08X}"
    lines = [".reg .b32 v, m;", f"mov.b32 m, {offset};", "shr.b32 v, $4, 4;"]
    lines += [f"prmt.b32 ${j}, $4, v, 0x0{4 + j}0{j};" for j in range(4)]
    lines += [f"lop3.b32 ${j}, ${j}, 0x000F000F, {magic}, 0xEA;" for j in range(4)]
    lines += [f"{sub} ${j}, ${j}, m;" for j in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


# Triton's JIT takes strings only as literals or constexpr globals.
_PTX_BF16 = tl.constexpr(_conversion_ptx("0x43004300", "sub.rn.bf16x2")) if tl else None
_PTX_FP16 = tl.constexpr(_conversion_ptx("0x64006400", "sub.f16x2")) if tl else None


@jit
def _unpack_pairs(pairs, ACT: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words [..., 2] (each word twice along the last axis) -> 4 tensors of ACT [..., 2]: o_j[..., e] =
    nibble 2j + e of the word - 8, exactly. With USE_ASM the two values of o_j share one register: a PRMT, a LOP3
    and a packed subtract per register (_conversion_ptx)."""
    if USE_ASM:
        if ACT == tl.bfloat16:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(
                _PTX_BF16, "=r,=r,=r,=r,r,r", [pairs],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        else:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(
                _PTX_FP16, "=r,=r,=r,=r,r,r", [pairs],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        e = tl.arange(0, 2)
        o0 = (((pairs >> (4 * e)) & 15) - 8).to(ACT)
        o1 = (((pairs >> (8 + 4 * e)) & 15) - 8).to(ACT)
        o2 = (((pairs >> (16 + 4 * e)) & 15) - 8).to(ACT)
        o3 = (((pairs >> (24 + 4 * e)) & 15) - 8).to(ACT)
    return o0, o1, o2, o3


@jit
def _dequantize_tile(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACT: tl.constexpr,
                     USE_ASM: tl.constexpr):
    """int32 words [BLOCK_N, BLOCK_K / 8] in memory order -> nibble - 8 [BLOCK_N, BLOCK_K] in ACT, in dot order:
    word w = a * IB + ib, input 8 w + 2 j + e goes to dot position 8 (4 ib + j) + 2 a + e (module docstring)."""
    IB: tl.constexpr = BLOCK_K // 32
    words = tl.permute(tl.reshape(words, (BLOCK_N, 4, IB)), (0, 2, 1))  # [n, ib, a]
    o0, o1, o2, o3 = _unpack_pairs(tl.join(words, words), ACT, USE_ASM)  # [n, ib, a, e] each
    w = tl.join(tl.join(o0, o1), tl.join(o2, o3))  # [n, ib, a, e, j0, j1] with j = j0 + 2 j1
    return tl.reshape(tl.permute(w, (0, 1, 5, 4, 2, 3)), (BLOCK_N, BLOCK_K))


@jit
def _dot_order_inputs(BLOCK_K: tl.constexpr):
    """The tile input k that dot position d takes (the inverse of `_dequantize_tile`'s relabelling): [BLOCK_K]
    int32, adjacent pairs contiguous."""
    IB: tl.constexpr = BLOCK_K // 32
    d = tl.arange(0, BLOCK_K)
    k = 8 * (((d // 2) % 4) * IB + d // 32) + 2 * ((d // 8) % 4) + d % 2
    return tl.max_contiguous(tl.multiple_of(k, 2), 2)


@jit
def _finish(total, offs_m, slots, out_ptr, bias_ptr, out_scale_ptr, rows, M, N, stride_om, ACT: tl.constexpr,
            HAS_BIAS: tl.constexpr, GATED: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """Write a tile's whole float32 sums out^T [BLOCK_N, BLOCK_M] (rows m < M): plus the bias, or for GATED the
    BLOCK_N / 2 values silu(gate) * up (times out_scale), rounded as silu_and_mul after a 16-bit gate_up output."""
    if HAS_BIAS:
        total += tl.load(bias_ptr + rows).to(tl.float32)[:, None]
    if GATED:
        HALF: tl.constexpr = BLOCK_N // 2
        gate, up = tl.split(tl.permute(tl.reshape(total.to(ACT).to(tl.float32), (2, HALF, BLOCK_M)), (1, 2, 0)))
        out = (gate / (1.0 + tl.exp(-gate))).to(ACT).to(tl.float32) * up
        cols = tl.program_id(0) * HALF + tl.arange(0, HALF)
        ok = cols < N // 2
        if HAS_OUT_SCALE:
            out *= tl.load(out_scale_ptr + cols, mask=ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs_m[None, :] * stride_om + cols[:, None], out.to(ACT),
                 mask=ok[:, None] & (offs_m < M)[None, :])
    else:
        tl.store(out_ptr + offs_m[None, :] * stride_om + slots[:, None], total.to(ACT),
                 mask=(slots < N)[:, None] & (offs_m < M)[None, :])


@jit
def _w4a16_mma_decode_kernel(
    x_ptr, qw_ptr, scales_ptr, pre_ptr, bias_ptr, out_scale_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
    GROUP_SIZE: tl.constexpr, ACT: tl.constexpr, USE_ASM: tl.constexpr, HAS_PRE_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the tile's rows (gated: its slots of gathered rows)
    if GATED:
        HALF: tl.constexpr = BLOCK_N // 2
        idx = tl.arange(0, BLOCK_N)
        rows = tl.minimum(pid_n * HALF + idx % HALF, N // 2 - 1) + (idx // HALF) * (N // 2)
    else:
        # Rows past N read row N - 1 (in bounds: no mask on the weight stream); their sums are never stored.
        rows = tl.minimum(slots, N - 1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    dot_k = _dot_order_inputs(BLOCK_K)
    # Batch rows past M read row M - 1: no masks in the copy; their outputs are never stored.
    x_tile = x_ptr + tl.minimum(offs_m, M - 1)[:, None] * stride_xm + dot_k[None, :]
    offs_w = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    wait_only(PDL)
    if not GATED:
        release(PDL)
    iters = K // (BLOCK_K * SPLIT_K)
    for it in tl.range(0, iters, num_stages=NUM_STAGES):
        k0 = (pid_k * iters + it) * BLOCK_K
        words = tl.load(qw_ptr + rows[:, None] * stride_qn + (k0 // 8 + offs_w)[None, :])
        x = tl.load(x_tile + k0)
        if HAS_PRE_SCALE:
            x = (x * tl.load(pre_ptr + k0 + dot_k)[None, :]).to(ACT)
        s = tl.load(scales_ptr + rows * stride_sn + k0 // GROUP_SIZE).to(tl.float32)
        w = _dequantize_tile(words, BLOCK_N, BLOCK_K, ACT, USE_ASM)
        acc += tl.dot(w, tl.trans(x)) * s[:, None]
    if GATED:
        release(PDL)  # late, as the gated GEMV does: its dependent is the down projection (w4a16_gemv.py)

    if SPLIT_K == 1:
        _finish(acc, offs_m, slots, out_ptr, bias_ptr, out_scale_ptr, rows, M, N, stride_om, ACT, HAS_BIAS,
                GATED, HAS_OUT_SCALE, BLOCK_M, BLOCK_N)
    else:
        width = tl.num_programs(0) * BLOCK_N
        ws_tile = ws_ptr + offs_m[None, :] * width + slots[:, None]
        m_ok = (offs_m < M)[None, :]
        tl.store(ws_tile + pid_k * M * width, acc, mask=m_ok)
        tl.debug_barrier()  # every thread's partial sums are written before the ticket is taken
        counter = counter_ptr + tl.program_id(2) * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for part in tl.static_range(SPLIT_K):
                total += tl.load(ws_tile + part * M * width, mask=m_ok, other=0.0, cache_modifier=".cg")
            _finish(total, offs_m, slots, out_ptr, bias_ptr, out_scale_ptr, rows, M, N, stride_om, ACT,
                    HAS_BIAS, GATED, HAS_OUT_SCALE, BLOCK_M, BLOCK_N)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
