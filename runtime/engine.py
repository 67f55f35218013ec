"""`LLM`: the Python API over an engine directory — add requests, step, generate, stream.

A step is schedule -> run the model -> postprocess (append tokens, detokenize, stop strings, finish).
Requests are batched in flight: new ones join between steps, finished ones leave, long prompts are
prefilled in chunks, and sequences preempted when KV blocks run out are recomputed later.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch

from llmx.common.errors import LlmxError
from llmx.runtime.detokenizer import DetokenizerState, detokenize_step
from llmx.runtime.distributed import ParallelContext
from llmx.runtime.model_runner import ModelRunner, WorkItem
from llmx.runtime.outputs import RequestMetrics, RequestOutput
from llmx.runtime.sequence import FinishReason, SamplingParams, Sequence


def resolve_device(requested: str | None, built_for: str) -> torch.device:
    name = requested or built_for
    if name == "cuda" and not torch.cuda.is_available():
        raise LlmxError("This engine runs on CUDA but no GPU is visible here; run it on the GPU it was built "
                        "for, or rebuild it with `llmx build CKPT --device cpu`.")
    return torch.device(name)


class _Request:
    __slots__ = ("seq", "detok", "metrics", "text", "emitted_tokens")

    def __init__(self, seq: Sequence, metrics: RequestMetrics):
        self.seq = seq
        self.detok = DetokenizerState.for_prompt(seq.prompt_token_ids)
        self.metrics = metrics
        self.text = ""
        self.emitted_tokens = 0


class LLM:
    """Serve an engine directory built by `llmx build`.

    kv_cache_tokens sizes the paged KV cache explicitly (CPU default: max_batch_size x max_seq_len tokens,
    capped at 2 GiB); on GPU the cache takes kv_cache_fraction of the device memory left after weights
    and the activation peak of a full step. enforce_eager skips CUDA-graph capture of decode steps.
    """

    def __init__(self, engine_dir: str | Path, *, device: str | None = None, kv_cache_fraction: float = 0.9,
                 kv_cache_tokens: int | None = None, enforce_eager: bool = False):
        from llmx.build.engine import check_engine_runnable, read_engine
        from llmx.runtime.block_manager import BlockManager
        from llmx.runtime.scheduler import Scheduler

        self.engine = engine = read_engine(Path(engine_dir))
        self.device = resolve_device(device, engine.build.device)
        world = engine.mapping.world_size
        if self.device.type == "cuda" and torch.cuda.device_count() < world:
            raise LlmxError(f"{engine.path} has {world} ranks (tp {engine.mapping.tp} x pp {engine.mapping.pp}) but "
                            f"this machine has {torch.cuda.device_count()} GPU(s); rebuild it with a --tp/--pp "
                            "whose product fits, e.g. `llmx build CKPT --tp 1`.")
        # Under torchrun the launcher fixed the world size; otherwise llmx starts exactly the engine's ranks.
        from llmx.runtime.workers import launched_by_torchrun

        launched = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else world
        check_engine_runnable(engine, device=self.device.type, world_size=launched)
        self.tokenizer = _load_tokenizer(engine.path)
        if world > 1:
            self.runner = _start_ranks(engine, self.device.type, kv_cache_tokens, kv_cache_fraction, enforce_eager)
        else:
            self.runner = ModelRunner(
                model_config=engine.model, quant=engine.quant, build=engine.build, act_dtype=engine.dtype,
                weights_path=engine.path / "rank0.safetensors", device=self.device, ctx=ParallelContext(),
                kv_cache_tokens=kv_cache_tokens, kv_cache_fraction=kv_cache_fraction, enforce_eager=enforce_eager)
        self.max_seq_len = engine.build.max_seq_len
        self.block_manager = BlockManager(self.runner.num_blocks, engine.build.kv_block_size)
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=engine.build.max_batch_size,
            max_num_tokens=engine.build.max_num_tokens, max_model_len=engine.build.max_seq_len,
            block_size=engine.build.kv_block_size, eos_token_ids=self._eos_ids())
        self._ids = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._peak_blocks_used = 0

    # ---- requests ---------------------------------------------------------------------------------------
    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.engine.model.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        if self.tokenizer is None:
            raise LlmxError(f"{self.engine.path} has no tokenizer (built from a bare config.json); "
                            "pass prompts as token ids, or build from a model folder with tokenizer files.")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise LlmxError(f"{self.engine.path}: the tokenizer has no chat template; drop --chat or use an "
                                "instruct model whose tokenizer_config.json defines one.")
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                return_dict=False))
        return self.tokenizer.encode(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *, chat: bool = False) -> int:
        params = params or SamplingParams()
        request_id = next(self._ids)
        now = time.perf_counter()
        seq = Sequence(seq_id=request_id, prompt_token_ids=self.encode(prompt, chat), params=params,
                       arrival_time=now)
        self._requests[request_id] = _Request(seq, RequestMetrics(arrival_time=now))
        self.scheduler.add(seq)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance every running request by one scheduled chunk; returns requests that progressed or ended."""
        out = self.scheduler.schedule()
        outputs = [self._error_output(seq) for seq in out.errored]
        if not out.scheduled:
            return outputs
        now = time.perf_counter()
        for work in out.scheduled:
            req = self._requests[work.seq.seq_id]
            if req.metrics.scheduled_time is None:
                req.metrics.scheduled_time = now
        sampled_ids = self.runner.execute([WorkItem.from_sequence(w.seq, w.num_new_tokens) for w in out.scheduled])
        by_id = {w.seq.seq_id: w.seq for w in out.scheduled}
        sampled = {by_id[i]: token for i, token in sampled_ids.items()}
        self.scheduler.postprocess(out.scheduled, sampled)
        self._peak_blocks_used = max(self._peak_blocks_used, self.block_manager.num_used_blocks)
        now = time.perf_counter()
        for seq in sampled:
            outputs.append(self._progress(self._requests[seq.seq_id], now))
        return outputs

    def _progress(self, req: _Request, now: float) -> RequestOutput:
        seq = req.seq
        new_ids = seq.output_token_ids[req.emitted_tokens:]
        req.emitted_tokens = len(seq.output_token_ids)
        req.metrics.token_times.extend([now] * len(new_ids))
        visible = [t for t in new_ids if not (seq.finish_reason is FinishReason.EOS and t in self.scheduler.eos_token_ids)]
        if visible and self.tokenizer is not None:
            detokenize_step(self.tokenizer, req.detok, visible)
        decoded = req.detok.text
        stops = seq.params.stop
        if stops and not seq.is_finished:
            decoded = self._cut_at_stop_string(req, decoded)
        # While a stop string could still complete, hold back the characters that might begin it, so
        # streamed pieces never include text that a later token turns into a stop.
        hold = 0 if seq.is_finished or not stops else max(len(x) for x in stops) - 1
        visible_len = max(len(req.text), len(decoded) - hold)
        new_text = decoded[len(req.text):visible_len]
        req.text = decoded[:visible_len]
        if seq.is_finished:
            req.metrics.finish_time = now
            self.runner.release(seq.seq_id)
            del self._requests[seq.seq_id]
        return self._output(req, new_ids, new_text)

    def _cut_at_stop_string(self, req: _Request, decoded: str) -> str:
        """Finish the request at the first stop string; returns the text up to (excluding) it."""
        longest = max(len(x) for x in req.seq.params.stop)
        search_from = max(0, len(req.text) - longest)
        hits = [i for x in req.seq.params.stop if (i := decoded.find(x, search_from)) >= 0]
        if not hits:
            return decoded
        self.scheduler.finish(req.seq, FinishReason.STOP)
        return decoded[:min(hits)]

    def _output(self, req: _Request, new_ids: list[int], new_text: str) -> RequestOutput:
        seq = req.seq
        return RequestOutput(
            request_id=seq.seq_id, prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=list(seq.output_token_ids), text=req.text, new_token_ids=new_ids,
            new_text=new_text, finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None, metrics=req.metrics,
            error=seq.error, num_cached_prompt_tokens=seq.num_cached_prompt_tokens)

    def _error_output(self, seq: Sequence) -> RequestOutput:
        req = self._requests.pop(seq.seq_id)
        req.metrics.finish_time = time.perf_counter()
        return self._output(req, [], "")

    # ---- conveniences ---------------------------------------------------------------------------------------
    def _add_all(self, prompts: Seq[str | list[int]], params, chat: bool) -> list[int]:
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise LlmxError(f"got {len(prompts)} prompts but {len(params)} sampling parameter sets.")
        return [self.add_request(p, sp, chat=chat) for p, sp in zip(prompts, params)]

    def stream(self, prompts: Seq[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
               chat: bool = False) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time one of `prompts` gains tokens or finishes."""
        pending = set(self._add_all(prompts, params, chat))
        while pending:
            for output in self.step():
                if output.request_id in pending:
                    if output.finished:
                        pending.discard(output.request_id)
                    yield output

    def generate(self, prompts: Seq[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False) -> list[RequestOutput]:
        """Run `prompts` to completion together; outputs in prompt order."""
        ids = self._add_all(prompts, params, chat)
        final: dict[int, RequestOutput] = {}
        wanted = set(ids)
        while len(final) < len(ids):
            for output in self.step():
                if output.finished and output.request_id in wanted:
                    final[output.request_id] = output
        return [final[i] for i in ids]

    def close(self) -> None:
        """Stop the other ranks of a multi-rank engine (a no-op with one rank)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "kv_cache_blocks": self.runner.num_blocks,
            "kv_block_size": self.runner.block_size,
            "kv_cache_tokens": self.runner.num_blocks * self.runner.block_size,
            "kv_cache_bytes": self.runner.num_blocks * self.runner.kv_bytes_per_block,
            "kv_cache_dtype": str(self.runner.kv_dtype).removeprefix("torch."),
            "kv_blocks_peak_used": self._peak_blocks_used,
            "peak_device_memory_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else None,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.block_manager.prefix_hit_tokens,
        }


def _start_ranks(engine, device: str, kv_cache_tokens, kv_cache_fraction, enforce_eager):
    """Start the other ranks (or join torchrun's) and return rank 0's DistributedRunner."""
    import atexit

    from llmx.runtime.workers import DistributedRunner, RankOptions, free_port, launched_by_torchrun

    if launched_by_torchrun():
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1
    else:
        addr, port = "127.0.0.1", free_port()
    opts = RankOptions(engine_dir=str(engine.path), device=device, kv_cache_tokens=kv_cache_tokens,
                       kv_cache_fraction=kv_cache_fraction, enforce_eager=enforce_eager, master_addr=addr,
                       master_port=port)
    runner = DistributedRunner(engine.mapping, opts)
    atexit.register(runner.close)
    return runner


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _load_tokenizer(path: Path):
    """The engine's HF tokenizer, or None for an engine made from a bare config (--dummy-weights),
    which then takes token-id prompts only."""
    from transformers import AutoTokenizer

    if not any((path / name).exists() for name in TOKENIZER_MARKERS):
        return None

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise LlmxError(f"{path}: could not load the tokenizer ({exc}); the engine directory needs the tokenizer "
                        "files copied from the source model — rebuild it with `llmx build`.") from exc
