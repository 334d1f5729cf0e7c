"""Host cost of naming prefix-cache blocks (SHA-256 chained from a salted root, batchgen.engine.kv_cache) on
W1-shaped steps, against the GPU step times of the W1 run in docs/benchmarks.md.

A W1 mixed step schedules 8,192 prompt tokens (512 blocks of 16 to hash) and a decode step ~480 sequences of
which one in 16 completes a block; both go through the KV manager's own lookup and registration.
Prints one JSON line per step kind: microseconds per block and the share of the step's measured time.

    python benchmarks/prefix_hash_cost.py
"""
import json
import platform
import random
import time

from batchgen.bench import code_commit
from batchgen.engine.kv_cache import KVCacheManager
from batchgen.engine.request import Request
from batchgen.sampling_params import SamplingParams

BLOCK_SIZE = 16
VOCAB = 128_256
PROMPT_LEN = 512            # W1: 512 in / 256 out, Llama-3.1-8B vocabulary
MIXED_STEP_TOKENS = 8_192   # the token budget
DECODE_SEQS = 480
# W1 at commit 984f19a on an H200 (docs/benchmarks.md): 13.0 s / 66 mixed steps, 27.6 ms per decode step
MIXED_STEP_S = 13.0 / 66
DECODE_STEP_S = 0.0276


def requests(count: int, length: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [Request(str(i), [rng.randrange(VOCAB) for _ in range(length)], SamplingParams(max_tokens=256),
                    cache_salt=f"job-{seed}") for i in range(count)]


def mixed_step_seconds(kv: KVCacheManager, seed: int) -> tuple[float, int]:
    """A prefill step: 16 new 512-token prompts looked up and their blocks registered."""
    batch = requests(MIXED_STEP_TOKENS // PROMPT_LEN, PROMPT_LEN, seed)
    start = time.perf_counter()
    for request in batch:
        cached = kv.find_cached_prefix(request)
        kv.allocate(request, request.num_tokens - len(cached) * BLOCK_SIZE, cached)
    elapsed = time.perf_counter() - start
    for request in batch:
        kv.free(request)
    return elapsed, sum(len(r.block_hashes) for r in batch)


def decode_step_seconds(kv: KVCacheManager, seed: int) -> tuple[float, int]:
    """A decode step: every sequence gains a token; those reaching a block boundary name the block."""
    batch = requests(DECODE_SEQS, PROMPT_LEN + 1, seed)
    for index, request in enumerate(batch):
        # stagger the sequences over a block so 1 in 16 completes one this step, as in a steady decode phase
        request.prompt_token_ids = request.prompt_token_ids[:PROMPT_LEN - index % BLOCK_SIZE]
        kv.allocate(request, request.num_tokens)
        request.num_computed_tokens = request.num_tokens
    blocks_before = sum(len(r.block_hashes) for r in batch)
    start = time.perf_counter()
    for request in batch:
        request.output_token_ids.append(7)
        kv.allocate(request, 1)
    elapsed = time.perf_counter() - start
    blocks = sum(len(r.block_hashes) for r in batch) - blocks_before
    for request in batch:
        kv.free(request)
    return elapsed, blocks


def digest_seconds_per_block() -> float:
    """The digests alone: a lookup on an empty cache names every full block and misses at once."""
    per_block = []
    for seed in range(1, 4):
        batch = requests(MIXED_STEP_TOKENS // PROMPT_LEN, PROMPT_LEN, 100 + seed)
        empty = KVCacheManager(num_blocks=1, block_size=BLOCK_SIZE)
        start = time.perf_counter()
        for request in batch:
            empty.find_cached_prefix(request)
        per_block.append((time.perf_counter() - start) / sum(len(r.block_hashes) for r in batch))
    return min(per_block)


def main() -> None:
    kv = KVCacheManager(num_blocks=40_000, block_size=BLOCK_SIZE)
    commit = code_commit()
    machine = platform.processor() or platform.machine()
    digest_s = digest_seconds_per_block()
    for kind, measure, step_s in (("mixed", mixed_step_seconds, MIXED_STEP_S),
                                  ("decode", decode_step_seconds, DECODE_STEP_S)):
        seconds, blocks = min(measure(kv, seed) for seed in range(1, 8))   # the least-disturbed run
        print(json.dumps({"step": kind, "blocks_named": blocks, "sha256_us_per_block": round(digest_s * 1e6, 2),
                          "digests_share_of_w1_step": round(digest_s * blocks / step_s, 5),
                          "kv_manager_ms": round(seconds * 1e3, 3),
                          "kv_manager_share_of_w1_step": round(seconds / step_s, 5),
                          "machine": machine, "commit": commit}))


if __name__ == "__main__":
    main()
