"""Prefix-cache scope: blocks are named by SHA-256 digests chained from a root made of the request's cache salt,
extra keys and rotary-table offset, so only requests with equal scopes share K/V blocks."""
import hashlib
from array import array

from batchgen import LLM, SamplingParams
from batchgen.engine.kv_cache import KVCacheManager
from batchgen.engine.request import Request

PROMPT = list(range(100, 113))   # 13 tokens: 3 full blocks of 4 before the last token


def cached_blocks_for(first: Request, second: Request) -> int:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    kv.allocate(first, first.num_tokens, kv.find_cached_prefix(first))
    return len(kv.find_cached_prefix(second))


def request(**scope) -> Request:
    return Request("r", list(PROMPT), SamplingParams(max_tokens=1), **scope)


def test_block_digests_are_sha256_chained_from_the_scope():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    salted = request(cache_salt="job-1")
    kv.find_cached_prefix(salted)
    digest = hashlib.sha256(repr(("batchgen-kv-v1", "job-1", (), 0)).encode()).digest()
    for index, block_digest in enumerate(salted.block_hashes):
        digest = hashlib.sha256(digest + array("q", PROMPT[4 * index:4 * index + 4]).tobytes()).digest()
        assert block_digest == digest
    assert len(salted.block_hashes) == 3


def test_equal_scopes_share_blocks_and_different_ones_never_do():
    assert cached_blocks_for(request(), request()) == 3
    assert cached_blocks_for(request(), request(rope_position_offset=64)) == 0   # LongRoPE's long factors
    assert cached_blocks_for(request(cache_salt="a"), request(cache_salt="a")) == 3
    assert cached_blocks_for(request(cache_salt="a"), request(cache_salt="b")) == 0
    assert cached_blocks_for(request(cache_salt="a"), request()) == 0
    assert cached_blocks_for(request(cache_extra_keys=("lora", 1)), request(cache_extra_keys=("lora", 1))) == 3
    assert cached_blocks_for(request(cache_extra_keys=("lora", 1)), request(cache_extra_keys=("lora", 2))) == 0
    assert cached_blocks_for(request(cache_extra_keys=("1",)), request(cache_extra_keys=(1,))) == 0
    assert cached_blocks_for(request(cache_salt="a", cache_extra_keys=("x",)), request(cache_salt="a")) == 0


def test_engine_serves_a_prefix_only_to_the_same_salt(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", block_size=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate_tokens([PROMPT], greedy, cache_salt="tenant-a")[0]
    same = llm.generate_tokens([PROMPT], greedy, cache_salt="tenant-a")[0]
    other = llm.generate_tokens([PROMPT], greedy, cache_salt="tenant-b")[0]
    unsalted = llm.generate(PROMPT, greedy)[0]
    assert first.num_cached_tokens == 0
    assert same.num_cached_tokens == 12
    assert other.num_cached_tokens == 0 and unsalted.num_cached_tokens == 0
    assert first.outputs[0].token_ids == same.outputs[0].token_ids == other.outputs[0].token_ids \
        == unsalted.outputs[0].token_ids
    # beam search probes carry the salt too: the first round of a new salt finds nothing of the others'
    hits = llm.engine.kv_cache.num_hit_tokens
    llm.generate(PROMPT, SamplingParams(beam_width=2, max_tokens=1), cache_salt="tenant-c")
    assert llm.engine.kv_cache.num_hit_tokens == hits
    llm.generate(PROMPT, SamplingParams(beam_width=2, max_tokens=1), cache_salt="tenant-a")
    assert llm.engine.kv_cache.num_hit_tokens == hits + 12
