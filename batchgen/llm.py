"""The offline API: `LLM(model=...).generate(prompts, params)` and `.chat(conversations, params)`.

All prompts are known up front, so they are handed to the engine sorted by token ids (shared prefixes run
together and hit the prefix cache); results come back in input order. A prompt that can't run (empty, too
long, bad chat messages) gets an output with `error` set; it never fails the others.
"""
import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from batchgen.config import EngineConfig
from batchgen.engine.beam_search import BeamGroup, beam_search
from batchgen.engine.engine import Engine
from batchgen.engine.request import Request
from batchgen.outputs import CompletionOutput, RequestOutput
from batchgen.preflight import check_triton_can_build
from batchgen.sampling_params import SamplingParams

Prompt = str | Sequence[int]


@contextmanager
def _heap_frozen() -> Iterator[None]:
    """Python's full garbage collections skip the objects alive when this starts (an engine's model, kernels and
    graphs: hundreds of thousands) until it ends, so one during a run walks only what the run made: on the H200 a
    full collection in W1's last step took 0.27-0.36 s, 1.2-1.5% of the run (docs/benchmarks.md, twentieth
    session). Unfrozen after, so what became garbage meanwhile is collected again (a run of another thread that
    ends first unfreezes early: slower, never wrong)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class LLM:
    def __init__(self, model: str = "default", **engine_args):
        config = EngineConfig(model=model, **engine_args)
        check_triton_can_build(config.resolved_device())   # fail here, not at the first kernel launch
        self.engine = Engine(config)

    def close(self) -> None:
        """Release the engine's threads (grammar compiles and masks) and stop its tensor-parallel ranks."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def tokenizer(self):
        if self.engine.tokenizer is None:
            raise ValueError(f"{self.engine.model_path} has no tokenizer: pass token ids, not text")
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 cache_salt: str | None = None) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids used as given). Prompts share cached prefixes only with
        requests of the same `cache_salt` (see `generate_tokens`)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [list(p) if not isinstance(p, str) else self.tokenizer.encode(p) for p in prompts]
        return self.generate_tokens(encoded, sampling_params, cache_salt=cache_salt)

    def chat(self, conversations: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, *, cache_salt: str | None = None) -> list[RequestOutput]:
        """Answer each conversation (a list of {"role", "content"} messages) through the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        encoded: list[list[int] | Exception] = []
        for messages in conversations:
            try:
                encoded.append(self.tokenizer.encode_chat(messages, add_generation_prompt))
            except Exception as exc:   # a template error belongs to this conversation only
                encoded.append(exc)
        return self.generate_tokens(encoded, sampling_params, cache_salt=cache_salt)

    def generate_tokens(self, prompts: Sequence[list[int] | Exception],
                        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                        should_stop: Callable[[], bool] | None = None,
                        cache_salt: str | None = None) -> list[RequestOutput]:
        """Complete prompts given as token ids; an Exception in place of a prompt (e.g. a chat template
        failure while encoding it) comes back as that prompt's error. Raises
        `batchgen.engine.errors.Cancelled` once `should_stop()` turns true. Requests reuse cached KV blocks
        only from requests with the same `cache_salt` (None is a salt too): a job or tenant with its own salt
        keeps its prefixes to itself."""
        return self.run_requests(prompts, sampling_params, lambda requests: self.engine.run(requests, should_stop),
                                 cache_salt)

    def run_requests(self, prompts: Sequence[list[int] | Exception],
                     sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                     run: Callable[[list[Request]], None], cache_salt: str | None = None) -> list[RequestOutput]:
        """Turn prompts into engine requests (under `cache_salt`), have `run` take them to completion (the
        engine's own loop, or an EngineLoop shared by threads), and assemble the outputs in input order."""
        with _heap_frozen():   # the model and everything else alive before the run outlive it
            params = self._with_defaults(_per_prompt(sampling_params, len(prompts)))
            outputs: list[RequestOutput | None] = [None] * len(prompts)
            sampled: list[Request] = []
            beams: list[BeamGroup] = []
            for index, (prompt, p) in enumerate(zip(prompts, params)):
                error = f"{type(prompt).__name__}: {prompt}" if isinstance(prompt, Exception) else \
                    self.engine.check_request(prompt, p)
                if error:
                    outputs[index] = RequestOutput(str(index), [] if isinstance(prompt, Exception) else prompt, [],
                                                   error=error)
                elif p.beam_width > 1:
                    beams.append(BeamGroup(index, prompt, p, self.engine.eos_token_ids, self.max_model_len, cache_salt))
                else:
                    sampled += [Request(f"{index}-{j}", prompt, p, group_index=index, sample_index=j,
                                        cache_salt=cache_salt) for j in range(p.n)]

            sampled.sort(key=lambda r: (r.prompt_token_ids, r.sample_index))
            run(sampled)
            by_group: dict[int, list[Request]] = {}
            for request in sampled:
                by_group.setdefault(request.group_index, []).append(request)
            for index, requests in by_group.items():
                requests.sort(key=lambda r: r.sample_index)
                outputs[index] = RequestOutput(
                    str(index), requests[0].prompt_token_ids,
                    [self._completion(r) for r in requests],
                    num_cached_tokens=requests[0].num_cached_tokens, prompt_logprobs=requests[0].prompt_logprobs,
                    num_preemptions=sum(r.num_preemptions for r in requests),
                    error=next((r.error for r in requests if r.error), None))

            beam_search(beams, run)
            for group in beams:
                outputs[group.group_index] = RequestOutput(
                    str(group.group_index), group.prompt_token_ids,
                    [self._beam_completion(i, group, beam) for i, beam in enumerate(group.best())])
            return outputs

    def _with_defaults(self, params: list[SamplingParams]) -> list[SamplingParams]:
        """The model's sampling defaults filled into each params' unset fields (once per distinct object:
        a job's rows mostly share one)."""
        resolved: dict[int, SamplingParams] = {}
        for p in params:
            if id(p) not in resolved:
                resolved[id(p)] = self.engine.with_defaults(p)
        return [resolved[id(p)] for p in params]

    def _completion(self, request: Request) -> CompletionOutput:
        return CompletionOutput(index=request.sample_index, text=self.engine.output_text(request),
                                token_ids=request.output_token_ids, finish_reason=request.finish_reason,
                                logprobs=request.logprobs, cumulative_logprob=request.cumulative_logprob,
                                stop_reason=request.stop_reason)

    def _beam_completion(self, index: int, group: BeamGroup, beam) -> CompletionOutput:
        ended_by_eos = beam.token_ids[-1] in group.eos_token_ids
        text = self.engine.decode(beam.token_ids, group.params.skip_special_tokens)
        return CompletionOutput(index=index, text=text, token_ids=beam.token_ids,
                                finish_reason="stop" if ended_by_eos else "length", cumulative_logprob=beam.score)


def _per_prompt(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if len(sampling_params) != count:
        raise ValueError(f"got {len(sampling_params)} sampling params for {count} prompts")
    return list(sampling_params)
