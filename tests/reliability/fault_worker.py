"""`batchgen worker` with simulated faults in its engine, for the reliability tests: the real worker command,
with the model runner's forward pass wrapped once the model is loaded. Arguments are `batchgen worker`'s.

  FAULT_POISON_TOKEN   a model step whose input holds this token id raises, as a device fault set off by one
                       row would; each raise appends a line to FAULT_LOG
  FAULT_BROKEN         "1": every model step raises, as on a device that has failed
  FAULT_STEP_DELAY_S   every model step sleeps this long first: shards that take a while, to kill or cancel
                       mid-way without burning the CI machine's two cores
"""
import os
import sys
import time

from batchgen.cli import main
from batchgen.workers import tasks

_load_executor = tasks.load_executor


def _load_executor_with_faults():
    executor = _load_executor()
    runner = executor.engine.llm.engine.runner
    if not getattr(runner, "faults_installed", False):
        runner.faults_installed = True
        runner.forward = _faulty(runner.forward)
    return executor


def _faulty(forward):
    poison = int(os.environ.get("FAULT_POISON_TOKEN") or -1)
    broken = os.environ.get("FAULT_BROKEN") == "1"
    delay_s = float(os.environ.get("FAULT_STEP_DELAY_S") or 0)

    def faulty_forward(input_ids, *args, **kwargs):
        if delay_s:
            time.sleep(delay_s)
        if broken:
            raise RuntimeError("simulated broken device")
        if poison >= 0 and bool((input_ids == poison).any()):
            with open(os.environ["FAULT_LOG"], "a") as log:
                log.write(f"{input_ids.numel()}\n")
            raise RuntimeError(f"simulated device fault on token {poison}")
        return forward(input_ids, *args, **kwargs)
    return faulty_forward


if __name__ == "__main__":
    tasks.load_executor = _load_executor_with_faults     # the worker command and the shard task call it by name
    main(["worker", *sys.argv[1:]])
