"""`LLM`: the Python API over an engine directory — add requests, step, generate, stream.

A step is schedule -> run the model -> postprocess (append tokens, stop strings, finish). Output text is
detokenized within the step only for requests with stop strings; for the others when it is first read
(runtime/detokenizer.py), so the host work of a step stays small at large batches.
Requests are batched in flight: new ones join between steps, finished ones leave, long prompts are
prefilled in chunks, and sequences preempted when KV blocks run out are recomputed later.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence as Seq

import torch

from llmx.common import env
from llmx.common.errors import LlmxError
from llmx.formats.config import BuildConfig
from llmx.formats.engine_dir import check_engine_runnable, read_engine
from llmx.runtime.block_manager import BlockManager
from llmx.runtime.chat_template import render_chat_ids
from llmx.runtime.detokenizer import OutputText, decoder_for
from llmx.runtime.distributed import ParallelContext
from llmx.runtime.model_runner import ModelRunner, WorkItem
from llmx.runtime.outputs import RequestMetrics, RequestOutput
from llmx.runtime.scheduler import Scheduler
from llmx.runtime.sequence import FinishReason, SamplingParams, Sequence
from llmx.runtime.workers import DistributedRunner, RankOptions, free_port, launched_by_torchrun


def resolve_device(requested: str | None, built_for: str) -> torch.device:
    name = requested or built_for
    if name == "cuda" and not torch.cuda.is_available():
        raise LlmxError("This engine runs on CUDA but no GPU is visible here; run it on the GPU it was built "
                        "for, or rebuild it with `llmx build CKPT --device cpu`.")
    return torch.device(name)


class _InFlight(NamedTuple):
    """A launched step: what was scheduled, and its tokens (pending until read)."""

    scheduled: list
    pending: object  # PendingTokens, or _Ready


class _Ready(NamedTuple):
    """The tokens of a step run synchronously (`runner.execute`), in PendingTokens' shape."""

    tokens: dict[int, int]

    def result(self) -> dict[int, int]:
        return self.tokens

    def logprobs(self) -> dict:
        return {}  # runners without `launch` (several ranks) return tokens only


class _Request:
    __slots__ = ("seq", "text", "metrics", "emitted_tokens")

    def __init__(self, seq: Sequence, metrics: RequestMetrics, decode):
        self.seq = seq
        self.text = OutputText(decode, seq.prompt_token_ids, seq.output_token_ids, seq.params.stop)
        self.metrics = metrics
        self.emitted_tokens = 0


class LLM:
    """Serve an engine directory built by `llmx build`.

    kv_cache_tokens sizes the paged KV cache explicitly (CPU default: max_batch_size x max_seq_len tokens,
    capped at 2 GiB); on GPU the cache takes kv_cache_fraction of the device memory left after weights
    and the activation peak of a full step. enforce_eager skips CUDA-graph capture of decode steps.
    async_steps (default on) queues each decode step before the previous one's tokens are read back (see
    `step`); off, every step waits for its tokens before the next is scheduled. admission is the scheduler's
    KV admission policy (runtime/scheduler.py): "reserve" (default) or "watermark".
    """

    def __init__(self, engine_dir: str | Path, *, device: str | None = None, kv_cache_fraction: float = 0.9,
                 kv_cache_tokens: int | None = None, enforce_eager: bool = False, async_steps: bool = True,
                 admission: str = "reserve"):
        self.engine = engine = read_engine(Path(engine_dir))
        self.device = resolve_device(device, engine.build.device)
        world = engine.mapping.world_size
        if self.device.type == "cuda" and torch.cuda.device_count() < world:
            raise LlmxError(f"{engine.path} has {world} ranks (tp {engine.mapping.tp} x pp {engine.mapping.pp}) but "
                            f"this machine has {torch.cuda.device_count()} GPU(s); rebuild it with a --tp/--pp "
                            "whose product fits, e.g. `llmx build CKPT --tp 1`.")
        # Under torchrun the launcher fixed the world size; otherwise llmx starts exactly the engine's ranks.
        launched = env.WORLD_SIZE.read() if launched_by_torchrun() else world
        check_engine_runnable(engine, device=self.device.type, world_size=launched)
        tokenizer = _load_tokenizer(engine.path)
        if world > 1:
            runner = _start_ranks(engine, self.device.type, kv_cache_tokens, kv_cache_fraction, enforce_eager)
        else:
            runner = ModelRunner(
                model_config=engine.model, quant=engine.quant, build=engine.build, act_dtype=engine.dtype,
                weights_path=engine.path / "rank0.safetensors", device=self.device, ctx=ParallelContext(),
                kv_cache_tokens=kv_cache_tokens, kv_cache_fraction=kv_cache_fraction, enforce_eager=enforce_eager)
        self._serve(runner, engine.build, tokenizer, engine.model.eos_token_ids, str(engine.path), async_steps,
                    admission)

    @classmethod
    def over_runner(cls, runner, build: BuildConfig, *, tokenizer=None, eos_token_ids: Seq[int] = (),
                    async_steps: bool = True) -> "LLM":
        """An LLM over a runner made elsewhere, without an engine directory: anything with ModelRunner's
        `execute(work) -> {seq_id: token}`, `release(seq_id)`, `num_blocks` and `block_size` (and, to queue
        steps ahead, ModelRunner's `can_launch` and `launch`). It measures and
        tests the host side of steps with a stand-in model (measurements/host_overhead.py); `engine` is None,
        so what reads the engine's description (bench's runner, stats) does not apply."""
        llm = cls.__new__(cls)
        llm.engine = None
        llm.device = torch.device("cpu")
        llm._serve(runner, build, tokenizer, tuple(eos_token_ids), "LLM.over_runner", async_steps)
        return llm

    def _serve(self, runner, build: BuildConfig, tokenizer, eos_token_ids: Seq[int], name: str,
               async_steps: bool = True, admission: str = "reserve") -> None:
        """Set up the request bookkeeping over `runner`: the block manager, the scheduler, the detokenizer."""
        self.runner = runner
        self.tokenizer = tokenizer
        self._name = name
        self._decode = decoder_for(tokenizer) if tokenizer is not None else None
        eos = set(eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.max_seq_len = build.max_seq_len
        self.block_manager = BlockManager(runner.num_blocks, build.kv_block_size)
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=build.max_batch_size, max_num_tokens=build.max_num_tokens,
            max_model_len=build.max_seq_len, block_size=build.kv_block_size, eos_token_ids=tuple(sorted(eos)),
            admission=admission)
        self._ids = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._peak_blocks_used = 0
        self._launchable = getattr(runner, "can_launch", False)
        self._can_launch = async_steps and self._launchable
        self._inflight: _InFlight | None = None  # a launched step whose tokens are not applied yet

    # ---- requests ---------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        if self.tokenizer is None:
            raise LlmxError(f"{self._name} has no tokenizer (built from a bare config.json); "
                            "pass prompts as token ids, or build from a model folder with tokenizer files.")
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation ({"role", "content"} turns) through the tokenizer's chat template, ending
        with the prompt for the assistant's next turn."""
        if self.tokenizer is None:
            raise LlmxError(f"{self._name} has no tokenizer (built from a bare config.json); "
                            "chat needs one: build from a model folder with tokenizer files.")
        if not getattr(self.tokenizer, "chat_template", None):
            raise LlmxError(f"{self._name}: the tokenizer has no chat template; drop --chat or use an "
                            "instruct model whose tokenizer_config.json defines one.")
        # 32 characters a token: more text than that cannot fit the context, whatever the tokenizer
        return render_chat_ids(self.tokenizer, messages, self._name, max_chars=32 * self.max_seq_len)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *, chat: bool = False) -> int:
        """Queue a request; its outputs come from `step`. Prompt log-probabilities (params.prompt_logprobs) are
        computed here, before the request joins the batch."""
        params = params or SamplingParams()
        if (params.logprobs is not None or params.prompt_logprobs is not None) and not self._launchable:
            raise LlmxError(f"{self._name}: log-probabilities need an engine that runs in one process (one rank); "
                            "drop logprobs, or rebuild the engine with --tp 1 --pp 1.")
        request_id = next(self._ids)
        now = time.perf_counter()
        seq = Sequence(seq_id=request_id, prompt_token_ids=self.encode(prompt, chat), params=params,
                       arrival_time=now)
        if params.logprobs is not None:
            seq.output_logprobs = []
        if params.prompt_logprobs is not None and seq.num_prompt_tokens <= self.max_seq_len:
            seq.prompt_logprobs = self._score_prompt(seq.prompt_token_ids, params.prompt_logprobs)
        self._requests[request_id] = _Request(seq, RequestMetrics(arrival_time=now), self._decode)
        self.scheduler.add(seq)
        return request_id

    def _score_prompt(self, token_ids: list[int], k: int) -> list:
        """Prompt log-probabilities from a pass of the prompt through KV blocks borrowed from the free pool (and
        given back), so the cache of running requests is untouched; the step queued ahead, if any, holds its
        blocks already."""
        scratch = Sequence(seq_id=-1, prompt_token_ids=token_ids, params=SamplingParams())
        if not self.block_manager.allocate_for(scratch, len(token_ids)):
            raise LlmxError(f"the KV cache has no room now for the {len(token_ids)} tokens whose log-probabilities "
                            "were asked for; retry when fewer requests run.")
        try:
            return self.runner.prompt_logprobs(token_ids, scratch.block_table, k)
        finally:
            self.block_manager.free(scratch)

    def abort(self, request_id: int) -> bool:
        """Give up a request (e.g. its client went away): it leaves the batch and its KV blocks are freed at
        once. A step already queued on the device may still write into them; that write lands before any later
        step that reuses them. Returns False if the request had already finished."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req.seq, FinishReason.ABORT)
        self.runner.release(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        """Requests added and not yet finished or aborted."""
        return len(self._requests)

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance every running request by one scheduled chunk; returns requests that progressed or ended.

        With a runner that can queue steps (`launch`), the step after this one is queued on the device
        before this one's tokens are read back (Scheduler.schedule_ahead), so the host's bookkeeping of
        step N (postprocess, detokenization, the caller's own work) overlaps the device running step N+1
        instead of leaving it idle.
        """
        outputs: list[RequestOutput] = []
        if self._inflight is None:
            out = self.scheduler.schedule()
            outputs = [self._error_output(seq) for seq in out.errored]
            if not out.scheduled:
                return outputs
            now = time.perf_counter()
            for seq in out.admitted:  # first scheduled now (or resumed after a preemption)
                metrics = self._requests[seq.seq_id].metrics
                if metrics.scheduled_time is None:
                    metrics.scheduled_time = now
            self._inflight = self._launch(out.scheduled, None)
        current = self._inflight
        self._inflight = self._launch_next(current)
        outputs.extend(self._finish_step(current))
        return outputs

    def _launch(self, scheduled, after) -> "_InFlight":
        work = [WorkItem.from_sequence(seq, n) if after is None else
                WorkItem(seq.seq_id, [0], start, seq.block_table, True, seq.params)
                for seq, n, start, _ in scheduled]
        if self._launchable:
            return _InFlight(scheduled, self.runner.launch(work, None if after is None else after.pending))
        return _InFlight(scheduled, _Ready(self.runner.execute(work)))

    def _launch_next(self, current: "_InFlight") -> "_InFlight | None":
        if not self._can_launch:
            return None
        ahead = self.scheduler.schedule_ahead(current.scheduled)
        return None if ahead is None else self._launch(ahead.scheduled, current)

    def _finish_step(self, step: "_InFlight") -> list[RequestOutput]:
        """Read a launched step's tokens back and apply them; outputs of the requests that progressed."""
        sampled_ids = step.pending.result()
        live = {item[0].seq_id: item[0] for item in step.scheduled if not item[0].is_finished}
        # A sequence that finished while this step ran ahead (EOS or a stop in the step before) gets nothing.
        sampled = {live[i]: token for i, token in sampled_ids.items() if i in live}
        for seq_id, logprobs in step.pending.logprobs().items():
            if seq_id in live:
                live[seq_id].output_logprobs.append(logprobs)
        self.scheduler.postprocess(step.scheduled, sampled)
        self._peak_blocks_used = max(self._peak_blocks_used, self.block_manager.num_used_blocks)
        now = time.perf_counter()
        requests = self._requests
        return [self._progress(requests[seq.seq_id], now) for seq in sampled]

    def _progress(self, req: _Request, now: float) -> RequestOutput:
        """The output of a request that just got its sampled token (one per step), after its stop strings."""
        seq = req.seq
        tokens = seq.output_token_ids
        num_tokens = len(tokens)
        new_ids = tokens[req.emitted_tokens:]
        req.emitted_tokens = num_tokens
        req.metrics.token_times.extend([now] * len(new_ids))
        finished = seq.is_finished
        if finished and new_ids and seq.finish_reason is FinishReason.EOS \
                and tokens[-1] in self.scheduler.eos_token_ids:
            req.text.hide(num_tokens - 1)  # the EOS token that ended the request is not text
        # A stop string must be seen the step it appears, so these requests are detokenized now; streamed
        # pieces then leave out the characters that a later token could still turn into a stop string. Before
        # min_tokens no stop string ends the request, as no stop token or EOS does.
        if req.text.stops and new_ids and req.text.check_stops(num_tokens, finished,
                                                               search=num_tokens >= seq.params.min_tokens):
            self.scheduler.finish(seq, FinishReason.STOP)
            finished = True
        if finished:
            req.metrics.finish_time = now
            self.runner.release(seq.seq_id)
            del self._requests[seq.seq_id]
        return RequestOutput(seq, req.metrics, new_ids, finished, req.text)

    def _error_output(self, seq: Sequence) -> RequestOutput:
        req = self._requests.pop(seq.seq_id)
        req.metrics.finish_time = time.perf_counter()
        return RequestOutput(seq, req.metrics, [], True, req.text)

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

    if launched_by_torchrun():
        addr, port = env.MASTER_ADDR.read(), env.MASTER_PORT.read() + 1
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
    except Exception as exc:  # damaged files surface as any exception type (KeyError for a tokenizer.json that
        # parses but lacks a section, the tokenizers library's own Exception for bad contents, OSError, ValueError)
        detail = str(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
        files = ", ".join(str(path / name) for name in TOKENIZER_MARKERS if (path / name).exists())
        raise LlmxError(f"could not load the tokenizer from {files} ({detail}); the engine directory needs the "
                        "tokenizer files copied from the source model — rebuild it with `llmx build`.") from exc
