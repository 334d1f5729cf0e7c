"""KV cache sizing: the CPU-testable parts of the CUDA path (the arithmetic from measured numbers, the profiling
step, and the engine's state after it); the CUDA measurement itself runs in benchmarks/engine_gpu.py."""
import pytest
from hypothesis import given, settings, strategies as st

from batchgen import LLM, SamplingParams
from batchgen.engine.model_runner import MemoryProfile, kv_blocks_that_fit

GiB = 2**30


@settings(max_examples=60, deadline=None)
@given(total=st.integers(8 * GiB, 160 * GiB), used=st.floats(0.05, 0.6), utilization=st.floats(0.5, 0.98),
       step_peak=st.integers(0, 4 * GiB), graphs=st.integers(0, GiB), per_block=st.integers(1 << 16, 4 << 20))
def test_cache_gets_the_utilization_share_less_measured_peaks(total, used, utilization, step_peak, graphs,
                                                               per_block):
    in_use = int(total * used)   # weights and whatever else holds the card now
    profile = MemoryProfile(step_peak, graphs)
    room = int(total * utilization) - in_use - step_peak - graphs
    if room < per_block:
        with pytest.raises(RuntimeError, match="no GPU memory left for the KV cache"):
            kv_blocks_that_fit(total - in_use, total, utilization, profile, per_block)
        return
    blocks = kv_blocks_that_fit(total - in_use, total, utilization, profile, per_block)
    # at the peak of a step the card holds the weights, the cache, the step and the graphs: within the share,
    # with less than a block (and rounding) to spare
    peak = in_use + blocks * per_block + step_peak + graphs
    assert peak <= total * utilization + 1
    assert total * utilization - peak < per_block + 2


@pytest.fixture
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", max_num_seqs=6,
               max_num_batched_tokens=40, block_size=4)


def test_profile_step_is_the_largest_batch_the_scheduler_forms(llm):
    engine = llm.engine
    launched = []
    engine.on_step = lambda batch, taken: launched.append((batch.num_tokens, len(batch)))
    requests = engine.profile_requests()
    engine.run(requests)
    assert launched[0] == (40, 6)   # the token budget, and a sampled row for every sequence
    assert all(r.error is None and len(r.output_token_ids) == 1 and len(r.logprobs[0].top) >= 20 for r in requests)


def test_engine_after_profiling_generates_as_a_fresh_one(llm, tiny_model_dir, monkeypatch):
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    params = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    fresh = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    profiled = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", max_num_seqs=6,
                   max_num_batched_tokens=40, block_size=4)
    engine = profiled.engine
    num_blocks = engine.kv_cache.num_blocks
    ran = []
    monkeypatch.setattr(engine.runner, "measure_peak_bytes", lambda run: ran.append(run()) or 123)
    profile = engine._profile_memory(use_graphs=False)
    assert ran and profile == MemoryProfile(123, 0) and engine.runner.kv_cache is None
    engine._build_cache(num_blocks)
    assert [o.outputs[0].token_ids for o in profiled.generate(prompts, params)] == fresh
