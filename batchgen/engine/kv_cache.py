"""KV cache blocks: a pool with a free list, reference counts and automatic prefix caching.

A full block is named by a SHA-256 digest chained over every token up to its end, starting from a root made
of the request's cache salt and extra keys: equal digests mean equal prefixes in the same scope. A 256-bit
digest makes a collision, accidental or crafted by one tenant, infeasible, so no request is served another
prefix's K/V; requests with different salts never share a block. A block whose K/V will be complete after
the current step is registered under its digest at allocation time: a request scheduled later, even in the
same step, may then reuse it, because every layer stores the whole step's K/V before any attention reads it.
Freed blocks keep their digest and go to the tail of the free list; allocation takes from the head, so
cached blocks are reused least-recently-freed first.
"""
import hashlib
from array import array
from collections import OrderedDict

from batchgen.engine.request import Request


def root_digest(request: Request) -> bytes:
    """The digest a request's block chain starts from: its cache salt, its extra keys and its rotary-table
    offset (the same tokens at another LongRoPE offset have other K/V). Extra keys are written with repr, so
    they must be values whose repr says what they are (str, int, float, bool, None, tuples of these)."""
    scope = ("batchgen-kv-v1", request.cache_salt, tuple(request.cache_extra_keys), request.rope_position_offset)
    return hashlib.sha256(repr(scope).encode()).digest()


def block_digest(parent: bytes, token_ids: list[int]) -> bytes:
    """A full block's name: its parent's digest and its tokens (as int64s), through SHA-256."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[bytes, int] = {}   # digest -> block id
        self.num_hit_tokens = 0                     # prompt tokens served from the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        """Hash every full block among the request's first `num_tokens` tokens not hashed yet."""
        hashes, size = request.block_hashes, self.block_size
        for index in range(len(hashes), num_tokens // size):
            parent = hashes[-1] if hashes else root_digest(request)
            hashes.append(block_digest(parent, request.token_ids_slice(index * size, (index + 1) * size)))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of a request that has none yet. At least one token is
        left to compute, since its logits are needed. A request scoring its prompt needs every position's
        hidden state, so it finds none."""
        if not self.enable_prefix_caching or request.scores_prompt:
            return []
        self._extend_hashes(request, request.num_tokens - 1)
        hits = []
        for block_hash in request.block_hashes[: (request.num_tokens - 1) // self.block_size]:
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: list[int] = ()) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after `cached_prefix`, which it takes
        over); False, changing nothing, when the pool can't."""
        num_computed = request.num_computed_tokens + len(cached_prefix) * self.block_size
        num_owned = len(request.block_ids) + len(cached_prefix)
        num_new_blocks = self.blocks_needed(num_computed + num_new_tokens) - num_owned
        num_reclaimed = sum(1 for block_id in cached_prefix if self.ref_counts[block_id] == 0)
        if num_new_blocks > self.num_free_blocks - num_reclaimed:
            return False
        for block_id in cached_prefix:
            if self.ref_counts[block_id] == 0:
                del self.free_blocks[block_id]
            self.ref_counts[block_id] += 1
        request.block_ids.extend(cached_prefix)
        for _ in range(num_new_blocks):
            block_id, _ = self.free_blocks.popitem(last=False)
            self._forget_hash(block_id)
            self.ref_counts[block_id] = 1
            request.block_ids.append(block_id)
        if self.enable_prefix_caching:
            self._register_full_blocks(request, num_computed + num_new_tokens)
        return True

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's full blocks among its first `num_tokens` tokens not offered yet. A block
        completed by a token still on the device waits for the next step, when its token id is known."""
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        self._extend_hashes(request, num_full * self.block_size)
        for index in range(request.num_registered_blocks, num_full):
            block_id = request.block_ids[index]
            if self.block_hash[block_id] is None:
                block_hash = request.block_hashes[index]
                if block_hash not in self.cached_blocks:
                    self.cached_blocks[block_hash] = block_id
                    self.block_hash[block_id] = block_hash
        request.num_registered_blocks = max(request.num_registered_blocks, num_full)

    def _forget_hash(self, block_id: int) -> None:
        block_hash = self.block_hash[block_id]
        if block_hash is not None:
            del self.cached_blocks[block_hash]
            self.block_hash[block_id] = None

    def free(self, request: Request) -> None:
        """Release the request's blocks. Later blocks go to the free list first, so they are evicted
        before the prefix blocks other requests are more likely to share."""
        for block_id in reversed(request.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
                if self.block_hash[block_id] is None:
                    self.free_blocks.move_to_end(block_id, last=False)
        request.block_ids = []
        request.num_registered_blocks = 0

    def forget_cached_prefixes(self) -> None:
        """Drop every prefix-cache entry: after a failed step, blocks registered for it may never have been
        written."""
        self.cached_blocks.clear()
        self.block_hash = [None] * self.num_blocks
