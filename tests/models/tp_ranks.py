"""Tensor-parallel ranks for model tests: `size` processes spawned once, joined in a gloo group on the CPU (an NCCL
one on GPUs: rank r on cuda:r), each running the jobs it is sent (a module-level function and its arguments) in
the same order as its peers. A rank that raises, dies or stops answering fails the test within a timeout, never
hangs it; the pool then restarts."""
import queue
import socket
import time
import traceback

import torch
from torch import multiprocessing

from batchgen.distributed import close_tensor_parallel, init_tensor_parallel

COLLECTIVE_TIMEOUT_S = 60   # a rank left alone in a collective raises after this
JOB_TIMEOUT_S = 180         # start-up and one job, on a busy machine


class RankFailed(RuntimeError):
    """A rank raised, died or timed out; the message holds its traceback or exit code."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(rank: int, size: int, device_type: str, init_method: str, jobs, results) -> None:
    torch.set_num_threads(1)   # two ranks on a two-core machine
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    try:
        init_tensor_parallel(rank, size, init_method, device, COLLECTIVE_TIMEOUT_S)
        while (job := jobs.get()) is not None:
            function, args = job
            try:
                results.put((rank, True, function(*args)))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        close_tensor_parallel()


class Ranks:
    """`run(function, *args)` -> [rank 0's return value, rank 1's, ...]; raises RankFailed."""

    def __init__(self, size: int = 2, device_type: str = "cpu"):
        self.size, self.device_type = size, device_type
        self.processes = []

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.jobs = [context.Queue() for _ in range(self.size)]
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.processes = [context.Process(target=_serve, args=(rank, self.size, self.device_type, init_method,
                                                                self.jobs[rank], self.results), daemon=True)
                          for rank in range(self.size)]
        for process in self.processes:
            process.start()

    def run(self, function, *args) -> list:
        if not self.processes:
            self._start()
        for jobs in self.jobs:
            jobs.put((function, args))
        returned, deadline = {}, time.monotonic() + JOB_TIMEOUT_S
        try:
            while len(returned) < self.size:
                try:
                    rank, ok, value = self.results.get(timeout=1.0)
                except queue.Empty:
                    dead = [f"rank {rank} exited with code {process.exitcode}"
                            for rank, process in enumerate(self.processes) if not process.is_alive()]
                    if dead or time.monotonic() > deadline:
                        raise RankFailed("; ".join(dead) or f"no answer within {JOB_TIMEOUT_S} s") from None
                    continue
                if not ok:
                    raise RankFailed(f"rank {rank} raised:\n{value}")
                returned[rank] = value
        except RankFailed:
            self.close(wait_s=0)   # the peers may be stuck in a collective: start afresh next time
            raise
        return [returned[rank] for rank in range(self.size)]

    def close(self, wait_s: float = 10) -> None:
        """Stop the ranks: asked to finish, killed after `wait_s`."""
        for jobs, process in zip(self.jobs, self.processes):
            if process.is_alive():
                jobs.put(None)
        for process in self.processes:
            process.join(timeout=wait_s)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes = []
