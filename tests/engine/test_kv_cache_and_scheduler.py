"""Block accounting, prefix caching and scheduling, driven without a model: a step's sampled token is made
up, since only token counts and block ownership are under test here."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from batchgen.engine.kv_cache import KVCacheManager
from batchgen.engine.request import Request, RequestStatus
from batchgen.engine.scheduler import Scheduler
from batchgen.sampling_params import SamplingParams


def make_request(index: int, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(str(index), prompt, SamplingParams(max_tokens=max_tokens), group_index=index)


def check_block_accounting(kv: KVCacheManager, requests: list[Request]) -> None:
    owners = [0] * kv.num_blocks
    for request in requests:
        assert len(set(request.block_ids)) == len(request.block_ids)
        for block_id in request.block_ids:
            owners[block_id] += 1
    assert owners == kv.ref_counts
    assert set(kv.free_blocks) == {b for b in range(kv.num_blocks) if owners[b] == 0}
    for block_hash, block_id in kv.cached_blocks.items():
        assert kv.block_hash[block_id] == block_hash
    # a block shared by two requests must be a cached (hashed) full block
    assert all(kv.block_hash[b] is not None for b in range(kv.num_blocks) if owners[b] > 1)


def simulate(scheduler: Scheduler, requests: list[Request], max_steps: int = 10_000,
             stops_at: dict[str, int] | None = None, running: list[list[Request]] | None = None) -> int:
    """Run scheduler steps as the engine would, appending a made-up token when a request reaches its end; a
    request in `stops_at` ends ("stop", as at an EOS) once it has that many output tokens; `running` gets the
    running requests after each schedule. Returns the tokens computed in all (a preempted request's are
    computed again)."""
    stops_at = stops_at or {}
    for request in requests:
        scheduler.add(request)
    steps = computed = 0
    while scheduler.has_unfinished():
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
        batch = scheduler.schedule()
        assert batch.num_tokens <= scheduler.max_num_batched_tokens
        assert len(scheduler.running) <= scheduler.max_num_seqs
        if running is not None:
            running.append(list(scheduler.running))
        computed += batch.num_tokens
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            assert len(request.block_ids) * scheduler.kv_cache.block_size >= request.num_computed_tokens + num_new
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens:
                request.output_token_ids.append(7 + len(request.output_token_ids))
                if len(request.output_token_ids) == stops_at.get(request.request_id):
                    request.finish("stop")
                    scheduler.finish(request)
                elif len(request.output_token_ids) >= request.params.max_tokens:
                    request.finish("length")
                    scheduler.finish(request)
        check_block_accounting(scheduler.kv_cache, scheduler.running + list(scheduler.waiting))
    return computed


def test_prefix_hit_shares_full_blocks_and_leaves_the_last_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request(0, list(range(100, 112)))            # 12 tokens: 3 full blocks
    assert kv.find_cached_prefix(first) == []
    assert kv.allocate(first, 12)
    second = make_request(1, list(range(100, 112)))
    hits = kv.find_cached_prefix(second)
    assert hits == first.block_ids[:2]                        # the third block holds the token to compute
    third = make_request(2, list(range(100, 108)) + [1, 2, 3, 4, 5])
    assert kv.find_cached_prefix(third) == first.block_ids[:2]
    assert kv.allocate(second, 4, hits)
    assert second.block_ids[:2] == first.block_ids[:2]
    assert kv.ref_counts[first.block_ids[0]] == 2
    check_block_accounting(kv, [first, second])


def test_freed_cached_blocks_are_reused_until_evicted_least_recently_freed_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    old = make_request(0, [1, 2, 3, 4])
    kv.allocate(old, 4)
    kv.free(old)
    newer = make_request(1, [5, 6, 7, 8])
    kv.allocate(newer, 4)
    kv.free(newer)
    # both prefixes still cached; taking two fresh blocks evicts the older request's first
    again = make_request(2, [1, 2, 3, 4, 9])
    assert len(kv.find_cached_prefix(again)) == 2
    filler = make_request(3, [0, 0, 0])
    assert kv.allocate(filler, 3)
    assert kv.find_cached_prefix(make_request(4, [1, 2, 3, 4, 9])) == []
    assert len(kv.find_cached_prefix(make_request(5, [5, 6, 7, 8, 9]))) == 2


def test_allocation_fails_cleanly_when_the_pool_is_short():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    request = make_request(0, list(range(20)))
    assert not kv.allocate(request, 20)
    assert request.block_ids == [] and kv.num_free_blocks == 3


def test_budget_splits_long_prompts_into_chunks_and_decodes_go_first():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    short, long = make_request(0, [1, 2, 3]), make_request(1, list(range(30, 55)))
    scheduler.add(short)
    scheduler.add(long)
    batch = scheduler.schedule()
    assert batch.num_new_tokens == [3, 7]
    short.num_computed_tokens, long.num_computed_tokens = 3, 7
    short.output_token_ids.append(9)
    batch = scheduler.schedule()
    assert batch.requests == [short, long] and batch.num_new_tokens == [1, 9]


def test_preemption_recomputes_and_every_request_finishes():
    kv = KVCacheManager(num_blocks=8, block_size=4)           # room for about two requests at a time
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, admission="greedy")
    requests = [make_request(i, [i + 1] * 7, max_tokens=10) for i in range(5)]
    simulate(scheduler, requests)
    assert all(r.status is RequestStatus.FINISHED and len(r.output_token_ids) == 10 for r in requests)
    assert sum(r.num_preemptions for r in requests) > 0
    assert kv.num_free_blocks == kv.num_blocks


def full_length_workload(num_requests: int = 24) -> list[Request]:
    """Prompts of 9-16 tokens, 12 output tokens each: 21-28 tokens, 6-7 blocks of 4, where the cache below
    holds 40 blocks, so at most six run to the end at once."""
    rng = random.Random(3)
    return [make_request(i, [rng.randrange(50) for _ in range(rng.randrange(9, 17))], max_tokens=12)
            for i in range(num_requests)]


def test_reserve_admission_runs_only_what_the_cache_can_finish_and_never_preempts():
    kv = KVCacheManager(num_blocks=40, block_size=4, enable_prefix_caching=False)
    reserve = Scheduler(kv, max_num_seqs=16, max_num_batched_tokens=64)
    requests = full_length_workload()
    computed = simulate(reserve, requests)
    assert sum(r.num_preemptions for r in requests) == 0
    # every token computed once: prompts, and each output token but the last (never fed back)
    assert computed == sum(r.num_prompt_tokens + 11 for r in requests)
    assert reserve.output_share == 1.0

    greedy_requests = full_length_workload()
    greedy = Scheduler(KVCacheManager(num_blocks=40, block_size=4, enable_prefix_caching=False), max_num_seqs=16,
                       max_num_batched_tokens=64, admission="greedy")
    assert simulate(greedy, greedy_requests) > computed   # admitting what the cache cannot finish: recomputation
    assert sum(r.num_preemptions for r in greedy_requests) > 0
    assert [r.output_token_ids for r in greedy_requests] == [r.output_token_ids for r in requests]


def staggered_workload(num_requests: int = 40) -> list[Request]:
    """Prompts of 4-12 tokens, 1-30 output tokens each: requests that end at different steps."""
    rng = random.Random(5)
    return [make_request(i, [rng.randrange(50) for _ in range(rng.randrange(4, 13))], max_tokens=rng.randrange(1, 31))
            for i in range(num_requests)]


def test_reserve_admission_counts_on_the_blocks_of_requests_that_end_first():
    # a request's blocks come back when it ends: of requests ending at different steps, more can run at once
    # than their full lengths fit side by side, and none is preempted (decode_step_tokens=0: no tail merged)
    kv = KVCacheManager(num_blocks=40, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(kv, max_num_seqs=32, max_num_batched_tokens=64, decode_step_tokens=0)
    requests = staggered_workload()
    running = []
    computed = simulate(scheduler, requests, running=running)
    assert sum(r.num_preemptions for r in requests) == 0
    assert computed == sum(r.num_prompt_tokens + r.params.max_tokens - 1 for r in requests)
    full_lengths = max(sum(kv.blocks_needed(r.num_prompt_tokens + r.params.max_tokens) for r in step)
                       for step in running)
    assert full_lengths > kv.num_blocks   # side by side at full length they would not have fit


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), block_size=st.sampled_from([1, 4, 16]), share=st.floats(0.1, 1.0))
def test_peak_blocks_bounds_the_most_blocks_held_at_once(seed, block_size, share):
    rng = random.Random(seed)
    scheduler = Scheduler(KVCacheManager(1, block_size), max_num_seqs=64, max_num_batched_tokens=64,
                          max_model_len=rng.randrange(20, 80))
    scheduler.finished_output_tokens, scheduler.finished_max_tokens = share, 1.0
    requests = [make_request(i, [1] * rng.randrange(1, 20), max_tokens=rng.randrange(1, 60))
                for i in range(rng.randrange(1, 30))]
    for request in requests:
        request.output_token_ids.extend([7] * rng.randrange(0, 5))
    # step by step: each request grows a token a step for its expected growth, then lets its blocks go
    lengths = [r.num_tokens + r.num_pending_tokens for r in requests]
    growth = [scheduler._expected_growth(r) for r in requests]
    exact = max(sum(-(-(n + t) // block_size) for n, g in zip(lengths, growth) if g >= t)
                for t in range(max(growth) + 1))
    assert exact <= scheduler._peak_blocks(requests) <= exact + len(requests)


def test_reserve_admission_learns_how_much_of_max_tokens_requests_use():
    # outputs end (as at an EOS) after 3 of their 12 allowed tokens: once a few have finished, the growth
    # reserved for each running request shrinks to a quarter and more of them run at once
    kv = KVCacheManager(num_blocks=40, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(kv, max_num_seqs=16, max_num_batched_tokens=64)
    requests = full_length_workload(48)
    running = []
    simulate(scheduler, requests, stops_at={r.request_id: 3 for r in requests}, running=running)
    running_at_once = [len(step) for step in running]
    assert scheduler.output_share == pytest.approx(3 / 12)
    assert all(r.finish_reason == "stop" and len(r.output_token_ids) == 3 for r in requests)
    assert max(running_at_once[:2]) <= 6 < max(running_at_once)   # full length assumed until one finishes

    # the next job's outputs run to full length: the share follows the recent requests (about the last
    # max_num_seqs), not the whole history
    simulate(scheduler, full_length_workload(48))
    assert scheduler.output_share > 0.9


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.integers(8, 64), max_num_seqs=st.integers(1, 6), prefix_caching=st.booleans(),
       admission=st.sampled_from(["reserve", "greedy"]))
def test_random_workloads_keep_block_accounting_exact_and_finish(seed, block_size, budget, max_num_seqs,
                                                                 prefix_caching, admission):
    rng = random.Random(seed)
    shared = [rng.randrange(50) for _ in range(rng.randrange(0, 12))]
    requests = [make_request(i, shared + [rng.randrange(50) for _ in range(rng.randrange(1, 12))],
                             max_tokens=rng.randrange(1, 8)) for i in range(rng.randrange(1, 10))]
    longest = max(r.num_prompt_tokens + r.params.max_tokens for r in requests)
    num_blocks = -(-longest // block_size) + rng.randrange(0, 8)  # at least one request always fits
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(kv, max_num_seqs, budget, admission=admission)
    simulate(scheduler, requests)
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in requests)
    assert kv.num_free_blocks == num_blocks


def test_reserve_admission_merges_a_tail_cheaper_to_recompute_than_its_own_wave():
    # 80 blocks hold 12 of these requests at full length (6-7 blocks each); the 13th, 12 tokens of growth
    # and ~25 to recompute at worst, would otherwise run as a last wave of 12 steps
    def running_at_once(decode_step_tokens: int) -> tuple[int, int]:
        scheduler = Scheduler(KVCacheManager(num_blocks=80, block_size=4, enable_prefix_caching=False),
                              max_num_seqs=16, max_num_batched_tokens=256, decode_step_tokens=decode_step_tokens)
        requests = full_length_workload(13)
        running = []
        simulate(scheduler, requests, running=running)
        assert all(len(r.output_token_ids) == 12 for r in requests)
        return max(len(step) for step in running), sum(r.num_preemptions for r in requests)

    recompute = full_length_workload(13)[12].num_prompt_tokens + 12
    # its wave's 12 steps are worth more than recomputing it: it runs beside the others
    assert running_at_once(decode_step_tokens=-(-recompute // 12)) == (13, 0)
    # worth less: it waits for a place, and nothing is preempted
    assert running_at_once(decode_step_tokens=recompute // 12 - 1) == (12, 0)


@pytest.mark.parametrize("outputs_so_far,merged", [([10] * 10, True), ([10 + 9 * i for i in range(10)], False)],
                         ids=["lockstep", "one_after_another"])
def test_a_tail_is_merged_only_when_it_would_otherwise_run_alone(outputs_so_far, merged):
    # ten running requests of 8 + up to 100 tokens (27 blocks of 4 at the end) fill 270 of 280 blocks; one waits.
    # Ending together (90 steps left each), they leave it all of its 100 steps alone: worth more than recomputing
    # its 108 tokens, it is merged. Ending one after another (90, 81, ..., 9 steps left), the first to end
    # (step 9) makes room and it runs beside the rest, alone for 19 steps: not worth 108 tokens, it waits.
    kv = KVCacheManager(num_blocks=280, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(kv, max_num_seqs=16, max_num_batched_tokens=64, decode_step_tokens=2)
    for index, num_outputs in enumerate(outputs_so_far):
        request = make_request(index, [1] * 8, max_tokens=100)
        request.output_token_ids.extend([7] * num_outputs)
        assert kv.allocate(request, request.num_tokens)
        request.num_computed_tokens = request.num_tokens - 1
        request.status = RequestStatus.RUNNING
        scheduler.running.append(request)
    scheduler.add(make_request(10, [1] * 8, max_tokens=100))
    assert scheduler._waiting_is_cheaper_to_recompute() is merged
