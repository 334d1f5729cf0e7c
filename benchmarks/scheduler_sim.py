"""The scheduler alone (CPU, no model) on a GPU run's shape: how many tokens each KV admission policy computes.

A preempted request is recomputed: every token of its prompt and output so far runs through the model again, in
prefill ("mixed") steps. This drives batchgen's own Scheduler and KVCacheManager step by step with outputs forced
to full length, as `batchgen bench` runs them, on a cache of the size a GPU run reported, and prints per policy
the tokens computed in mixed steps (the figure a GPU run's `steps.mixed.tokens` reports), preemptions, decode
steps and their mean rows; for presets taken from a measured run, that run's figures beside them. Prefix caching
is off (random prompts share nothing) and a step's sampled token is appended at once (the engine's one-step
overlap is left out).

    python benchmarks/scheduler_sim.py --preset 70b-fp8-tp2
    python benchmarks/scheduler_sim.py --num-blocks 58252 --input-len 1000 --output-len 1000 --num-requests 1000
    python benchmarks/scheduler_sim.py --num-blocks 12500 --input-len 100 --input-len-max 1024 --output-len 100 \
        --output-len-max 1024 --num-requests 3000        # lengths drawn as in W2
    python benchmarks/scheduler_sim.py --num-blocks 13300 --block-size 32 --arrive-every 4   # 70B one card, staggered
"""
import argparse
import itertools
import json
import random
import time

from batchgen.engine.kv_cache import KVCacheManager
from batchgen.engine.request import Request
from batchgen.engine.scheduler import DECODE_STEP_TOKENS, Scheduler
from batchgen.sampling_params import SamplingParams

# runs of 2026-11-30 (docs/benchmarks.md, fifth session): KV blocks of 16 tokens, requests, in / out, and what
# the run (greedy admission, commit c38ffb6 / 097fffa) measured in its mixed steps
PRESETS = {
    "70b-fp8-tp2": dict(num_blocks=71887, num_requests=1000, input_len=1000, output_len=1000,
                        measured=dict(mixed_tokens=1691712, mixed_steps=207, decode_steps=1793)),
    "8b-fp8-bf16kv": dict(num_blocks=58252, num_requests=1000, input_len=1000, output_len=1000,
                          measured=dict(mixed_tokens=1636832, mixed_steps=201, decode_steps=1887)),
    "8b-fp8-fp8kv": dict(num_blocks=116505, num_requests=1000, input_len=1000, output_len=1000,
                         measured=dict(mixed_tokens=1150793, mixed_steps=141, decode_steps=1079)),
    "qwen3-30b-a3b": dict(num_blocks=44442, num_requests=700, input_len=1000, output_len=1000,
                          measured=dict(mixed_tokens=1180172, mixed_steps=145, decode_steps=1914)),
    "mixtral-8x7b": dict(num_blocks=18113, num_requests=200, input_len=1000, output_len=1000,
                         measured=dict(mixed_tokens=291742, mixed_steps=37, decode_steps=1545)),
}


def simulate(admission: str, num_blocks: int, num_requests: int, input_len: int, output_len: int,
             block_size: int, max_num_seqs: int, budget: int, input_len_max: int | None = None,
             output_len_max: int | None = None, arrive_every: float = 0) -> dict:
    """Lengths drawn uniformly from [input_len, input_len_max] and [output_len, output_len_max] (seeded), as
    `batchgen bench` draws them; fixed without the maxima. All requests wait from the start, or (arrive_every)
    request i arrives at step i * arrive_every: staggered starts, so that equal lengths do not end in lockstep."""
    input_len_max, output_len_max = input_len_max or input_len, output_len_max or output_len
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    scheduler = Scheduler(kv, max_num_seqs, budget, max_model_len=input_len_max + output_len_max,
                          admission=admission, decode_step_tokens=DECODE_STEP_TOKENS["cuda"])
    rng = random.Random(0)
    requests = [Request(str(i), [i % 50_000] * rng.randint(input_len, input_len_max),
                        SamplingParams(max_tokens=rng.randint(output_len, output_len_max), ignore_eos=True))
                for i in range(num_requests)]
    steps = {"decode": 0, "mixed": 0}
    tokens = {"decode": 0, "mixed": 0}
    arrived = 0
    for step in itertools.count():
        while arrived < num_requests and arrived * arrive_every <= step:
            scheduler.add(requests[arrived])
            arrived += 1
        if arrived == num_requests and not scheduler.has_unfinished():
            break
        batch = scheduler.schedule()
        if not batch:
            continue
        kind = "decode" if batch.num_tokens == len(batch) else "mixed"
        steps[kind] += 1
        tokens[kind] += batch.num_tokens
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens:
                request.output_token_ids.append(1)
                if len(request.output_token_ids) >= request.params.max_tokens:
                    request.finish("length")
                    scheduler.finish(request)
    # each request computes its prompt and every output token but the last once; the rest is recomputation
    once = sum(r.num_prompt_tokens + r.params.max_tokens - 1 for r in requests)
    return dict(admission=admission, mixed_tokens=tokens["mixed"], mixed_steps=steps["mixed"],
                decode_steps=steps["decode"], mean_decode_rows=round(tokens["decode"] / max(1, steps["decode"]), 1),
                recomputed_tokens=tokens["mixed"] + tokens["decode"] - once,
                preemptions=sum(r.num_preemptions for r in requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, action="append", help="default: every preset")
    parser.add_argument("--num-blocks", type=int)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=1000)
    parser.add_argument("--input-len-max", type=int, help="draw prompt lengths from --input-len to this")
    parser.add_argument("--output-len-max", type=int, help="draw output lengths from --output-len to this")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--arrive-every", type=float, default=0,
                        help="request i arrives at step i x this (default: all at the start)")
    args = parser.parse_args()
    shapes = {"custom": dict(num_blocks=args.num_blocks, num_requests=args.num_requests, input_len=args.input_len,
                             output_len=args.output_len, input_len_max=args.input_len_max,
                             output_len_max=args.output_len_max)} if args.num_blocks else \
        {name: PRESETS[name] for name in args.preset or PRESETS}
    for name, shape in shapes.items():
        run_shape = {key: value for key, value in shape.items() if key != "measured"}
        for admission in ("greedy", "reserve"):
            start = time.perf_counter()
            figures = simulate(admission, **run_shape, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                               budget=args.max_num_batched_tokens, arrive_every=args.arrive_every)
            print(json.dumps({"shape": name, **run_shape, **figures, "measured_greedy_run": shape.get("measured"),
                              "sim_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
