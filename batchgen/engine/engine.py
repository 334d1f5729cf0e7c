"""The step loop: schedule -> run the model -> sample -> append tokens, check stops, free finished requests."""
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from batchgen.config import EngineConfig
from batchgen.distributed import tensor_parallel
from batchgen.engine.errors import Cancelled, EngineBroken
from batchgen.engine.executor import Ranks, RanksStopped, TensorParallelRunner
from batchgen.engine.grammar import StructuredOutputError
from batchgen.engine.kv_cache import KVCacheManager
from batchgen.engine.model_runner import (MemoryProfile, ModelRunner, PendingTokens, StepInputs, cpu_kv_blocks,
                                           use_expandable_segments)
from batchgen.engine.request import Request
from batchgen.engine.sampler import PendingSample, Sampler
from batchgen.engine.scheduler import DECODE_STEP_TOKENS, ScheduledBatch, Scheduler
from batchgen.engine.structured import GrammarEngine, apply_bitmask
from batchgen.engine.transfer import to_device
from batchgen.generation_config import model_sampling_defaults, with_defaults
from batchgen.models.config import DTYPES, ModelConfig
from batchgen.models.loader import load_model, resolve_model_path
from batchgen.outputs import TokenLogprobs
from batchgen.sampling_params import SamplingParams
from batchgen.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MAX_SOLO_FAILURES = 3
# a poison request costs 1 + MAX_SOLO_FAILURES failed steps in a row, two adjacent ones a step less than this:
# more means the engine itself is broken
MAX_CONSECUTIVE_FAILED_STEPS = 2 * (1 + MAX_SOLO_FAILURES)
MAX_TP_RESTARTS = 2   # restarts of the tensor-parallel ranks with no step succeeding between them
GRAMMAR_POLL_S = 0.002


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """auto: fp32 on CPU (exact and fast enough there); on GPU the checkpoint's half type, else bf16."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


@dataclass
class SampledStep:
    """A step's sampling, tokens not yet appended to their requests. With grammars, the step's masks fill on
    another thread (`masks`) while the engine prepares the next step, and the sampling is queued after that;
    otherwise at once. `sample` is set once it is queued on the device."""
    batch: ScheduledBatch
    requests: list[Request]
    logits: torch.Tensor | None
    masks: Future | None = None
    sample: PendingSample | None = None


class Engine:
    def __init__(self, config: EngineConfig):
        if tensor_parallel().size > 1:   # layers take their shard from the process's one group when built
            raise RuntimeError("a tensor-parallel engine runs in this process: close it before starting another")
        self.config = config
        self.device = config.resolved_device()
        if config.tensor_parallel_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", 0)   # rank r runs on cuda:r
        if self.device.type == "cuda":
            use_expandable_segments()
        self.model_path = resolve_model_path(config.model)
        # SamplingParams fields a request leaves unset take these (the model's generation_config.json)
        self.default_sampling = model_sampling_defaults(self.model_path) if config.generation_config == "model" else {}
        self.dtype = resolve_dtype(config.dtype, self.device, ModelConfig.from_dir(self.model_path).dtype)
        # the other ranks start first: every rank joins the group before it builds its shard of the model
        ranks = Ranks(config, self.model_path, self.dtype) if config.tensor_parallel_size > 1 else None
        try:
            self._start(ranks)
        except BaseException:   # the other ranks stop with it
            if ranks is not None:
                ranks.stop()
            raise

    def _start(self, ranks: Ranks | None) -> None:
        """Load this rank's model, size the KV cache and capture the decode graphs (on every rank)."""
        config = self.config
        self.ready = False   # until set (while the cache is sized), a failed rank fails the start: no restart
        self.model, self.model_config = load_model(self.model_path, self.dtype, self.device, config.load_format,
                                                   config.allow_pickle_weights, config.quantization)
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_path)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)

        runner_args = (self.model, self.model_config, config.block_size, self.device, self.dtype,
                       config.resolved_max_num_seqs(self.device))
        kv_cache_dtype = config.resolved_kv_cache_dtype(self.dtype)
        self.runner = (ModelRunner(*runner_args, kv_cache_dtype=kv_cache_dtype) if ranks is None
                       else TensorParallelRunner(ranks, *runner_args, kv_cache_dtype=kv_cache_dtype))
        self.sampler = Sampler(config.seed)
        self.grammars: GrammarEngine | None = None     # created with the first structured request
        self.sampled_step: SampledStep | None = None   # last step's sampling, its tokens not yet taken
        self.consecutive_failed_steps = 0
        self.consecutive_tp_restarts = 0
        self.num_tp_restarts = 0
        self.awaiting_grammar: list[Request] = []
        self.num_computed_prompt_tokens = 0   # prompt tokens run through the model (recomputation counts again)
        # called once a step: (batch launched now, batch whose tokens this step takes); a benchmark's
        # StepProfile (batchgen.bench) installs itself here
        self.on_step: Callable[[ScheduledBatch, ScheduledBatch | None], None] | None = None
        self.memory_profile: MemoryProfile | None = None   # measured on CUDA when the cache is sized
        use_graphs = self.device.type == "cuda" and not config.enforce_eager
        num_blocks = config.num_kv_blocks or self._num_blocks_that_fit(use_graphs)
        self._build_cache(num_blocks)
        self.kv_capacity_tokens = num_blocks * config.block_size
        if use_graphs:
            try:
                self.runner.capture_decode_graphs(self.scheduler.max_num_seqs, self.max_model_len)
            except EngineBroken:   # a tensor-parallel rank failed: no rank can go on
                raise
            except RuntimeError as exc:   # the engine still works eagerly; say why it is slower
                log.warning("CUDA graph capture failed, running decode eagerly: %s", exc)
                self.runner.decode_graphs = None
        measured = "" if self.memory_profile is None else (
            f" (measured beside it: a step's peak {self.memory_profile.step_peak_bytes / 2**30:.2f} GiB, CUDA graphs "
            f"{self.memory_profile.graph_pool_bytes / 2**30:.2f} GiB)")
        log.info("engine ready: %s on %s (%s), %s KV cache of %d tokens in %d blocks of %d%s, max_model_len %d",
                 self.model_path, self.device, self.dtype, self.runner.kv_cache_dtype, self.kv_capacity_tokens,
                 num_blocks, config.block_size, measured, self.max_model_len)
        self.ready = True

    def _build_cache(self, num_blocks: int) -> None:
        """A KV cache of `num_blocks` blocks and the scheduler over it (the context is capped by the cache)."""
        config = self.config
        self.runner.allocate_kv_cache(num_blocks)
        self.max_model_len = min(self._context_len(), num_blocks * config.block_size)
        max_num_batched_tokens = config.resolved_max_num_batched_tokens(self.device)
        if not config.enable_chunked_prefill:
            max_num_batched_tokens = max(max_num_batched_tokens, self.max_model_len)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, config.resolved_max_num_seqs(self.device), max_num_batched_tokens,
                                   config.enable_chunked_prefill,
                                   is_ready=lambda r: r.params.structured is None or r.grammar is not None,
                                   max_model_len=self.max_model_len,
                                   rope_position_offset=self.model_config.rope_position_offset,
                                   admission=config.kv_admission,
                                   decode_step_tokens=DECODE_STEP_TOKENS["cuda" if self.device.type == "cuda" else "cpu"])

    def _context_len(self) -> int:
        """The longest sequence asked for (config, capped by the model), before the cache caps it too."""
        return min(self.config.max_model_len or self.model_config.max_model_len, self.model_config.max_model_len)

    def _num_blocks_that_fit(self, use_graphs: bool) -> int:
        if self.config.kv_cache_bytes:   # a fixed size: nothing to measure
            return max(1, self.config.kv_cache_bytes // self.runner.kv_bytes_per_block)
        if self.device.type == "cpu":
            return cpu_kv_blocks(self.runner.kv_bytes_per_block, self.config.block_size,
                                 self.config.resolved_max_num_seqs(self.device), self._context_len())
        self.memory_profile = self._profile_memory(use_graphs)
        return self.runner.kv_blocks_that_fit(self.config.gpu_memory_utilization, self.memory_profile)

    def profile_requests(self) -> list[Request]:
        """The largest step the scheduler can form: max_num_seqs prompts (or one per token of the budget) that
        fill the token budget together, each sampled with every sampler feature that takes memory and scoring its
        prompt (prompt logprobs make full-vocab logits max_num_seqs rows at a time)."""
        budget = self.config.resolved_max_num_batched_tokens(self.device)
        if not self.config.enable_chunked_prefill:   # a whole prompt runs in one step, however long
            budget = max(budget, self._context_len() - 1)
        num_seqs = min(self.config.resolved_max_num_seqs(self.device), budget)
        longest = self._context_len() - 1
        lengths = [min(longest, budget // num_seqs + (i < budget % num_seqs)) for i in range(num_seqs)]
        params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=1.0, top_p=0.9, top_k=50, min_p=0.05,
                                presence_penalty=0.5, frequency_penalty=0.5, logprobs=20, prompt_logprobs=20)
        vocab = self.model_config.vocab_size
        return [Request(f"profile-{i}", [(i * 131 + j) % vocab for j in range(n)], params)
                for i, n in enumerate(lengths)]

    def _profile_memory(self, use_graphs: bool) -> MemoryProfile:
        """Run the engine's own step on its largest batch over a placeholder cache just big enough, and the
        largest decode graph on that cache: the memory they take beside the weights and the cache."""
        requests = self.profile_requests()
        self._build_cache(sum(-(-r.num_tokens // self.config.block_size) for r in requests) + 1)
        step_peak = self.runner.measure_peak_bytes(lambda: self.run(requests))
        graph_pool = 0
        if use_graphs:
            try:
                graph_pool = self.runner.measure_decode_graph_bytes(self.scheduler.max_num_seqs, self._context_len())
            except EngineBroken:
                raise
            except RuntimeError as exc:   # capture will fail again after sizing, and say so
                log.warning("CUDA graph capture failed while profiling memory: %s", exc)
        self.runner.release_kv_cache()
        self.sampler = Sampler(self.config.seed)   # seeded sampling starts where it would have without the profile
        self.num_computed_prompt_tokens = 0
        return MemoryProfile(step_peak, graph_pool)

    def close(self) -> None:
        """Stop the grammar threads and the other tensor-parallel ranks; the engine takes no work after this."""
        self.runner.close()
        if self.grammars is not None:
            self.grammars.shutdown()
            self.grammars = None

    # -- requests -----------------------------------------------------------------------------------
    def with_defaults(self, params: SamplingParams) -> SamplingParams:
        """The params with every field the caller left unset taken from `default_sampling`."""
        return with_defaults(params, self.default_sampling)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> str | None:
        """Why this request can't run, or None."""
        if (params.stop or params.structured) and self.tokenizer is None:
            return "stop strings and structured output need a tokenizer, and this model directory has none"
        if not prompt_token_ids:
            return "prompt is empty"
        if len(prompt_token_ids) >= self.max_model_len + (params.max_tokens == 0):
            return (f"prompt has {len(prompt_token_ids)} tokens; the context holds {self.max_model_len}, "
                    "so nothing could be generated")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            return f"prompt has token ids outside the vocabulary [0, {vocab})"
        return None

    def add_request(self, request: Request) -> None:
        request.eos_token_ids = self.eos_token_ids
        if request.scores_prompt:
            request.prompt_logprobs = [None] * request.num_prompt_tokens
        constraint = request.params.structured
        if constraint is not None:
            self._grammar_engine().start(constraint)
            self.awaiting_grammar.append(request)
        self.scheduler.add(request)

    def _grammar_engine(self) -> GrammarEngine:
        if self.grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured output needs a tokenizer, and this model directory has none")
            # a tokenizer borrowed for a dummy-weight model may not know the model's eos ids: then its own
            with self.tokenizer.borrowed() as hf:
                eos = [t for t in self.eos_token_ids if t < len(hf)] or [hf.eos_token_id]
                self.grammars = GrammarEngine(hf, eos, self.model_config.vocab_size)
        return self.grammars

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, requests: list[Request]) -> None:
        """Stop these requests and release their blocks (cancelled work)."""
        for request in requests:
            if not request.is_finished:
                request.finish("abort")
                self.scheduler.finish(request)

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Prepare this step's inputs, queue the previous step's sampling (if its grammar masks were still
        filling) and this step's forward pass, take in the previous step's tokens while the device runs it
        (stop checks, finished requests), then start this step's sampling. Tokens sampled last step reach
        the forward pass on the device, so the host's work overlaps the device's. Returns the requests that
        finished. Never raises for a request's sake: see `_recover`."""
        finished = self._attach_grammars()
        batch = self.scheduler.schedule()
        previous, self.sampled_step = self.sampled_step, None
        if self.on_step is not None:
            self.on_step(batch, previous and previous.batch)
        if not batch and previous is None:
            if self.awaiting_grammar:   # all that is left waits for grammar compiles: let them have the CPU
                time.sleep(GRAMMAR_POLL_S)
            return finished
        with torch.inference_mode():
            logits = launch_error = None
            if batch:
                try:
                    inputs = self.runner.prepare(batch)
                except Exception as exc:
                    launch_error = exc
            if previous is not None:
                try:
                    self._queue_sampling(previous)
                except Exception as exc:   # this step was to run on those tokens too
                    return finished + self._recover(previous.batch.requests + batch.requests, exc)
            if batch and launch_error is None:
                try:
                    logits = self._launch(batch, inputs, previous)
                except Exception as exc:
                    launch_error = exc
            if previous is not None:
                try:
                    finished += self._take_tokens(previous)
                except Exception as exc:   # this step ran on those tokens too
                    return finished + self._recover(previous.batch.requests + batch.requests, exc)
            if launch_error is not None:
                return finished + self._recover(batch.requests, launch_error)
            finished += self._finish_scored(batch)
            if logits is not None:
                try:
                    self.sampled_step = self._start_sampling(batch, logits, inputs.sampling_requests)
                except Exception as exc:
                    return finished + self._recover(batch.requests, exc)
        self.consecutive_failed_steps = self.consecutive_tp_restarts = 0
        return finished

    def _launch(self, batch: ScheduledBatch, inputs: StepInputs, previous: SampledStep | None) -> torch.Tensor:
        pending = None if previous is None else PendingTokens(
            previous.sample.token_ids, {request: row for row, request in enumerate(previous.requests)})
        logits = self.runner.execute(inputs, pending)
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            start = request.num_computed_tokens
            self.num_computed_prompt_tokens += max(0, min(request.num_prompt_tokens, start + num_new) - start)
            request.num_computed_tokens += num_new
            request.suspect = False
        return logits

    def _finish_scored(self, batch: ScheduledBatch) -> list[Request]:
        """Scoring requests (max_tokens 0) end once their whole prompt has run: nothing is sampled."""
        finished = []
        for request in batch.requests:
            if request.params.max_tokens == 0 and request.num_computed_tokens >= request.num_prompt_tokens:
                request.finish("length")
                self.scheduler.finish(request)
                finished.append(request)
        return finished

    def _take_tokens(self, step: SampledStep) -> list[Request]:
        """Append a step's sampled tokens (waiting for its sampling only) and apply the stop conditions."""
        sampled = step.sample.result()
        self.runner.check_healthy()   # tokens of a step whose collectives were aborted are not the model's
        finished = []
        for i, request in enumerate(step.requests):
            request.num_pending_tokens = 0
            if request.is_finished:          # aborted meanwhile
                continue
            self._append_token(request, sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i])
            if request.is_finished:
                self.scheduler.finish(request)
                finished.append(request)
        return finished

    def _start_sampling(self, batch: ScheduledBatch, logits: torch.Tensor, requests: list[Request]
                        ) -> SampledStep | None:
        """Sample the rows whose request is still alive (some just finished on the previous step's tokens:
        their row of this step is dropped): queued now, or once the grammar masks are filled."""
        live = [i for i, request in enumerate(requests) if not request.is_finished]
        if not live:
            return None
        if len(live) < len(requests):
            logits = logits.index_select(0, to_device(live, logits.device))
            requests = [requests[i] for i in live]
        for request in requests:
            request.num_pending_tokens = 1
        step = SampledStep(batch, requests, logits)
        if self.grammars is not None and any(r.grammar is not None for r in requests):
            step.masks = self.grammars.start_bitmask([r.grammar for r in requests])
        else:
            self._queue_sampling(step)
        return step

    def _queue_sampling(self, step: SampledStep) -> None:
        if step.sample is not None:
            return
        if step.masks is not None:
            bitmask = step.masks.result()
            if bitmask is not None:
                apply_bitmask(step.logits, bitmask)
        step.sample = self.sampler.sample(step.logits, step.requests)
        step.logits = step.masks = None

    def _recover(self, requests: list[Request], exc: Exception) -> list[Request]:
        """A step raised. Its K/V writes can't be trusted, so cached prefixes are forgotten and its requests
        are recomputed, each first by itself: a request that fails alone MAX_SOLO_FAILURES times ends with an
        error, and the rest of the work never notices. Steps that keep failing mean a broken engine. Under
        tensor parallelism the ranks were stopped (peers can't run a request alone): they restart, and every
        request that had K/V in their caches is recomputed, all together."""
        if isinstance(exc, RanksStopped) and self.ready:
            self._restart_ranks(exc)
            requests = requests + self.scheduler.running
            isolate = False
        elif isinstance(exc, EngineBroken):
            raise exc
        else:
            self.consecutive_failed_steps += 1
            if self.consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
                raise EngineBroken(f"{self.consecutive_failed_steps} steps failed in a row, the last with "
                                   f"{type(exc).__name__}: {exc}") from exc
            isolate = True
        requests = list(dict.fromkeys(requests))
        if isolate:
            log.warning("step of %d requests failed (%s: %s); isolating them", len(requests), type(exc).__name__,
                        exc)
        self.kv_cache.forget_cached_prefixes()
        finished = []
        for request in requests:
            request.num_pending_tokens = 0   # a token sampled by a failed step is dropped
            if request.is_finished:          # finished earlier in the failed step
                finished.append(request)
                continue
            if isolate:
                if len(requests) == 1:
                    request.num_failures += 1
                if request.num_failures >= MAX_SOLO_FAILURES:
                    request.error = f"the engine failed on this request {request.num_failures} times: " \
                                    f"{type(exc).__name__}: {exc}"
                    request.finish("error")
                    self.scheduler.finish(request)
                    finished.append(request)
                    continue
                request.suspect = True
            self.scheduler.preempt(request)
        return finished

    def _restart_ranks(self, exc: RanksStopped) -> None:
        """Start the stopped tensor-parallel ranks again, at most MAX_TP_RESTARTS times in a row; EngineBroken
        (naming the failed rank and its error) past that or if they can't start."""
        if self.consecutive_tp_restarts >= MAX_TP_RESTARTS:
            raise EngineBroken(f"{exc}; gave up after {self.consecutive_tp_restarts} restarts of the ranks "
                               "in a row") from exc
        self.consecutive_tp_restarts += 1
        log.warning("tensor-parallel step failed: %s; restarting the ranks and recomputing their requests "
                    "(restart %d of at most %d in a row)", exc, self.consecutive_tp_restarts, MAX_TP_RESTARTS)
        try:
            self.runner.restart()
        except Exception as restart_exc:
            raise EngineBroken(f"{exc}; restarting the ranks failed: {restart_exc}") from restart_exc
        self.num_tp_restarts += 1

    def _attach_grammars(self) -> list[Request]:
        """Give each constrained request its matcher once its grammar has compiled (compiles run in
        threads, off this loop); a grammar that fails to compile ends its request with the reason."""
        failed, still_waiting = [], []
        for request in self.awaiting_grammar:
            if request.is_finished:
                continue
            if not self.grammars.ready(request.params.structured):
                still_waiting.append(request)
                continue
            try:
                request.grammar = self.grammars.matcher(request.params.structured)
            except StructuredOutputError as exc:
                request.error = f"structured output: {exc}"
                request.finish("error")
                self.scheduler.finish(request)
                failed.append(request)
        self.awaiting_grammar = still_waiting
        return failed

    def _append_token(self, request: Request, token_id: int, logprob: float, top: TokenLogprobs | None) -> None:
        request.output_token_ids.append(token_id)
        request.cumulative_logprob += logprob
        if top is not None:
            if request.logprobs is None:
                request.logprobs = []
            request.logprobs.append(top)
        params = request.params
        num_output = len(request.output_token_ids)
        if request.grammar is not None:
            if not request.grammar.accept_token(token_id):
                request.error = f"structured output: {request.grammar.error}"
                request.finish("error")
                return
            if request.grammar.is_terminated():
                request.finish("stop")
                return
        if num_output >= params.min_tokens:   # (the sampler keeps eos and stop ids out until then)
            if token_id in request.eos_token_ids and not params.ignore_eos:
                request.finish("stop")
                return
            if token_id in params.stop_token_ids:
                request.finish("stop", token_id)
                return
            if params.stop:
                found = self.tokenizer.find_new_stop(request.output_token_ids, params.stop,
                                                     self.tokenizer.stop_window(params.stop))
                if found:
                    request.finish("stop", found[0])
                    return
        if num_output >= params.max_tokens or request.num_tokens >= self.max_model_len:
            request.finish("length")
            if request.grammar is not None and not request.grammar.is_complete():
                request.error = "output cut off by the length limit before the structured output was complete"

    def output_text(self, request: Request) -> str:
        """The request's completion text; a stop string and what follows it are cut off (unless asked for)."""
        params = request.params
        if isinstance(request.stop_reason, str):
            found = self.tokenizer.find_new_stop(request.output_token_ids, [request.stop_reason],
                                                 skip_special_tokens=params.skip_special_tokens)
            if found:
                return found[1] + (request.stop_reason if params.include_stop_str_in_output else "")
        return self.decode(request.output_token_ids, params.skip_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of the tokens; empty for a model without a tokenizer."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def run(self, requests: list[Request], should_stop: Callable[[], bool] | None = None) -> None:
        """Add the requests and step until none is unfinished; when `should_stop()` turns true (it is asked
        every step), drop them and raise Cancelled. On any exception the requests leave the engine."""
        for request in requests:
            self.add_request(request)
        try:
            while self.has_unfinished():
                if should_stop is not None and should_stop():
                    raise Cancelled()
                self.step()
        except BaseException:
            self.abort(requests)
            raise
