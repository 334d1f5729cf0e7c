"""Turns a scheduled batch into one flat forward pass and returns the logits of the positions that sample.

The KV cache is one tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] allocated once, in the
compute dtype or fp8 (one byte an element: twice the tokens in the same memory); each attention layer gets its two
views (`store_kv.cache_views`: an fp8 cache's V pages are keys-contiguous). On CUDA, decode-only steps replay CUDA
graphs captured for padded batch sizes, which removes the per-kernel launch cost that dominates small models and
small batches.

KV sizing. On CUDA the cache gets what the rest of a step does not need, measured rather than estimated:
the engine runs its own step on a full batch (the token budget through the model, the sampler on
max_num_seqs rows) over a placeholder cache while `measure_peak_bytes` watches, the largest decode graph is
captured once for its memory pool (`measure_decode_graph_bytes`), and `kv_blocks_that_fit` gives
gpu_memory_utilization of the card, less those, to the cache. Whatever a later feature allocates in a step
(scales, workspaces, logprob buffers) is counted the same way. On CPU the cache has a RAM budget.
"""
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed

from batchgen.distributed import tensor_parallel
from batchgen.engine.prompt_logprobs import PromptPositions
from batchgen.engine.request import Request
from batchgen.engine.scheduler import ScheduledBatch
from batchgen.engine.transfer import to_device
from batchgen.kernels.store_kv import cache_views
from batchgen.models.attention import AttentionMetadata
from batchgen.models.config import ModelConfig


log = logging.getLogger(__name__)

CPU_KV_CACHE_CAP = 2 << 30


@dataclass
class MemoryProfile:
    """Device memory a running engine needs beside its weights and KV cache, measured at start."""
    step_peak_bytes: int       # the largest step's transient peak: activations, logits, sampling workspace
    graph_pool_bytes: int      # CUDA graphs' private pool (0 when decode runs eagerly)


def kv_blocks_that_fit(free_bytes: int, total_bytes: int, gpu_memory_utilization: float, profile: MemoryProfile,
                       bytes_per_block: int) -> int:
    """Blocks for the cache: the memory free now (weights loaded, nothing else held) less the share of the card
    to leave alone and what steps and graphs will take."""
    budget = (free_bytes - int(total_bytes * (1 - gpu_memory_utilization)) - profile.step_peak_bytes
              - profile.graph_pool_bytes)
    if budget < bytes_per_block:
        raise RuntimeError(f"no GPU memory left for the KV cache ({budget / 2**30:.2f} GiB after the weights, a step's "
                           f"peak of {profile.step_peak_bytes / 2**30:.2f} GiB and CUDA graphs' "
                           f"{profile.graph_pool_bytes / 2**30:.2f} GiB); lower max_num_batched_tokens or "
                           "max_num_seqs, or raise gpu_memory_utilization")
    return budget // bytes_per_block


def use_expandable_segments() -> None:
    """Steps of every shape come and go on the card, and with fixed-size segments the caching allocator fragments:
    an H200 run reserved 4.8 GiB above its allocated peak, past the share the KV sizing left. Growable segments
    keep what is reserved close to what is allocated. A choice the user made in PYTORCH_CUDA_ALLOC_CONF wins."""
    if "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def cpu_kv_blocks(bytes_per_block: int, block_size: int, max_num_seqs: int, context: int) -> int:
    """CPU: no more than a full batch of full-length sequences can use (small models get small caches), a quarter
    of free RAM and CPU_KV_CACHE_CAP."""
    usable = max_num_seqs * context * bytes_per_block // block_size
    budget = min(CPU_KV_CACHE_CAP, available_ram_bytes() // 4, usable)
    return max(1, budget // bytes_per_block)


def available_ram_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


@dataclass
class PendingTokens:
    """Tokens sampled last step, still on the device: `token_ids[rows[request]]` is the request's."""
    token_ids: torch.Tensor
    rows: dict[Request, int]


@dataclass
class StepArrays:
    """A step's flat inputs on the host, decodes first: what `prepare` computes, and what rank 0 sends the other
    tensor-parallel ranks. A token sampled last step is not known on the host yet: its slot in `input_ids` holds
    0 until `execute` fills it in on the device."""
    input_ids: np.ndarray
    positions: np.ndarray                 # rotary-table rows: the position plus the request's rope_position_offset
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    max_query_len: int
    num_decodes: int
    logits_indices: np.ndarray            # rows (last token of each request that reached its end) to sample
    pending_positions: list[int]          # slots of input_ids taking a token sampled last step


@dataclass
class StepInputs:
    """A step's inputs on the device, with the host arrays they came from and the requests behind the rows."""
    host: StepArrays
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    prompt_positions: PromptPositions     # rows whose next prompt token a request scores (prompt_logprobs)
    sampling_requests: list[Request]      # the request of each row of logits_indices
    pending_requests: list[Request]       # whose token each of host.pending_positions takes


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, block_size: int,
                 device: torch.device, dtype: torch.dtype, logits_chunk_rows: int, *, kv_cache_dtype: torch.dtype):
        self.model = model
        self.logits_chunk_rows = logits_chunk_rows   # rows of full-vocab logits made at once for prompt logprobs
        self.model_config = model_config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.num_kv_heads = model.attention_layers[0].num_kv_heads   # this rank's share under tensor parallelism
        # the group size the model was built for, read when built like its layers read it
        self.tensor_parallel_size = tensor_parallel().size
        self.kv_cache_dtype = kv_cache_dtype
        scales_loaded = any(layer.kv_scales_loaded for layer in model.attention_layers)
        if kv_cache_dtype == torch.float8_e4m3fn and not scales_loaded:
            log.warning("fp8 KV cache: the checkpoint has no K/V scales; storing K and V with scale 1.0 (e4m3 "
                        "holds up to +-448 at ~3.6% rms error, and K/V entries are typically below ~100)")
        self.kv_cache: torch.Tensor | None = None
        self.decode_graphs: DecodeGraphs | None = None

    @property
    def kv_bytes_per_block(self) -> int:
        c = self.model_config
        return (2 * c.num_hidden_layers * self.block_size * self.num_kv_heads * c.head_dim
                * self.kv_cache_dtype.itemsize)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.model_config
        self.kv_cache = torch.zeros(c.num_hidden_layers, 2, num_blocks, self.block_size, self.num_kv_heads,
                                    c.head_dim, dtype=self.kv_cache_dtype, device=self.device)
        for layer, layer_cache in zip(self.model.attention_layers, self.kv_cache):
            layer.k_cache, layer.v_cache = cache_views(layer_cache)

    def release_kv_cache(self) -> None:
        """Drop the cache (the profiling placeholder) and hand its memory back to the device."""
        for layer in self.model.attention_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)
        self.kv_cache = None
        torch.cuda.empty_cache()

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        self.decode_graphs = DecodeGraphs(self.model, max_batch, -(-max_model_len // self.block_size), self.device)

    def kv_blocks_that_fit(self, gpu_memory_utilization: float, profile: MemoryProfile) -> int:
        """Blocks of this device's memory the cache can have, given what the rest of a step takes (`profile`)."""
        free, total = torch.cuda.mem_get_info(self.device)
        return kv_blocks_that_fit(free, total, gpu_memory_utilization, profile, self.kv_bytes_per_block)

    def close(self) -> None:
        """Stop what the runner started: nothing on one device (a tensor-parallel runner stops its ranks)."""

    def check_healthy(self) -> None:
        """Raise if what the device handed back can't be trusted: never on one device (a tensor-parallel runner's
        collectives are aborted when a rank dies, and the kernels waiting in them return garbage)."""

    def measure_peak_bytes(self, run: Callable[[], None]) -> int:
        """CUDA memory `run` holds at its peak above what was held before it: reserved, not allocated, bytes,
        since the card's memory is what the allocator reserves."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_reserved(self.device)
        run()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device) - before

    def measure_decode_graph_bytes(self, max_batch: int, max_model_len: int) -> int:
        """Memory the decode graphs hold: the largest one captured once (on the current cache, a placeholder);
        the smaller ones share its pool."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        graphs = DecodeGraphs(self.model, max_batch, -(-max_model_len // self.block_size), self.device,
                              largest_only=True)
        torch.cuda.empty_cache()   # the eager warm-up's memory is the step's, measured apart; the pool stays
        held = torch.cuda.memory_reserved(self.device) - before
        del graphs
        torch.cuda.empty_cache()
        return held

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The step's inputs: all the host work of a step, and copies queued to the device."""
        size = self.block_size
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)
        requests = [batch.requests[i] for i in order]
        num_new_tokens = [batch.num_new_tokens[i] for i in order]
        num_seqs = len(batch)
        input_ids: list[int] = []
        positions = np.empty(batch.num_tokens, dtype=np.int64)
        slot_mapping = np.empty(batch.num_tokens, dtype=np.int64)
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
        seq_lens = np.empty(num_seqs, dtype=np.int32)
        logits_indices: list[int] = []
        sampling_requests: list[Request] = []
        pending_positions: list[int] = []
        pending_requests: list[Request] = []
        prompt_positions = PromptPositions()
        offset = 0
        for i, (request, num_new) in enumerate(zip(requests, num_new_tokens)):
            start = request.num_computed_tokens
            end = start + num_new
            input_ids.extend(request.token_ids_slice(start, min(end, request.num_tokens)))
            if end > request.num_tokens:
                pending_positions.append(offset + num_new - 1)
                pending_requests.append(request)
                input_ids.append(0)
            if num_new == 1:
                positions[offset] = start + request.rope_position_offset
                slot_mapping[offset] = request.block_ids[start // size] * size + start % size
            else:
                pos = np.arange(start, end)
                positions[offset:offset + num_new] = pos + request.rope_position_offset
                slot_mapping[offset:offset + num_new] = np.asarray(request.block_ids)[pos // size] * size + pos % size
            if request.scores_prompt:
                prompt_positions.add(request, offset, start, end)
            offset += num_new
            query_start_loc[i + 1] = offset
            seq_lens[i] = end
            if end == request.length and request.params.max_tokens > 0:
                logits_indices.append(offset - 1)
                sampling_requests.append(request)
        max_blocks = -(-int(seq_lens.max()) // size)
        block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        for i, request in enumerate(requests):
            num_blocks = -(-int(seq_lens[i]) // size)
            block_tables[i, :num_blocks] = request.block_ids[:num_blocks]

        host = StepArrays(np.asarray(input_ids, dtype=np.int64), positions, slot_mapping, query_start_loc, seq_lens,
                          block_tables, max(num_new_tokens), num_new_tokens.count(1),
                          np.asarray(logits_indices, dtype=np.int64), pending_positions)
        return self.upload(host, prompt_positions, sampling_requests, pending_requests)

    def upload(self, host: StepArrays, prompt_positions: PromptPositions, sampling_requests: list[Request] = (),
               pending_requests: list[Request] = ()) -> StepInputs:
        """The step's arrays copied to the device (queued). Ranks other than 0 have no requests, only the rows."""
        meta = AttentionMetadata(
            query_start_loc=self._to_device(host.query_start_loc), seq_lens=self._to_device(host.seq_lens),
            block_tables=self._to_device(host.block_tables), slot_mapping=self._to_device(host.slot_mapping),
            max_query_len=host.max_query_len, max_seq_len=int(host.seq_lens.max()), num_decodes=host.num_decodes)
        return StepInputs(host, self._to_device(host.input_ids), self._to_device(host.positions), meta,
                          self._to_device(host.logits_indices), prompt_positions, list(sampling_requests),
                          list(pending_requests))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of every token, or of `rows` only: a captured graph for decode-only steps that fit one
        (every row of those samples), else eager."""
        graphs = self.decode_graphs
        if rows is None and graphs and meta.decode_only and input_ids.shape[0] <= graphs.max_batch:
            return graphs.run(input_ids, positions, meta)
        return self.model(input_ids, positions, meta, rows)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return to_device(array, self.device)

    def execute(self, inputs: StepInputs, pending: PendingTokens | None = None) -> torch.Tensor:
        """Queue the step (under the caller's inference mode), the tokens sampled last step taken from
        `pending` on the device; logits [S, V] in `compute_logits`'s dtype, row i for
        inputs.sampling_requests[i]. A step with prompt positions to score waits for their logprobs. Under tensor
        parallelism every rank executes the same steps in the same order (their collectives pair up); ranks other
        than 0 pass no `pending`."""
        input_ids = inputs.input_ids
        if inputs.host.pending_positions:
            slots = self._to_device(np.array(inputs.host.pending_positions, dtype=np.int64))
            input_ids[slots] = self._pending_tokens(inputs, pending)
        if inputs.prompt_positions or len(inputs.host.logits_indices) == len(inputs.host.input_ids):
            hidden = self.forward(input_ids, inputs.positions, inputs.meta)   # scoring reads every row
            if inputs.prompt_positions:
                inputs.prompt_positions.score(self.model, hidden, self.logits_chunk_rows)
            hidden = hidden[inputs.logits_indices]
        elif len(inputs.host.logits_indices):
            hidden = self.forward(input_ids, inputs.positions, inputs.meta, inputs.logits_indices)
        else:   # nothing samples: one row, so that no kernel runs over zero rows
            self.forward(input_ids, inputs.positions, inputs.meta, inputs.logits_indices.new_zeros(1))
            return input_ids.new_empty(0, 0, dtype=torch.float32)
        return self.model.compute_logits(hidden)

    def _pending_tokens(self, inputs: StepInputs, pending: PendingTokens | None) -> torch.Tensor:
        """The tokens sampled last step for the step's pending slots, on this device. Only rank 0 samples: under
        tensor parallelism it broadcasts them on the device group, where the others' forward passes wait for
        them without the host waiting."""
        if pending is None:
            tokens = torch.empty(len(inputs.host.pending_positions), dtype=torch.long, device=self.device)
        else:
            rows = self._to_device(np.array([pending.rows[r] for r in inputs.pending_requests], dtype=np.int64))
            tokens = pending.token_ids[rows]
        if self.tensor_parallel_size > 1:
            torch.distributed.broadcast(tokens, src=0)
        return tokens


def decode_graph_batch_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes that get a decode graph: powers of two up to 128, then every 128 (15 graphs for 1024
    sequences). Above 128 rows cuBLASLt's fp8 GEMMs ran at the next multiple of 128 faster than, or within 2% of,
    any row count between, and up to 2x slower at 128k + 32..96 (H200, Llama-8B and -70B projections,
    docs/benchmarks.md); padding rows have no context, so attention skips them, and their other work is
    elementwise."""
    sizes = [*(1 << i for i in range(8)), *range(256, max_batch + 1, 128)]
    return sorted({*(size for size in sizes if size <= max_batch), max_batch})


class DecodeGraphs:
    """CUDA graphs of the decode-only forward, one per padded batch size, sharing one memory pool.

    Inputs are copied into static buffers; padding rows get slot -1 (nothing stored) and length 0 (the
    decode kernel writes zeros for them). Block tables are as wide as the longest allowed context, so the
    decode kernel's split grid is fixed per graph.
    """

    def __init__(self, model: torch.nn.Module, max_batch: int, max_blocks_per_seq: int, device: torch.device,
                 largest_only: bool = False):
        self.model = model
        self.buckets = [max_batch] if largest_only else decode_graph_batch_sizes(max_batch)
        self.max_batch = self.buckets[-1]
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(self.buckets):
                meta = self._meta(size)
                self.model(self.input_ids[:size], self.positions[:size], meta)   # compiles kernels for this shape
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(self.input_ids[:size], self.positions[:size], meta)
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.synchronize(device)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
                                 block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size],
                                 max_query_len=1, max_seq_len=self.block_tables.shape[1], num_decodes=size)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        batch = input_ids.shape[0]
        size = next(b for b in self.buckets if b >= batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.slot_mapping[batch:size].fill_(-1)
        self.seq_lens[:batch].copy_(meta.seq_lens)
        self.seq_lens[batch:size].zero_()
        self.block_tables[:batch, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[size].replay()
        return self.outputs[size][:batch]
