"""Tensor parallelism's processes.

Rank 0 is the engine's own process: the scheduler, KV manager, sampler and every other piece of host logic stay
there. Its runner (`TensorParallelRunner`) sends each call the engine makes to ranks 1..N-1 over a pipe before
running it itself; those ranks are processes it starts (spawn), each with its shard of the model, its own
ModelRunner and a KV cache of the same number of blocks, serving the calls in order (`RankWorker`). So every rank
runs the same forward passes in the same order and their collectives pair up. Only rank 0 samples: its tokens
reach the other devices at the next step's start (`ModelRunner._pending_tokens`).

Ranks start, fail and stop together. A rank that raises reports its traceback and exits; one that dies is seen by
its process sentinel; a collective that waits past COLLECTIVE_TIMEOUT_S raises. On CUDA a watcher thread aborts
the device group when a rank dies, since NCCL's watchdog does not see collectives replayed from CUDA graphs and
rank 0 would wait on them forever; the aborted kernels return garbage, so the engine checks the ranks once it has
waited for a step's tokens (`check_healthy`) and never takes them from a step a rank died in. Whatever failed,
rank 0 stops every rank and the call raises RanksStopped naming the rank. A step half-run across ranks can't be
retried request by request (the peers would wait in an all-reduce), so the engine restarts the ranks instead
(`TensorParallelRunner.restart`: new processes, each loading its shard, the same KV cache and decode graphs) and
recomputes its requests; a restart that fails, or failures that outlast a few restarts, end in EngineBroken.

Leaving an NCCL group has two rules (a process that breaks them hangs in C, deaf to signals): NCCL frees a
communicator, destroyed or aborted, only once every CUDA graph that captured its collectives is gone, so each rank
drops its decode graphs first; and destroying one is collective, so on close rank 0 destroys its side while the
other ranks destroy theirs, not after waiting for them to exit.
"""
import contextlib
import gc
import multiprocessing
import shutil
import signal
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
import torch.distributed

from batchgen.config import EngineConfig
from batchgen.distributed import close_tensor_parallel, disable_multicast, init_tensor_parallel
from batchgen.engine.errors import EngineBroken
from batchgen.engine.model_runner import (MemoryProfile, ModelRunner, PendingTokens, StepArrays, StepInputs,
                                           use_expandable_segments)
from batchgen.engine.prompt_logprobs import PromptPositions
from batchgen.models.loader import load_model

COLLECTIVE_TIMEOUT_S = 300.0   # a collective (or the group's start) that waits longer raises
FAILURE_REPORT_S = 2.0         # how long rank 0 waits for a failed rank's own report before naming what it saw
STOP_TIMEOUT_S = 10.0          # a rank asked to exit that has not after this is killed
JOIN_POLL_S = 0.1


def rank_device(device_type: str, rank: int) -> torch.device:
    """Rank r computes on cuda:r of the visible devices; on CPU every rank uses the host."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


class RankFailure(RuntimeError):
    """What went wrong on a rank other than 0, in words that name it."""


class RankClosed(Exception):
    """Rank 0 closed the engine: the rank's process ends."""


class RanksStopped(EngineBroken):
    """A call every rank makes failed on some rank, and every rank was stopped: the engine can still restart
    them (`TensorParallelRunner.restart`)."""


@dataclass
class RankProcess:
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: Connection


class Ranks:
    """Rank 0's handle on ranks 1..N-1: starts them and joins their device group (before rank 0 loads its
    shard), sends them calls and takes their answers, tells what failed, stops them and starts them again."""

    def __init__(self, config: EngineConfig, model_path: Path, dtype: torch.dtype):
        size = config.tensor_parallel_size
        device_type = config.resolved_device().type
        if device_type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs; {torch.cuda.device_count()} are visible")
        disable_multicast()   # before the spawns: the ranks inherit the environment
        self.config = config
        self.model_path = model_path
        self.dtype = dtype
        self.device_type = device_type
        self.ranks: list[RankProcess] = []
        # rank 0's CUDA graphs that replay the group's collectives, dropped before it leaves the group (above)
        self.release_graphs: Callable[[], None] = lambda: None
        self.start()

    def start(self) -> None:
        """Spawn ranks 1..N-1 and join their group as rank 0; each then loads its shard and answers when it has.
        Also how stopped ranks start again: rank 0 keeps its model, whose collectives use the group of the
        moment."""
        self.failure: str | None = None
        self.stopped = False
        self._stop_watching: Connection | None = None
        self._rendezvous_dir = tempfile.mkdtemp(prefix="batchgen-tp-")
        init_method = f"file://{self._rendezvous_dir}/store"
        context = multiprocessing.get_context("spawn")
        size = self.config.tensor_parallel_size
        self.ranks = []
        for rank in range(1, size):
            ours, theirs = context.Pipe()
            process = context.Process(target=run_rank, name=f"batchgen-tp-rank-{rank}", daemon=True,
                                      args=(rank, self.config, self.model_path, self.dtype, init_method,
                                            COLLECTIVE_TIMEOUT_S, theirs))
            process.start()
            theirs.close()
            self.ranks.append(RankProcess(rank, process, ours))
        try:
            self._join_group(size, init_method, rank_device(self.device_type, 0))
        except BaseException as exc:   # the others wait for a group that won't form: stop them now
            self.failure = str(exc) or type(exc).__name__
            self.stop()
            raise
        if self.device_type == "cuda":
            stop_signal, self._stop_watching = multiprocessing.Pipe(duplex=False)
            threading.Thread(target=self._watch, args=(stop_signal,), name="batchgen-tp-watch", daemon=True).start()

    def _join_group(self, size: int, init_method: str, device: torch.device) -> None:
        """init_tensor_parallel as rank 0, given up as soon as another rank dies (it would wait for the
        timeout: the group forms only when every rank has joined)."""
        joined = threading.Event()
        errors: list[BaseException] = []

        def join() -> None:
            try:
                init_tensor_parallel(0, size, init_method, device, COLLECTIVE_TIMEOUT_S)
            except BaseException as exc:
                errors.append(exc)
            finally:
                joined.set()

        threading.Thread(target=join, name="batchgen-tp-join", daemon=True).start()
        while not joined.wait(JOIN_POLL_S):
            self.check_alive()
        if errors:   # a rank that failed while the group formed (its peers' sockets closed) says why itself
            raise self._failed_rank(FAILURE_REPORT_S) or errors[0]

    def _watch(self, stop_signal: Connection) -> None:
        """CUDA: abort the device group once a rank dies, so rank 0's kernels stop waiting on its collectives;
        the next call then reports the rank."""
        ready = wait([stop_signal] + [r.process.sentinel for r in self.ranks])
        if stop_signal not in ready and not self.stopped:
            _abort_device_group()

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Rank 0's side of a call every rank makes: a failure anywhere stops every rank and raises RanksStopped
        (then and for every later call until they start again)."""
        if self.failure is not None:
            raise RanksStopped(self.failure)
        try:
            self.check_alive()
            yield
        except EngineBroken:
            raise
        except Exception as exc:
            cause = exc if isinstance(exc, RankFailure) else self._failed_rank(FAILURE_REPORT_S)
            self.failure = str(cause) if cause is not None else \
                f"tensor-parallel rank 0 raised {type(exc).__name__}: {exc}"
            self.failure += " (every rank was stopped)"
            self.stop()
            raise RanksStopped(self.failure) from exc

    def send(self, name: str, *args) -> None:
        """Queue `name(*args)` on every other rank; they run it as soon as they read it."""
        for r in self.ranks:
            r.conn.send((name, args))

    def answers(self) -> list:
        """Each other rank's result of the call sent last, waiting for the slowest; raises RankFailure for a rank
        that raised or died instead."""
        results = []
        for r in self.ranks:
            wait([r.conn, r.process.sentinel])
            try:
                kind, payload = r.conn.recv()
            except (EOFError, OSError):
                raise self._failed_rank(FAILURE_REPORT_S) or RankFailure(f"tensor-parallel rank {r.rank} hung up")
            if kind == "error":
                raise _raised(r, payload)
            results.append(payload)
        return results

    def check_alive(self) -> None:
        """Raise RankFailure if a rank has exited (reading no answer from the pipes: a call may await one)."""
        if any(r.process.exitcode is not None for r in self.ranks):
            raise self._failed_rank(FAILURE_REPORT_S)

    def _failed_rank(self, timeout_s: float) -> RankFailure | None:
        """The first rank that reported an error or is dead, waiting up to `timeout_s` for one; else None."""
        wait([r.conn for r in self.ranks] + [r.process.sentinel for r in self.ranks], timeout_s)
        for r in self.ranks:
            if r.conn.poll():
                try:
                    kind, payload = r.conn.recv()
                    if kind == "error":
                        return _raised(r, payload)
                except (EOFError, OSError):   # it is gone: its exit code says how
                    r.process.join(timeout_s)
            code = r.process.exitcode
            if code is not None:
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                return RankFailure(f"tensor-parallel rank {r.rank} (pid {r.process.pid}) {how}")
        return None

    def stop(self) -> None:
        """Leave the group with every other rank and let them exit (after a failure: kill them, they may be
        waiting in a collective, and abort the group), kill the ones that don't exit. Safe to call again."""
        if self.stopped:
            return
        self.stopped = True
        if self._stop_watching is not None:
            self._stop_watching.send(None)
        self.release_graphs()
        for r in self.ranks:
            if self.failure is not None:
                r.process.kill()
            with contextlib.suppress(OSError, ValueError):
                r.conn.send(("close", ()))
        if self.failure is not None and self.device_type == "cuda":
            _abort_device_group()   # a graceful destroy would wait on collectives a dead rank never joins
        close_tensor_parallel()   # gracefully: while the others destroy their side (it is collective)
        for r in self.ranks:
            r.process.join(STOP_TIMEOUT_S)
            if r.process.is_alive():
                r.process.kill()
                r.process.join()
            r.conn.close()
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)


def _raised(r: RankProcess, report: str) -> RankFailure:
    return RankFailure(f"tensor-parallel rank {r.rank} raised {report}")


def _abort_device_group() -> None:
    """NCCL: abort the group's communicators, so kernels waiting in a collective return (the group stays known,
    for close_tensor_parallel to destroy)."""
    if torch.distributed.is_initialized():
        torch.distributed.group.WORLD.abort()


class TensorParallelRunner(ModelRunner):
    """Rank 0's ModelRunner: each call goes to the other ranks first, then runs here, so all ranks run it at
    once; calls with a result wait for every rank's."""

    def __init__(self, ranks: Ranks, *runner_args, **runner_kwargs):
        super().__init__(*runner_args, **runner_kwargs)
        self.ranks = ranks
        ranks.release_graphs = lambda: release_decode_graphs(self)
        self.decode_graph_shape: tuple[int, int] | None = None   # (max_batch, max_model_len) they were captured for
        with ranks.together():
            ranks.answers()   # every rank has loaded its shard

    def _everywhere(self, name: str, *args):
        """`name(*args)` on every rank's runner; rank 0's result."""
        with self.ranks.together():
            self.ranks.send(name, *args)
            result = getattr(ModelRunner, name)(self, *args)
            self.ranks.answers()
        return result

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._everywhere("allocate_kv_cache", num_blocks)

    def release_kv_cache(self) -> None:
        self._everywhere("release_kv_cache")

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        self._everywhere("capture_decode_graphs", max_batch, max_model_len)
        self.decode_graph_shape = (max_batch, max_model_len)

    def restart(self) -> None:
        """After a failure stopped the ranks: start ranks 1..N-1 again (new processes, each loading its shard and
        allocating a KV cache of as many blocks as rank 0's) and capture the decode graphs again if they were, on
        every rank (they replay the old group's collectives). Rank 0 keeps its model and cache; what the caches
        held is the engine's to recompute. Raises RanksStopped or RankFailure if the ranks can't start."""
        self.ranks.start()
        with self.ranks.together():
            self.ranks.answers()   # loaded
            self.ranks.send("allocate_kv_cache", self.kv_cache.shape[2])
            self.ranks.answers()
        if self.decode_graph_shape is not None:
            self.capture_decode_graphs(*self.decode_graph_shape)

    def measure_decode_graph_bytes(self, max_batch: int, max_model_len: int) -> int:
        return self._everywhere("measure_decode_graph_bytes", max_batch, max_model_len)

    def measure_peak_bytes(self, run: Callable[[], None]) -> int:
        """Each rank measures its own peak over the steps `run` makes (the others keep theirs for sizing)."""
        with self.ranks.together():
            self.ranks.send("measure_peak_bytes")
            peak = super().measure_peak_bytes(run)
            self.ranks.send("end_measure")
            self.ranks.answers()
        return peak

    def kv_blocks_that_fit(self, gpu_memory_utilization: float, profile: MemoryProfile) -> int:
        """The fewest blocks any rank has room for, each by its own free memory, step peak and graph pool."""
        with self.ranks.together():
            self.ranks.send("kv_blocks_that_fit", gpu_memory_utilization)
            blocks = super().kv_blocks_that_fit(gpu_memory_utilization, profile)
            return min(blocks, *self.ranks.answers())

    def execute(self, inputs: StepInputs, pending: PendingTokens | None = None) -> torch.Tensor:
        """The step on every rank; nothing waits for the others (a failed rank shows in a collective, or at the
        next call)."""
        prompt_rows = PromptPositions(inputs.prompt_positions.flat_rows, inputs.prompt_positions.target_ids)
        with self.ranks.together():
            self.ranks.send("execute", inputs.host, prompt_rows)
            logits = super().execute(inputs, pending)
            if prompt_rows:   # their logprobs were waited for: see check_healthy
                self.ranks.check_alive()
            return logits

    def check_healthy(self) -> None:
        """Every rank is alive (so no collective was aborted) and none has failed."""
        with self.ranks.together():
            pass

    def close(self) -> None:
        self.ranks.stop()


def release_decode_graphs(runner: ModelRunner) -> None:
    """Free the runner's decode graphs now (a graph's collectives keep its NCCL communicator from being freed)."""
    runner.decode_graphs = None
    gc.unfreeze()   # a run freezes the heap it found (batchgen.llm), graphs included: the collection must reach them
    gc.collect()


class RankWorker:
    """A rank other than 0: runs rank 0's runner calls on its own runner, in the order they come."""

    def __init__(self, runner: ModelRunner, conn: Connection):
        self.runner = runner
        self.conn = conn
        self.profile = MemoryProfile(step_peak_bytes=0, graph_pool_bytes=0)

    def serve(self, until: str | None = None) -> None:
        """Run calls until `until` comes; each answered with its result, except steps (rank 0 goes on)."""
        while True:
            name, args = self.conn.recv()
            if name == until:
                return
            if name == "close":
                raise RankClosed()
            handler = getattr(self, name, None) or getattr(self.runner, name)
            result = handler(*args)
            if name != "execute":
                self.conn.send(("ok", result))

    def execute(self, host: StepArrays, prompt_positions: PromptPositions) -> None:
        with torch.inference_mode():
            self.runner.execute(self.runner.upload(host, prompt_positions))

    def measure_peak_bytes(self) -> int:
        step_peak = self.runner.measure_peak_bytes(lambda: self.serve(until="end_measure"))
        self.profile = MemoryProfile(step_peak, self.profile.graph_pool_bytes)
        return step_peak

    def measure_decode_graph_bytes(self, max_batch: int, max_model_len: int) -> int:
        graph_pool = self.runner.measure_decode_graph_bytes(max_batch, max_model_len)
        self.profile = MemoryProfile(self.profile.step_peak_bytes, graph_pool)
        return graph_pool

    def kv_blocks_that_fit(self, gpu_memory_utilization: float) -> int:
        return self.runner.kv_blocks_that_fit(gpu_memory_utilization, self.profile)


def run_rank(rank: int, config: EngineConfig, model_path: Path, dtype: torch.dtype, init_method: str,
             timeout_s: float, conn: Connection) -> None:
    """A rank's process: join the group, load this rank's shard, serve rank 0's calls until it says close. On
    an error, report it to rank 0 and exit (peers in a collective with it then fail instead of waiting)."""
    disable_multicast()
    try:
        device = rank_device(config.resolved_device().type, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            use_expandable_segments()
        init_tensor_parallel(rank, config.tensor_parallel_size, init_method, device, timeout_s)
        model, model_config = load_model(model_path, dtype, device, config.load_format, config.allow_pickle_weights,
                                         config.quantization)
        runner = ModelRunner(model, model_config, config.block_size, device, dtype,
                             config.resolved_max_num_seqs(device),
                             kv_cache_dtype=config.resolved_kv_cache_dtype(dtype))
        conn.send(("ok", None))
        RankWorker(runner, conn).serve()
    except RankClosed:
        release_decode_graphs(runner)
        close_tensor_parallel()
    except EOFError:   # rank 0 is gone
        return
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1)
