"""Structured output: grammars for `StructuredOutput` constraints, per-request matchers, one token bitmask per step.

Built on llguidance (docs/structured-output.md says why, with the numbers). Its matchers compute a
32-bit-per-word mask of the tokens the grammar allows next; the engine applies the mask to the logits
before sampling and feeds every sampled token back to the request's matcher.

How the engine uses it (one `GrammarEngine` per tokenizer, called from the engine's thread; compiles run on
the compile threads, a step's mask fills on the mask thread while the engine prepares the next step):
  add_request   grammars.start(constraint)                 compile in the background
  schedule      grammars.ready(constraint)                 admit the request only when True
  admit         request.grammar = grammars.matcher(constraint)   (StructuredOutputError -> that row's error)
  sample        masks = grammars.start_bitmask([r.grammar for r in rows])   (fill_bitmask on the mask thread)
                next step: bitmask = masks.result(); if bitmask is not None: apply_bitmask(logits, bitmask)
  update        if not request.grammar.accept_token(token): finish with request.grammar.error
                if request.grammar.is_terminated(): finish with reason "stop"
"""
import functools
import json
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from batchgen.engine.grammar import StructuredOutputError, describe, grammar
from batchgen.sampling_params import StructuredOutput

def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits[i, j] to -inf, in place, wherever bit j of row i of `bitmask` is 0.

    logits: [S, V] on any device; bitmask: int32 [S, ceil(V/32)] (CPU, from `fill_bitmask`), copied to the
    logits' device here. Ids past the mask's last word count as disallowed.
    """
    num_rows, width = logits.shape
    if bitmask.shape[0] != num_rows or bitmask.shape[1] * 32 < width:
        raise ValueError(f"bitmask {tuple(bitmask.shape)} does not cover logits {tuple(logits.shape)}")
    words = bitmask.to(logits.device, non_blocking=True).contiguous()
    # Little-endian: byte k of word w holds the bits of ids 32*w + 8*k .. 32*w + 8*k + 7, so the uint8 view
    # unpacks in token order with an [S, V]-byte temporary instead of an [S, V]-int32 one.
    allowed = words.view(torch.uint8).view(num_rows, -1, 1).bitwise_and(_bit_values(logits.device))
    logits.masked_fill_(allowed.view(num_rows, -1)[:, :width] == 0, float("-inf"))


@functools.cache
def _bit_values(device: torch.device) -> torch.Tensor:
    # made once per device: building it each step would be a synchronous host-to-GPU copy
    return torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)


class GrammarMatcher:
    """One request's position in its grammar, advanced with every token the request generates.

    Preemption needs nothing here: the engine keeps the generated tokens, so the matcher keeps its state.
    """

    __slots__ = ("_matcher",)

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        """Advance by one generated token. False if the grammar does not allow it; the matcher then stays
        in an error state (see `error`) and the request cannot continue under its constraint."""
        return self._matcher.consume_token(token_id)

    def is_terminated(self) -> bool:
        """True when the output is complete and nothing but EOS may follow (or EOS was accepted): the engine
        can finish the request with reason "stop" without spending a step on the EOS."""
        return self._matcher.is_stopped()

    def is_complete(self) -> bool:
        """True when the tokens so far form a whole match (EOS would be allowed now). A request cut by
        max_tokens while this is False holds a broken value, not an output of the constraint."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        """Why the matcher refused a token, or None."""
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error().split("<state>")[0].strip()


class GrammarEngine:
    """Compiled grammars for one tokenizer (cached, compiled off the step loop) and the step's token bitmask.

    Not thread-safe: call it from the engine's thread; compilation runs in its own worker threads, and
    `start_bitmask` fills the mask on another thread while the engine prepares the next step (the step's
    matchers must not advance until its future is done).
    """

    def __init__(self, tokenizer, eos_token_ids: Iterable[int], vocab_width: int, *,
                 compile_threads: int = 2, mask_threads: int | None = None, max_cached: int = 1024):
        """tokenizer: the model's Hugging Face fast tokenizer. eos_token_ids: the only tokens allowed once a
        constrained output is complete. vocab_width: the model's logits width, which may exceed the
        tokenizer's vocab (padded ids are never allowed in a constrained row). mask_threads: threads that
        fill the bitmask (None: llguidance's default, most of the CPUs)."""
        if vocab_width < len(tokenizer):
            raise ValueError(f"logits width {vocab_width} is smaller than the tokenizer's vocab ({len(tokenizer)})")
        eos_token_ids = sorted(eos_token_ids)
        if not eos_token_ids:
            raise ValueError("structured output needs at least one EOS token id")
        self.vocab_width = vocab_width
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_width, eos_token=eos_token_ids)
        self._compile_pool = ThreadPoolExecutor(compile_threads, thread_name_prefix="grammar-compile")
        self._mask_executor = llguidance.LLExecutor(mask_threads)
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._max_cached = max_cached
        # constraint key -> future of a matcher at the grammar's start; requests get deep copies of it,
        # which are cheap and share its lexer cache
        self._compiled: OrderedDict[str, Future] = OrderedDict()
        self._bitmask = self._allocate_bitmask(64)

    def start(self, constraint: StructuredOutput) -> None:
        """Begin compiling `constraint` in the background (no-op when cached or under way)."""
        self._future(constraint)

    def ready(self, constraint: StructuredOutput) -> bool:
        """Non-blocking: has `constraint` finished compiling (successfully or not)? Starts it if needed."""
        return self._future(constraint).done()

    def matcher(self, constraint: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for one request (blocks if not `ready`). Raises StructuredOutputError when the
        constraint cannot be compiled."""
        try:
            compiled = self._future(constraint).result()
        except StructuredOutputError as error:
            # a fresh error per row: re-raising the cached one would grow its traceback with every row
            raise StructuredOutputError(str(error)) from None
        return GrammarMatcher(compiled.deep_copy())

    def fill_bitmask(self, matchers: list[GrammarMatcher | None]) -> torch.Tensor | None:
        """The step's int32 [S, ceil(vocab_width/32)] allowed-token mask, row i from matchers[i] (None:
        unconstrained, all ones); None when no row is constrained.

        The tensor is a reused buffer that the next call overwrites: apply it first (the engine syncs on
        the sampled tokens every step, which also finishes apply_bitmask's copy to the GPU).
        """
        rows = [(m._matcher, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if len(matchers) > self._bitmask.shape[0]:
            self._bitmask = self._allocate_bitmask(max(len(matchers), 2 * self._bitmask.shape[0]))
        bitmask = self._bitmask[:len(matchers)]
        bitmask.fill_(-1)
        llguidance.torch.fill_next_token_bitmask_par(self._mask_executor, rows, bitmask)
        return bitmask

    def start_bitmask(self, matchers: list[GrammarMatcher | None]) -> Future:
        """`fill_bitmask` on the mask thread (llguidance releases the GIL while it works)."""
        return self._mask_thread.submit(self.fill_bitmask, matchers)

    def shutdown(self) -> None:
        """Stop the compile and mask threads, waiting for the compile or mask under way (pending compiles
        are dropped)."""
        self._compile_pool.shutdown(wait=True, cancel_futures=True)
        self._mask_thread.shutdown(wait=True, cancel_futures=True)

    def _future(self, constraint: StructuredOutput) -> Future:
        key = json.dumps(constraint.model_dump(), sort_keys=True)
        future = self._compiled.get(key)
        if future is not None:
            self._compiled.move_to_end(key)
            return future
        future = self._compile_pool.submit(self._compile, constraint)
        self._compiled[key] = future
        self._evict()
        return future

    def _evict(self) -> None:
        excess = len(self._compiled) - self._max_cached
        if excess <= 0:
            return
        # oldest first; compiles still running are kept because their requests are waiting on them
        for key in [k for k, f in self._compiled.items() if f.done()][:excess]:
            del self._compiled[key]

    def _compile(self, constraint: StructuredOutput) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer, grammar(constraint), log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(describe(constraint, matcher.get_error()))
        return matcher

    def _allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        # pinned, so that apply_bitmask's copy to the GPU is asynchronous
        return torch.full((num_rows, (self.vocab_width + 31) // 32), -1, dtype=torch.int32,
                          pin_memory=torch.cuda.is_available())
