"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed instead of launching the
model's hundreds of kernels from Python each step.

A decode step (every sequence adds one token) has fixed shapes once the batch is padded to a bucket,
so the whole forward plus LM head is captured once per bucket into static buffers. Padding rows write
no KV (slot -1) and attend to one cached token of block 0, which is harmless and never read back.
Prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import torch

from llmx.runtime.layers.attention import AttentionMetadata


def default_batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 16 up to max_batch_size (vLLM-like spacing: little padding waste)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if max_batch_size not in sizes:
        sizes.append(max_batch_size)
    return tuple(sizes)


class DecodeGraphs:
    def __init__(self, model, device: torch.device, batch_sizes: tuple[int, ...], max_blocks_per_seq: int,
                 max_seq_len: int):
        self.model = model
        self.device = device
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_bs = self.batch_sizes[-1]
        self.max_blocks = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Every bucket writes its logits into the head of one float32 [max_bs, vocab] buffer. A graph's own
        # output would stay allocated in the pool for as long as the graph lives: at 128K vocabulary the
        # buckets up to 1,024 sequences would hold 17 GB of logits, the buckets up to 512 4.3 GB.
        self.logits_buffer = torch.empty((n, model.config.vocab_size), dtype=torch.float32, device=device)
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
                                 seq_lens=self.seq_lens[:bs], query_start_loc=self.query_start_loc[:bs + 1],
                                 max_query_len=1, max_seq_len=self.max_seq_len)

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs))
        return self.model.compute_logits(hidden, self.logits_buffer[:bs])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        for bs in reversed(self.batch_sizes):
            self._forward(bs)  # warm-up: Triton compilation and autotuning happen outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)

    def fits(self, num_seqs: int, max_query_len: int, max_blocks: int) -> bool:
        return max_query_len == 1 and num_seqs <= self.max_bs and max_blocks <= self.max_blocks

    @torch.inference_mode()
    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the smallest bucket that holds the batch; logits [num_seqs, vocab] float32."""
        n = input_ids.shape[0]
        bs = next(b for b in self.batch_sizes if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        blocks = meta.block_tables.shape[1]
        self.block_tables[:n, :blocks].copy_(meta.block_tables)
        self.block_tables[n:bs].zero_()
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:bs].fill_(1)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
