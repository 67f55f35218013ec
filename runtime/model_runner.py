"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

One instance per rank. It owns the model, the KV cache and the per-request random generators.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from itertools import chain, compress
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from llmx.common.errors import LlmxError
from llmx.formats.config import BuildConfig, ModelConfig
from llmx.formats.shard import kv_heads_per_rank
from llmx.kernels import tuning
from llmx.runtime.cuda_graph import DecodeGraphs, default_batch_buckets
from llmx.runtime.distributed import ParallelContext
from llmx.runtime.layers.attention import AttentionMetadata
from llmx.runtime.layers.sampler import ban, penalize, sample, to_device, top_logprobs
from llmx.runtime.loader import load_rank_weights
from llmx.runtime.models import model_class
from llmx.runtime.sequence import SamplingParams, Sequence

KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30  # CPU engines: KV budget when the user names none
_DUMMY_PARAMS = SamplingParams(max_new_tokens=1)  # for profiling and scoring passes, which never sample
_LOGPROB_ROWS = 256  # prompt positions whose logits are computed at once for prompt log-probabilities


class WorkItem(NamedTuple):
    """One sequence's share of a step, self-contained so it can be broadcast to other ranks.

    tokens: the ids at positions [start, start + len(tokens)); block_table: the sequence's KV blocks;
    sample: whether this chunk reaches the end of the known tokens (then a token is sampled); prompt: the
    whole prompt, sent only the first time a request whose sampling needs its token history samples (the
    runner keeps that history from then on, see `TokenHistory`).
    A named tuple: a step builds one per running sequence, and `prepare` transposes the batch with zip.
    """

    seq_id: int
    tokens: list[int]
    start: int
    block_table: list[int]
    sample: bool
    params: SamplingParams
    prompt: list[int] | None = None

    @classmethod
    def from_sequence(cls, seq: Sequence, num_new_tokens: int) -> "WorkItem":
        """The item of seq's next num_new_tokens positions. block_table is seq's own list, not a copy: the step
        reads it (or pickles it, to broadcast) before the scheduler runs again."""
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        sample = end == seq.num_tokens
        first_sample = sample and seq.params.needs_token_history and not seq.output_token_ids
        return cls(seq.seq_id, seq.token_slice(start, end), start, seq.block_table, sample, seq.params,
                   seq.prompt_token_ids if first_sample else None)


@dataclass
class StepInputs:
    input_ids: torch.Tensor | None  # [T] int64; None for a step fed by token_rows until `launch` gathers it
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [S] int64: packed row of the last token of each sampling sequence
    sampling: list[WorkItem]
    token_rows: torch.Tensor | None = None  # [T] int64: rows of the previous step's tokens that are the inputs


class TokenLogprobs(NamedTuple):
    """A token's log-probability under the model, and the likeliest tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), likeliest first


class SampledLogprobs(NamedTuple):
    """Device tensors of a step's log-probabilities, for the sampling rows `rows` (of PendingTokens.items)."""

    rows: list[int]
    chosen: torch.Tensor  # [L] float32
    top_ids: torch.Tensor  # [L, k] int64
    top_values: torch.Tensor  # [L, k] float32


class PendingTokens:
    """The tokens a launched step samples, read back to the host only when asked.

    tokens: int64 [S] on the device, in the order of `items` (the WorkItems that sample); a following step
    can take its input ids from it without a round trip through the host. The copy into pinned host memory
    is queued at creation; `result()` waits for it alone, not for work queued after it. `logprobs`: the
    log-probabilities of the rows whose request asked for them, copied back with the tokens.
    """

    def __init__(self, items: list[WorkItem], tokens: torch.Tensor | None, logprobs: SampledLogprobs | None = None):
        self.items = items
        self.tokens = tokens
        self._host = None
        self._ready = None
        self._logprobs = logprobs
        if tokens is not None and tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            if logprobs is not None:
                self._logprobs = logprobs._replace(**{name: _to_pinned(getattr(logprobs, name))
                                                      for name in ("chosen", "top_ids", "top_values")})
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(tokens.device))

    @functools.cached_property
    def rows(self) -> dict[int, int]:
        """seq_id -> row of `tokens`; built only when a step is launched after this one."""
        return {item.seq_id: row for row, item in enumerate(self.items)}

    def result(self) -> dict[int, int]:
        """{seq_id: sampled token}, waiting for this step's copy if it is still under way."""
        if self.tokens is None:
            return {}
        if self._ready is not None:
            self._ready.synchronize()
            values = self._host.tolist()
        else:
            values = self.tokens.tolist()
        return {item.seq_id: token for item, token in zip(self.items, values)}

    def logprobs(self) -> dict[int, TokenLogprobs]:
        """{seq_id: TokenLogprobs} for the rows whose request asked for log-probabilities (after `result`)."""
        lp = self._logprobs
        if lp is None:
            return {}
        if self._ready is not None:
            self._ready.synchronize()
        tokens = self.result()
        out = {}
        for row, chosen, ids, values in zip(lp.rows, lp.chosen.tolist(), lp.top_ids.tolist(), lp.top_values.tolist()):
            item = self.items[row]
            k = item.params.logprobs
            out[item.seq_id] = TokenLogprobs(tokens[item.seq_id], chosen, list(zip(ids[:k], values[:k])))
        return out


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


@dataclass
class TokenHistory:
    """What the sampling of one request needs of its past: the prompt's tokens (repetition penalty), how often
    each token was generated (frequency and presence penalties), and how many were (min_tokens).

    Kept on the device by the rank that samples, and counted there right after each sampling, so a step
    queued before the previous one's tokens are read back still sees them."""

    prompt_mask: torch.Tensor  # [vocab] bool
    counts: torch.Tensor  # [vocab] float32
    num_sampled: int = 0


def _leading_ones(query_lens: np.ndarray) -> int:
    """How many sequences at the front of the batch bring one new token each."""
    longer = np.flatnonzero(query_lens != 1)
    return int(longer[0]) if longer.size else len(query_lens)


class StepInputsBuilder:
    """A step's input tensors from its WorkItems, built on the host with a few whole-batch operations.

    The batch is transposed once (zip over the named tuples) and read into numpy arrays by C loops; positions,
    KV slots and the padded block tables are then vectorized, so the Python work of a step does not grow
    token by token. On CUDA the arrays are written into reusable pinned buffers and copied asynchronously
    (one non-blocking copy per tensor, no pageable staging, no synchronization of the host).
    """

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self._pinned: dict[str, tuple[torch.Tensor, np.ndarray]] = {}  # name -> (pinned buffer, its numpy view)
        self._copies_done = None  # torch.cuda.Event recorded after the last step's copies

    def build(self, work: list[WorkItem], token_rows: list[int] | None = None) -> StepInputs:
        """token_rows: for a decode step whose input ids are the previous step's sampled tokens (still on the
        device), the row of that step's tokens feeding each WorkItem; their `tokens` are then placeholders."""
        if not work:
            raise ValueError("a step needs at least one WorkItem")
        n, bs = len(work), self.block_size
        _, token_lists, starts, tables, samples, _, _ = zip(*work)
        query_lens = np.fromiter(map(len, token_lists), dtype=np.int64, count=n)  # [B] new tokens per sequence
        start = np.array(starts, dtype=np.int64)  # [B] position of each sequence's first new token
        seq_lens = start + query_lens  # [B] KV length of each sequence after the step
        query_start_loc = np.zeros(n + 1, dtype=np.int64)  # [B+1] offsets in the packed batch
        np.cumsum(query_lens, out=query_start_loc[1:])
        total = int(query_start_loc[-1])
        if total == n:  # a decode step: one token per sequence
            rows, positions = np.arange(n), start
        else:
            rows = np.repeat(np.arange(n), query_lens)  # [T] batch row of each token
            positions = np.arange(total) - np.repeat(query_start_loc[:-1] - start, query_lens)  # [T]
        table_lens = np.fromiter(map(len, tables), dtype=np.int64, count=n)
        short = table_lens * bs < seq_lens
        if short.any():
            i = int(short.argmax())
            raise ValueError(f"WorkItem of sequence {work[i].seq_id}: its {table_lens[i]} KV blocks hold "
                             f"{table_lens[i] * bs} positions but the step reaches position {seq_lens[i] - 1}")
        block_tables = np.zeros((n, int(table_lens.max())), dtype=np.int32)  # [B, max_blocks], 0-padded
        block_tables[np.arange(block_tables.shape[1]) < table_lens[:, None]] = np.fromiter(
            chain.from_iterable(tables), dtype=np.int32, count=int(table_lens.sum()))
        slots = block_tables[rows, positions // bs].astype(np.int64) * bs + positions % bs  # [T]
        logits_rows = query_start_loc[1:][np.array(samples, dtype=bool)] - 1  # [S] last token of each sampler
        # Either the ids themselves or, for a step fed by the previous one, the rows that hold them on the device.
        if token_rows is None:
            ids = {"input_ids": np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=total)}  # [T]
        else:
            ids = {"token_rows": np.array(token_rows, dtype=np.int64)}
        t = self._upload(**ids, positions=positions, slot_mapping=slots, block_tables=block_tables,
                         seq_lens=seq_lens.astype(np.int32), query_start_loc=query_start_loc.astype(np.int32),
                         logits_rows=logits_rows)
        meta = AttentionMetadata(slot_mapping=t["slot_mapping"], block_tables=t["block_tables"],
                                 seq_lens=t["seq_lens"], query_start_loc=t["query_start_loc"],
                                 max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
                                 num_leading_decodes=_leading_ones(query_lens))
        return StepInputs(input_ids=t.get("input_ids"), positions=t["positions"], meta=meta,
                          logits_rows=t["logits_rows"], sampling=list(compress(work, samples)),
                          token_rows=t.get("token_rows"))

    def _upload(self, **arrays: np.ndarray) -> dict[str, torch.Tensor]:
        if self.device.type != "cuda":
            return {name: torch.from_numpy(array) for name, array in arrays.items()}
        # The last step's copies read these same buffers: they must be done before the buffers are rewritten
        # (normally long since, as that step's sampled tokens were read back on the host).
        if self._copies_done is not None:
            self._copies_done.synchronize()
        out = {name: self._staged(name, array).to(self.device, non_blocking=True) for name, array in arrays.items()}
        self._copies_done = torch.cuda.Event()
        self._copies_done.record(torch.cuda.current_stream(self.device))
        return out

    def _staged(self, name: str, array: np.ndarray) -> torch.Tensor:
        """array copied into the pinned buffer `name`, grown to the next power of two when too small."""
        buffer, view = self._pinned.get(name, (None, None))
        if buffer is None or buffer.numel() < array.size:
            size = 1 << max(array.size - 1, 1).bit_length()
            with torch.inference_mode(False):  # a plain tensor: usable in and out of inference mode
                buffer = torch.empty(size, dtype=torch.from_numpy(array[:0]).dtype, pin_memory=True)
            view = buffer.numpy()
            self._pinned[name] = (buffer, view)
        view[:array.size] = array.ravel()
        return buffer[:array.size].view(array.shape)


def kv_cache_dtype(build: BuildConfig, act_dtype: torch.dtype) -> torch.dtype:
    return KV_CACHE_DTYPES[build.kv_cache_dtype] if build.kv_cache_dtype else act_dtype


class ModelRunner:
    def __init__(self, *, model_config: ModelConfig, quant, build: BuildConfig, act_dtype: str,
                 weights_path, device: torch.device, ctx: ParallelContext,
                 kv_cache_tokens: int | None = None, kv_cache_fraction: float = 0.9, control_group=None,
                 enforce_eager: bool = False):
        """control_group: with several ranks, the gloo group used to agree on the KV size and return
        sampled tokens to rank 0 (runtime/workers.py); None in a single process."""
        self.config = model_config
        self.control_group = control_group
        self.build = build
        self.device = device
        self.ctx = ctx
        self.act_dtype = getattr(torch, act_dtype)
        self.block_size = build.kv_block_size
        # Tiles tuned by `llmx build` for this GPU, in place before the profiling pass and the CUDA-graph
        # capture below launch (and graphs freeze) the first GEMMs; elsewhere the kernels' defaults.
        tuning.load_engine_tiles(build.kernels.get("gemm_tiles"),
                                 torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                 warn=ctx.tp_rank == 0 and ctx.pp_rank == 0)
        cls = model_class(model_config.architecture)
        with torch.device(device):
            self.model = cls(model_config, quant, ctx, build.max_seq_len, device)
        load_rank_weights(self.model, weights_path, device, act_dtype)
        self.model.eval()
        self.kv_dtype = kv_cache_dtype(build, self.act_dtype)
        self.graphs = None  # decode CUDA graphs, captured once the KV cache exists
        self.num_blocks = self._agree(self._size_kv_cache(kv_cache_tokens, kv_cache_fraction))
        self._allocate_kv_cache()
        # Quantized experts run one expert at a time, choosing experts on the host: no graph can hold that.
        capturable = all(getattr(m, "capturable", True) for m in self.model.modules())
        if device.type == "cuda" and ctx.pp_size == 1 and not enforce_eager and capturable:
            self._capture_graphs()
        self.generators: dict[int, torch.Generator] = {}
        self.histories: dict[int, TokenHistory] = {}
        self._seed_rng = torch.Generator().manual_seed(int(time.time_ns() % (1 << 62)))

    # ---- KV cache -------------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        kv_heads = kv_heads_per_rank(self.config.num_kv_heads, self.ctx.tp_size)
        per_layer = 2 * self.block_size * kv_heads * self.config.head_dim * self.kv_dtype.itemsize
        return per_layer * len(self.model.layers)

    def _size_kv_cache(self, kv_cache_tokens: int | None, fraction: float) -> int:
        min_blocks = -(-self.build.max_seq_len // self.block_size)
        if kv_cache_tokens is not None:
            blocks = -(-kv_cache_tokens // self.block_size)
        elif self.device.type == "cuda":
            blocks = self._profile_cuda_blocks(fraction)
        else:
            wanted = self.build.max_batch_size * min_blocks
            blocks = min(wanted, max(1, DEFAULT_CPU_KV_CACHE_BYTES // self.kv_bytes_per_block))
        if blocks < 1:
            raise LlmxError("The KV cache has no room for a single block: give it more memory "
                            "(--kv-cache-fraction on GPU, --kv-cache-tokens on CPU) or use a smaller engine.")
        return blocks

    def _agree(self, blocks: int) -> int:
        """Every rank must use the same number of blocks: the smallest any rank can hold."""
        if self.control_group is None:
            return blocks
        t = torch.tensor([blocks], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())

    def _profile_cuda_blocks(self, fraction: float) -> int:
        """Blocks that fit in `fraction` of the device memory free once the weights are loaded, less the
        activation peak of a full step (max_num_tokens of prefill) measured by running one."""
        torch.cuda.synchronize(self.device)
        free_after_weights, _ = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._dummy_forward()
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - allocated
        budget = free_after_weights * fraction - activation_peak
        return int(budget // self.kv_bytes_per_block)

    def _dummy_forward(self) -> None:
        """The two steps with the largest activations, into a scratch cache, to measure peak memory: a
        prefill of max_num_tokens tokens, and a decode step of max_batch_size sequences, whose logits
        ([max_batch_size, vocab] in float32: 0.5 GB for 1,024 sequences of a 128K vocabulary) the decode
        CUDA graph of that size will hold too."""
        tokens = min(self.build.max_num_tokens, self.build.max_seq_len)
        blocks = -(-tokens // self.block_size)
        self._allocate_kv_cache(blocks)
        self.execute([WorkItem(-1, [0] * tokens, 0, list(range(blocks)), True, _DUMMY_PARAMS)])
        batch = min(self.build.max_batch_size, self.build.max_num_tokens)
        self.execute([WorkItem(-2 - i, [0], 0, [0], True, _DUMMY_PARAMS) for i in range(batch)])
        self._release_kv_cache()

    def _capture_graphs(self) -> None:
        sizes = self.build.cuda_graph_batch_sizes or default_batch_buckets(self.build.max_batch_size)
        max_blocks = -(-self.build.max_seq_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.device, sizes, max_blocks, self.build.max_seq_len)
        self.graphs.capture()

    def _allocate_kv_cache(self, num_blocks: int | None = None) -> None:
        num_blocks = num_blocks or self.num_blocks
        kv_heads = kv_heads_per_rank(self.config.num_kv_heads, self.ctx.tp_size)
        shape = (num_blocks, self.block_size, kv_heads, self.config.head_dim)
        for attn in self.model.attention_layers():
            attn.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    def _release_kv_cache(self) -> None:
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- one step -----------------------------------------------------------------------------------
    def prepare(self, work: list[WorkItem], token_rows: list[int] | None = None) -> StepInputs:
        return self.step_inputs.build(work, token_rows)

    @functools.cached_property
    def step_inputs(self) -> "StepInputsBuilder":
        return StepInputsBuilder(self.block_size, self.device)

    @property
    def global_rank(self) -> int:
        return self.ctx.pp_rank * self.ctx.tp_size + self.ctx.tp_rank

    @torch.inference_mode()
    def forward_hidden(self, inputs: StepInputs) -> torch.Tensor | None:
        """Final hidden states [T, hidden] on the last pipeline stage; None on earlier stages, which
        send their (hidden, residual) to the same TP rank of the next stage."""
        ctx = self.ctx
        intermediate = None
        if not ctx.is_first_stage:
            shape = (inputs.input_ids.shape[0], self.config.hidden_size)
            hidden = torch.empty(shape, dtype=self.act_dtype, device=self.device)
            residual = torch.empty_like(hidden)
            dist.recv(hidden, src=self.global_rank - ctx.tp_size)
            dist.recv(residual, src=self.global_rank - ctx.tp_size)
            intermediate = (hidden, residual)
        out = self.model(inputs.input_ids, inputs.positions, inputs.meta, intermediate)
        if ctx.is_last_stage:
            return out
        for t in out:
            dist.send(t.contiguous(), dst=self.global_rank + ctx.tp_size)
        return None

    def _from_last_stage(self, t: torch.Tensor | None, shape, dtype) -> torch.Tensor | None:
        """Bring a tensor computed on the last stage's first TP rank to rank 0 (pipeline parallel only)."""
        if self.ctx.pp_size == 1:
            return t
        sender = (self.ctx.pp_size - 1) * self.ctx.tp_size
        if self.global_rank == sender:
            dist.send(t.cpu().contiguous(), dst=0, group=self.control_group)
        elif self.global_rank == 0:
            buf = torch.empty(shape, dtype=dtype)
            dist.recv(buf, src=sender, group=self.control_group)
            return buf
        return None

    @property
    def can_launch(self) -> bool:
        """Whether steps can be queued ahead (`launch`): in a single process; ranks run `execute` in lockstep."""
        return self.ctx.tp_size == 1 and self.ctx.pp_size == 1

    @torch.inference_mode()
    def launch(self, work: list[WorkItem], after: PendingTokens | None = None) -> PendingTokens:
        """Queue one step on the device and return its tokens still pending (single process only).

        after: the step launched just before, still pending, whose sampled tokens are this decode step's
        input ids (each WorkItem here continues a sequence that sampled there, with a placeholder token):
        the ids are gathered on the device, so this step can be queued before that one is read back.
        """
        token_rows = None if after is None else [after.rows[w.seq_id] for w in work]
        inputs = self.prepare(work, token_rows)
        if after is not None:
            inputs.input_ids = after.tokens.index_select(0, inputs.token_rows)
        logits = self._logits(inputs)
        if logits is None:
            return PendingTokens(inputs.sampling, None)
        tokens = self._sample(logits, inputs.sampling)
        return PendingTokens(inputs.sampling, tokens, self._logprobs(logits, tokens, inputs.sampling))

    @torch.inference_mode()
    def execute(self, work: list[WorkItem]) -> dict[int, int]:
        """Run one step; on rank 0 returns {seq_id: sampled token} for the items that sample."""
        if self.can_launch:
            return self.launch(work).result()
        inputs = self.prepare(work)
        logits = self._logits(inputs)
        if not inputs.sampling:  # the same on every rank: nothing to bring back
            return {}
        tokens = None
        if logits is not None and self.ctx.tp_rank == 0:
            tokens = self._sample(logits, inputs.sampling).cpu()
        tokens = self._from_last_stage(tokens, (len(inputs.sampling),), torch.int64)
        if self.global_rank != 0:
            return {}
        return {w.seq_id: t for w, t in zip(inputs.sampling, tokens.tolist())}

    def _logits(self, inputs: StepInputs) -> torch.Tensor | None:
        """float32 logits [S, vocab] of the sampling items on the last pipeline stage; None elsewhere or when
        no item samples. Decode steps that fit a captured bucket replay its CUDA graph."""
        meta = inputs.meta
        num_seqs = meta.block_tables.shape[0]
        if self.graphs is not None and self.graphs.fits(num_seqs, meta.max_query_len, meta.block_tables.shape[1]):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, meta)
            # A one-token chunk of a prompt that is not its end samples nothing: keep the sampling rows.
            return logits if len(inputs.sampling) == num_seqs else logits.index_select(0, inputs.logits_rows)
        hidden = self.forward_hidden(inputs)
        if not inputs.sampling or hidden is None:
            return None
        return self.model.compute_logits(hidden[inputs.logits_rows])

    def _sample(self, logits: torch.Tensor, items: list[WorkItem]) -> torch.Tensor:
        params = [w.params for w in items]
        gens = [None if w.params.greedy else self._generator(w) for w in items]
        rows = [i for i, p in enumerate(params) if p.needs_token_history]
        if not rows:
            return sample(logits, params, gens)
        histories = [self._history(items[r], logits.shape[-1], logits.device) for r in rows]
        logits = logits.clone()  # the raw logits stay as they are for log-probabilities
        banned = [r for r, h in zip(rows, histories) if h.num_sampled < params[r].min_tokens]
        ban(logits, banned, [self._stop_ids(params[r]) for r in banned])
        penalized = [j for j, r in enumerate(rows) if params[r].has_penalties]
        if penalized:
            index = to_device([rows[j] for j in penalized], torch.int64, logits.device)
            masks = torch.stack([histories[j].prompt_mask for j in penalized])
            counts = torch.stack([histories[j].counts for j in penalized])
            logits.index_copy_(0, index, penalize(logits.index_select(0, index), masks, counts,
                                                  [params[rows[j]] for j in penalized]))
        tokens = sample(logits, params, gens)
        one = torch.ones(1, dtype=torch.float32, device=logits.device)
        for r, history in zip(rows, histories):
            history.counts.index_add_(0, tokens[r:r + 1], one)
            history.num_sampled += 1
        return tokens

    def _history(self, item: WorkItem, vocab: int, device: torch.device) -> TokenHistory:
        history = self.histories.get(item.seq_id)
        if history is None:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            if item.prompt:
                ids = torch.tensor([t for t in item.prompt if t < vocab], dtype=torch.int64)
                mask[ids.to(device)] = True
            history = self.histories[item.seq_id] = TokenHistory(mask, torch.zeros(vocab, device=device))
        return history

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        """The tokens that would end a request: banned until it has min_tokens."""
        eos = () if params.ignore_eos else self.config.eos_token_ids
        return sorted(set(eos) | set(params.stop_token_ids))

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, items: list[WorkItem]) -> SampledLogprobs | None:
        rows = [i for i, w in enumerate(items) if w.params.logprobs is not None]
        if not rows:
            return None
        index = to_device(rows, torch.int64, logits.device)
        k = max(1, max(items[r].params.logprobs for r in rows))
        return SampledLogprobs(rows, *top_logprobs(logits.index_select(0, index), tokens.index_select(0, index), k))

    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: list[int], block_table: list[int], k: int) -> list[TokenLogprobs | None]:
        """The model's log-probability of every prompt token after the first, with the k likeliest tokens at
        each position: [None, TokenLogprobs(token 1), ...]. The prompt runs in chunks of at most max_num_tokens
        through the KV blocks `block_table` (blocks the caller holds for it, covering len(token_ids) positions),
        and its logits are computed a few hundred rows at a time (a row is vocab floats)."""
        out: list[TokenLogprobs | None] = [None]
        step = self.build.max_num_tokens
        for start in range(0, len(token_ids) - 1, step):
            chunk = token_ids[start:start + step]
            targets = token_ids[start + 1:start + 1 + len(chunk)]  # the next token after each chunk position
            hidden = self.forward_hidden(self.prepare([WorkItem(-1, chunk, start, block_table, False, _DUMMY_PARAMS)]))
            for row in range(0, len(targets), _LOGPROB_ROWS):
                logits = self.model.compute_logits(hidden[row:row + min(_LOGPROB_ROWS, len(targets) - row)])
                ids = torch.tensor(targets[row:row + logits.shape[0]], dtype=torch.int64, device=logits.device)
                chosen, top_ids, top_values = top_logprobs(logits, ids, max(k, 1))
                for token, lp, i, v in zip(ids.tolist(), chosen.tolist(), top_ids.tolist(), top_values.tolist()):
                    out.append(TokenLogprobs(token, lp, list(zip(i[:k], v[:k]))))
        return out[:len(token_ids)]

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor | None:
        """float32 logits [n, vocab] at every position of one sequence (fresh cache); None off rank 0."""
        blocks = list(range(-(-len(token_ids) // self.block_size)))
        inputs = self.prepare([WorkItem(-1, list(token_ids), 0, blocks, False, _DUMMY_PARAMS)])
        hidden = self.forward_hidden(inputs)
        logits = self.model.compute_logits(hidden) if hidden is not None else None
        return self._from_last_stage(logits, (len(token_ids), self.config.vocab_size), torch.float32)

    @staticmethod
    def logprobs_of(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        """Log-probabilities [n-1] of token_ids[1:] from logits [n, vocab] at every position."""
        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
        targets = torch.tensor(token_ids[1:], device=logprobs.device).unsqueeze(1)
        return logprobs.gather(1, targets).squeeze(1)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        return self.logprobs_of(self.prompt_logits(token_ids), token_ids)

    def _generator(self, item: WorkItem) -> torch.Generator:
        gen = self.generators.get(item.seq_id)
        if gen is None:
            seed = item.params.seed
            if seed is None:
                seed = int(torch.randint(0, 1 << 62, (), generator=self._seed_rng))
            gen = self.generators[item.seq_id] = torch.Generator().manual_seed(seed)
        return gen

    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        self.histories.pop(seq_id, None)

