"""Multi-rank execution: llmx starts one process per rank itself and drives them from rank 0.

Rank 0 (the caller's process) owns the scheduler. Every step it broadcasts a self-contained plan (the
WorkItems) over a gloo control group; every rank runs its shard of the model on it (NCCL between GPUs,
gloo between CPU processes); the last pipeline stage's first TP rank samples and, when that is not
rank 0, sends the tokens back. Ranks llmx starts meet through a store whose server rank 0 holds: rank 0
waits for each one's ready key while watching its process, so a rank that dies while starting is named at
once. Afterwards runtime/rank_watch.py watches their processes and heartbeats: a rank that dies or stops
responding (LLMX_RANK_STALL_TIMEOUT) ends the job within seconds with its rank named, never a hang; the other
ranks are then stopped.

Ranks are numbered rank = pp_rank * tp + tp_rank. Under `torchrun` (RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set), every process runs the same command: rank 0 drives, the others serve.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from llmx.common import env
from llmx.common.errors import LlmxError
from llmx.formats.config import Mapping
from llmx.formats.engine_dir import read_engine
from llmx.runtime.distributed import ParallelContext, get_parallel_context, set_parallel_context
from llmx.runtime.rank_watch import RankWatch, start_heartbeat

if TYPE_CHECKING:
    from llmx.runtime.model_runner import ModelRunner

# The model runner (safetensors, the models) is imported inside the rank's entry point, not by the launcher.

# NVLink multicast (NVLS) can take a shared host's GPUs out of service: keep it off in every process we start.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class RankOptions:
    """What every rank needs to build its runner; picklable for spawn."""

    engine_dir: str
    device: str
    kv_cache_tokens: int | None
    kv_cache_fraction: float
    enforce_eager: bool
    master_addr: str
    master_port: int
    timeout_s: float = field(default_factory=env.LLMX_COLLECTIVE_TIMEOUT.read)  # read when the options are made
    stall_s: float = field(default_factory=env.LLMX_RANK_STALL_TIMEOUT.read)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    return env.RANK.is_set() and env.WORLD_SIZE.is_set() and env.MASTER_ADDR.is_set()


def init_rank(rank: int, mapping: Mapping, opts: RankOptions, store: dist.Store | None = None) -> dist.ProcessGroup:
    """Join the process group, set this process's ParallelContext; returns the gloo control group.

    store: the rendezvous store of ranks started by llmx (rank 0 holds its server and has seen every rank's
    ready key); None under torchrun, whose rendezvous address is used instead.
    """
    os.environ.update(SAFE_NCCL_ENV)
    world = mapping.world_size
    backend = "nccl" if opts.device == "cuda" else "gloo"
    if opts.device == "cuda":
        local_rank = env.LOCAL_RANK.read()
        torch.cuda.set_device((rank if local_rank is None else local_rank) % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=opts.timeout_s)
    if store is None:
        dist.init_process_group(backend, init_method=f"tcp://{opts.master_addr}:{opts.master_port}",
                                rank=rank, world_size=world, timeout=timeout)
    else:
        if rank != 0:
            store.set(_ready_key(rank), "1")
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    tp_group = None
    for pp_rank in range(mapping.pp):
        ranks = list(range(pp_rank * mapping.tp, (pp_rank + 1) * mapping.tp))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            tp_group = group
    set_parallel_context(ParallelContext(tp_rank=mapping.tp_rank(rank), tp_size=mapping.tp,
                                         pp_rank=mapping.pp_rank(rank), pp_size=mapping.pp, tp_group=tp_group,
                                         ep_size=mapping.ep))
    return control


def build_runner(rank: int, opts: RankOptions, control) -> "ModelRunner":
    from llmx.runtime.model_runner import ModelRunner

    engine = read_engine(Path(opts.engine_dir))
    device = torch.device("cuda", torch.cuda.current_device()) if opts.device == "cuda" else torch.device("cpu")
    runner = ModelRunner(model_config=engine.model, quant=engine.quant, build=engine.build,
                         act_dtype=engine.dtype, weights_path=engine.path / f"rank{rank}.safetensors",
                         device=device, ctx=get_parallel_context(), kv_cache_tokens=opts.kv_cache_tokens,
                         kv_cache_fraction=opts.kv_cache_fraction, control_group=control,
                         enforce_eager=opts.enforce_eager)
    return runner


def _ready_key(rank: int) -> str:
    return f"llmx/ready/{rank}"


def serve(rank: int, mapping: Mapping, opts: RankOptions, store: dist.Store | None = None) -> None:
    """A non-driver rank: build the runner, then execute broadcast commands until told to stop."""
    control = init_rank(rank, mapping, opts, store)
    try:
        runner = build_runner(rank, opts, control)
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            command, payload = box[0]
            if command == "stop":
                break
            if command == "step":
                runner.execute(payload)
            elif command == "logits":
                runner.prompt_logits(payload)
    finally:
        dist.destroy_process_group()


def _spawned_rank(rank: int, mapping: Mapping, opts: RankOptions, beat) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops the ranks
    start_heartbeat(beat)
    try:
        store = dist.TCPStore(opts.master_addr, opts.master_port, mapping.world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=opts.timeout_s))
        serve(rank, mapping, opts, store)
    except Exception as exc:  # the driver reports the failure; keep the worker's own output short
        print(f"llmx rank {rank}: {type(exc).__name__}: {exc}", flush=True)
        raise SystemExit(1)


class DistributedRunner:
    """Rank 0's view of all ranks: the ModelRunner interface, with every call mirrored to the others."""

    def __init__(self, mapping: Mapping, opts: RankOptions):
        self.mapping = mapping
        self.procs = []
        self.watch: RankWatch | None = None
        self._ranks_between_steps = True  # where a broadcast reaches them
        store = None
        if not launched_by_torchrun():
            os.environ.update(SAFE_NCCL_ENV)  # inherited by the spawned ranks
            store = dist.TCPStore(opts.master_addr, opts.master_port, mapping.world_size, is_master=True,
                                  wait_for_workers=False, timeout=datetime.timedelta(seconds=opts.timeout_s))
            ctx = torch.multiprocessing.get_context("spawn")
            beats = []
            for rank in range(1, mapping.world_size):
                beat = ctx.Value("d", time.monotonic(), lock=False)
                proc = ctx.Process(target=_spawned_rank, args=(rank, mapping, opts, beat), daemon=True)
                proc.start()
                self.procs.append(proc)
                beats.append(beat)
            self.watch = RankWatch(self.procs, beats, mapping.world_size, opts.stall_s)
        try:
            if store is not None:
                self._wait_until_ranks_start(store, opts.timeout_s)
            with self._call():
                self.control = init_rank(0, mapping, opts, store)
                self.local = build_runner(0, opts, self.control)
        except RuntimeError:  # a collective of the start that failed because a rank died
            self._check_ranks(" while starting")
            self._terminate()
            raise
        except BaseException:
            self._terminate()
            raise
        self._closed = False

    def _wait_until_ranks_start(self, store: dist.Store, timeout_s: float) -> None:
        """Wait for every started rank's ready key, failing at once if one exits or hangs on the way."""
        keys = [_ready_key(rank) for rank in range(1, self.mapping.world_size)]
        deadline = time.monotonic() + timeout_s
        while not store.check(keys):
            self._check_ranks(" while starting")
            if time.monotonic() > deadline:
                self._terminate()
                raise LlmxError(f"the other ranks did not start within {timeout_s:g} s (LLMX_COLLECTIVE_TIMEOUT); "
                                "the job is stopped.", exit_code=1)
            time.sleep(0.05)

    @contextlib.contextmanager
    def _call(self):
        """Mark a call that waits on the other ranks: the watch ends the process if it never comes back.

        A call left by an exception (Ctrl-C between the broadcast and rank 0's share, a failed collective)
        leaves the other ranks inside the step, where a later broadcast would wait on them forever: close()
        then stops them instead of asking them to stop.
        """
        if self.watch is not None:
            self.watch.call_started()
        try:
            yield
        except BaseException:
            self._ranks_between_steps = False
            raise
        finally:
            if self.watch is not None:
                self.watch.call_ended()

    def __getattr__(self, name):  # num_blocks, block_size, kv_dtype, ... come from rank 0's runner
        return getattr(self.__dict__["local"], name)

    def _check_ranks(self, when: str = "") -> None:
        fault = self.watch.fault if self.watch is not None else None
        if fault is None:
            for rank, proc in enumerate(self.procs, start=1):
                if not proc.is_alive():
                    fault = f"rank {rank} of {self.mapping.world_size} exited with code {proc.exitcode}"
                    break
        if fault is not None:
            self._terminate()
            raise LlmxError(f"{fault}{when}; the job is stopped (see that rank's message above, if any).",
                            exit_code=1)

    def _broadcast(self, command: str, payload) -> None:
        self._check_ranks()
        try:
            dist.broadcast_object_list([(command, payload)], src=0, group=self.control)
        except RuntimeError as exc:
            self._check_ranks()
            self._terminate()
            raise LlmxError(f"lost contact with another rank ({exc}); the job is stopped.", exit_code=1) from exc

    def _guarded(self, fn, *args):
        """Run rank 0's share; a collective that failed because another rank died is reported as that."""
        try:
            return fn(*args)
        except RuntimeError:
            if self.procs and not all(p.is_alive() for p in self.procs):
                self._check_ranks()
            raise

    def execute(self, work):
        with self._call():
            self._broadcast("step", work)
            return self._guarded(self.local.execute, work)

    def prompt_logits(self, token_ids):
        with self._call():
            self._broadcast("logits", list(token_ids))
            return self._guarded(self.local.prompt_logits, token_ids)

    def score(self, token_ids):
        logits = self.prompt_logits(token_ids)
        return self.local.logprobs_of(logits, token_ids)

    def release(self, seq_id: int) -> None:
        self.local.release(seq_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._ranks_between_steps and all(p.is_alive() for p in self.procs):
                dist.broadcast_object_list([("stop", None)], src=0, group=self.control)
            for proc in self.procs:
                proc.join(timeout=30)
        finally:
            self._terminate()
            if dist.is_initialized():
                dist.destroy_process_group()
            set_parallel_context(ParallelContext())

    def _terminate(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
