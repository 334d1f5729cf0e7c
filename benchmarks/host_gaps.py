"""Where a bench run's time outside its steps goes: `batchgen bench` with the host's phases of the timed `generate`
timed (before the first step call, between the first two, after the last; the longest gaps between step calls)
and Python's full garbage collections inside it (when, how long). Prints one line starting `host_gaps` after the
bench's own JSON line.

    python3 -P benchmarks/host_gaps.py bench --model benchmarks/configs/llama-3.1-8b --load-format dummy \\
        --name W1 --num-requests 1000 --input-len 512 --output-len 256 --max-model-len 1024
"""
import atexit
import gc
import json
import sys
import time

import batchgen.bench
import batchgen.llm
from batchgen.cli import main

step_calls: list[float] = []
generate_span: list[float] = []
collections: list[list] = []   # [generation, start, seconds]


def _record_call(record):
    def record_with_time(self, launched, taken):
        step_calls.append(time.perf_counter())
        return record(self, launched, taken)
    return record_with_time


def _timed_generate(generate):
    def generate_with_span(self, *args, **kwargs):
        step_calls.clear()
        start = time.perf_counter()
        outputs = generate(self, *args, **kwargs)
        generate_span[:] = [start, time.perf_counter()]   # the last call is the timed one
        return outputs
    return generate_with_span


def _on_collection(phase: str, info: dict) -> None:
    if phase == "start":
        collections.append([info["generation"], time.perf_counter(), None])
    else:
        collections[-1][2] = time.perf_counter() - collections[-1][1]


def _report() -> None:
    if not generate_span or len(step_calls) < 2:
        return
    start, end = generate_span
    gaps = sorted((later - earlier for earlier, later in zip(step_calls, step_calls[1:])), reverse=True)
    inside = [c for c in collections if start <= c[1] <= end]
    print("host_gaps", json.dumps({
        "before_first_step_s": round(step_calls[0] - start, 3),
        "first_to_second_step_s": round(step_calls[1] - step_calls[0], 3),
        "after_last_step_s": round(end - step_calls[-1], 3), "step_calls": len(step_calls),
        "longest_gaps_s": [round(gap, 3) for gap in gaps[:5]],
        "collections_by_generation": [sum(1 for c in inside if c[0] == g) for g in (0, 1, 2)],
        "full_collections": [{"at_s": round(c[1] - start, 2), "seconds": round(c[2], 3)} for c in inside if c[0] == 2],
    }), flush=True)


if __name__ == "__main__":
    batchgen.bench.StepProfile.record = _record_call(batchgen.bench.StepProfile.record)
    batchgen.llm.LLM.generate = _timed_generate(batchgen.llm.LLM.generate)
    gc.callbacks.append(_on_collection)
    atexit.register(_report)
    sys.argv[0] = "batchgen"
    main()
