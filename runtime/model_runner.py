"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

One instance per rank. It owns the model, the KV cache and the per-request random generators.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmx.common.errors import LlmxError
from llmx.runtime.config import BuildConfig, ModelConfig
from llmx.runtime.distributed import ParallelContext
from llmx.runtime.layers.attention import AttentionMetadata
from llmx.runtime.layers.sampler import sample
from llmx.runtime.loader import load_rank_weights
from llmx.runtime.models import model_class
from llmx.build.shard import kv_heads_per_rank
from llmx.runtime.sequence import SamplingParams, Sequence

KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30  # CPU engines: KV budget when the user names none
_DUMMY_PARAMS = SamplingParams(max_new_tokens=1)  # for profiling and scoring passes, which never sample


@dataclass(frozen=True)
class WorkItem:
    """One sequence's share of a step, self-contained so it can be broadcast to other ranks.

    tokens: the ids at positions [start, start + len(tokens)); block_table: the sequence's KV blocks;
    sample: whether this chunk reaches the end of the known tokens (then a token is sampled).
    """

    seq_id: int
    tokens: list[int]
    start: int
    block_table: list[int]
    sample: bool
    params: SamplingParams

    @classmethod
    def from_sequence(cls, seq: Sequence, num_new_tokens: int) -> "WorkItem":
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        return cls(seq.seq_id, seq.token_ids[start:end], start, list(seq.block_table),
                   end == seq.num_tokens, seq.params)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [S] int64: packed row of the last token of each sampling sequence
    sampling: list[WorkItem]


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
        cls = model_class(model_config.architecture)
        with torch.device(device):
            self.model = cls(model_config, quant, ctx, build.max_seq_len, device)
        load_rank_weights(self.model, weights_path, device, act_dtype)
        self.model.eval()
        self.kv_dtype = kv_cache_dtype(build, self.act_dtype)
        self.graphs = None  # decode CUDA graphs, captured once the KV cache exists
        self.num_blocks = self._agree(self._size_kv_cache(kv_cache_tokens, kv_cache_fraction))
        self._allocate_kv_cache()
        if device.type == "cuda" and ctx.pp_size == 1 and not enforce_eager:
            self._capture_graphs()
        self.generators: dict[int, torch.Generator] = {}
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
        """One prefill of max_num_tokens tokens into a 1-block scratch cache, to measure peak memory."""
        tokens = min(self.build.max_num_tokens, self.build.max_seq_len)
        blocks = -(-tokens // self.block_size)
        self._allocate_kv_cache(blocks)
        self.execute([WorkItem(-1, [0] * tokens, 0, list(range(blocks)), True, _DUMMY_PARAMS)])
        self._release_kv_cache()

    def _capture_graphs(self) -> None:
        from llmx.runtime.cuda_graph import DecodeGraphs, default_batch_buckets

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
    def prepare(self, work: list[WorkItem]) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        logits_rows: list[int] = []
        sampling: list[WorkItem] = []
        bs = self.block_size
        for w in work:
            end = w.start + len(w.tokens)
            ids.extend(w.tokens)
            positions.extend(range(w.start, end))
            table = w.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(w.start, end))
            seq_lens.append(end)
            starts.append(starts[-1] + len(w.tokens))
            if w.sample:
                logits_rows.append(starts[-1] - 1)
                sampling.append(w)
        max_blocks = max(len(w.block_table) for w in work)
        tables = [w.block_table + [0] * (max_blocks - len(w.block_table)) for w in work]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            max_query_len=max(len(w.tokens) for w in work),
            max_seq_len=max(seq_lens),
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
            sampling=sampling,
        )

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

    @torch.inference_mode()
    def execute(self, work: list[WorkItem]) -> dict[int, int]:
        """Run one step; on rank 0 returns {seq_id: sampled token} for the items that sample."""
        inputs = self.prepare(work)
        meta = inputs.meta
        if self.graphs is not None and self.graphs.fits(len(work), meta.max_query_len, meta.block_tables.shape[1]):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, meta)
        else:
            hidden = self.forward_hidden(inputs)
            if not inputs.sampling:
                return {}
            logits = self.model.compute_logits(hidden[inputs.logits_rows]) if hidden is not None else None
        tokens = None
        if logits is not None:
            if self.ctx.tp_rank == 0:
                params = [w.params for w in inputs.sampling]
                gens = [None if w.params.greedy else self._generator(w) for w in inputs.sampling]
                tokens = torch.tensor(sample(logits, params, gens), dtype=torch.int64)
        tokens = self._from_last_stage(tokens, (len(inputs.sampling),), torch.int64)
        if self.global_rank != 0:
            return {}
        return {w.seq_id: t for w, t in zip(inputs.sampling, tokens.tolist())}

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

