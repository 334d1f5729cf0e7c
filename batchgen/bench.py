"""`batchgen bench`: throughput on a synthetic workload, with Hugging Face transformers measured in the same
run on the same prompts (static batched `generate`, and continuous batching `generate_batch`).

Prompts are random token ids (optionally behind one shared prefix), outputs are forced to their full length
(ignore_eos), so every system does the same work. One JSON line per system goes to stdout.
"""
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

import click
import torch

from batchgen.cli import engine_options, engine_settings
from batchgen.engine.scheduler import ScheduledBatch
from batchgen.sampling_params import SamplingParams, StructuredOutput


@dataclass
class StepProfile:
    """Where the engine's time goes, for benchmarks: steps, tokens and wall seconds by kind of batch, "decode"
    (one token per request) or "mixed" (prefill chunks too). A step call mostly waits for the device to
    finish the step whose tokens it takes, so its time is booked to that step's kind. Every `report_every`
    seconds a progress line goes to stderr: a run cut short by a time limit still shows its rate."""
    report_every: float = 30.0
    steps: dict[str, int] = field(default_factory=lambda: {"decode": 0, "mixed": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"decode": 0, "mixed": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "mixed": 0.0})
    _booking: tuple[str, float] | None = None
    _reported: float = field(default_factory=time.perf_counter)

    def record(self, launched: ScheduledBatch, taken: ScheduledBatch | None) -> None:
        now = time.perf_counter()
        if self._booking is not None:
            kind, since = self._booking
            self.seconds[kind] += now - since
        if launched:
            kind = _kind(launched)
            self.steps[kind] += 1
            self.tokens[kind] += launched.num_tokens
        self._booking = None if taken is None else (_kind(taken), now)
        if now - self._reported >= self.report_every:
            self._reported = now
            print(f"bench progress: {json.dumps(self.summary())}", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        return {kind: {"steps": self.steps[kind], "tokens": self.tokens[kind],
                       "seconds": round(self.seconds[kind], 3)} for kind in self.steps}


def _kind(batch: ScheduledBatch) -> str:
    return "decode" if batch.num_tokens == len(batch) else "mixed"


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    ignore_eos: bool = True     # False: outputs end at EOS (real prompts); the tokens generated are counted
    structured: StructuredOutput | None = None   # every output constrained (ends when the value is complete)
    temperature: float = 1.0
    top_p: float = 1.0
    score: bool = False         # prompt logprobs of every prompt token, nothing generated

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def sample(self, count: int) -> "Workload":
        return replace(self, prompts=self.prompts[:count], output_lens=self.output_lens[:count])


def make_workload(name: str, num_requests: int, input_len: int, output_len: int, vocab_size: int, *,
                  prefix_len: int = 0, input_len_max: int | None = None, output_len_max: int | None = None,
                  seed: int = 0) -> Workload:
    """Input/output lengths fixed, or uniform in [len, len_max]; every prompt starts with the same
    `prefix_len` tokens."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_size) for _ in range(prefix_len)]
    prompts, output_lens = [], []
    for _ in range(num_requests):
        length = rng.randint(input_len, input_len_max or input_len)
        prompts.append(prefix + [rng.randrange(vocab_size) for _ in range(length)])
        output_lens.append(rng.randint(output_len, output_len_max or output_len))
    return Workload(name, prompts, output_lens)


def dataset_workload(name: str, path: str, tokenizer, num_requests: int, output_len: int) -> Workload:
    """Real prompts: rows of a JSONL file with `prompt` text or chat `messages`, cycled to `num_requests`;
    generation ends at EOS (or output_len)."""
    with open(path) as rows:
        records = [json.loads(line) for line in rows if line.strip()]
    encoded = [tokenizer.encode_chat(r["messages"]) if "messages" in r else tokenizer.encode(r["prompt"])
               for r in records]
    prompts = [encoded[i % len(encoded)] for i in range(num_requests)]
    return Workload(name, prompts, [output_len] * num_requests, ignore_eos=False)


def code_commit() -> str:
    """The code a benchmark ran, for its figures: $BATCHGEN_COMMIT when set (a copy sent to a GPU machine may
    carry another commit's git history), else the working directory's git HEAD."""
    if os.environ.get("BATCHGEN_COMMIT"):
        return os.environ["BATCHGEN_COMMIT"]
    described = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    return described.stdout.strip() or "unknown"


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _figures(system: str, workload: Workload, elapsed: float, output_tokens: int, prompt_tokens: int,
             device: torch.device, **extra) -> dict:
    return {"system": system, "workload": workload.name, "requests": len(workload.prompts),
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(len(workload.prompts) / elapsed, 3),
            "output_tok_per_s": round(output_tokens / elapsed, 1),
            "prompt_tok_per_s": round(prompt_tokens / elapsed, 1),
            "total_tok_per_s": round((output_tokens + prompt_tokens) / elapsed, 1),
            "temperature": workload.temperature, "top_p": workload.top_p,
            "card": card_name(device), **extra}


def run_batchgen(llm, workload: Workload) -> tuple[dict, list[int]]:
    """The figures, and each request's number of output tokens."""
    if workload.score:
        params = [SamplingParams(max_tokens=0, prompt_logprobs=0)] * len(workload.prompts)
    else:
        params = [SamplingParams(temperature=workload.temperature, top_p=workload.top_p, max_tokens=n,
                                 ignore_eos=workload.ignore_eos, structured=workload.structured)
                  for n in workload.output_lens]
    llm.generate(workload.prompts[:4], params[:4])    # warm up kernels outside the timed run
    device = llm.engine.device
    profile = StepProfile()
    llm.engine.on_step = profile.record
    _synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, params)
    _synchronize(device)
    elapsed = time.perf_counter() - start
    errors = [o.error for o in outputs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} benchmark requests failed, first: {errors[0]}")
    engine = llm.engine
    figures = _figures("batchgen", workload, elapsed, sum(o.completion_tokens for o in outputs),
                    workload.num_prompt_tokens, device, dtype=str(engine.dtype).removeprefix("torch."),
                    quantization=engine.config.quantization,
                    tensor_parallel_size=engine.config.tensor_parallel_size,
                    kv_cache_dtype=str(engine.runner.kv_cache_dtype).removeprefix("torch."),
                    kv_blocks=engine.kv_cache.num_blocks, block_size=engine.kv_cache.block_size,
                    kv_capacity_tokens=engine.kv_capacity_tokens,
                    max_num_seqs=engine.scheduler.max_num_seqs,
                    max_num_batched_tokens=engine.scheduler.max_num_batched_tokens,
                    cuda_graphs=engine.runner.decode_graphs is not None,
                    prefix_cache_hit_tokens=engine.kv_cache.num_hit_tokens,
                    preemptions=sum(o.num_preemptions for o in outputs), steps=profile.summary())
    return figures, [o.completion_tokens for o in outputs]


def load_hf_model(model_dir, dtype: torch.dtype, device: torch.device, dummy: bool):
    from transformers import AutoConfig, AutoModelForCausalLM
    if dummy:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model.eval()


def _hf_sampling(workload: Workload, max_new_tokens: int, **extra):
    from transformers import GenerationConfig
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=workload.temperature,
                            top_p=workload.top_p, top_k=0, **extra)


@torch.inference_mode()
def run_hf_static(model, workload: Workload, batch_size: int) -> dict:
    """Batches of `batch_size` left-padded prompts through `generate`; each batch runs to its longest output,
    and only the tokens each request asked for count."""
    device = model.device
    pad = 0
    eos = set(_eos_ids(model))
    produced = 0
    start = time.perf_counter()
    for first in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[first:first + batch_size]
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        new_tokens = max(workload.output_lens[first:first + batch_size])
        extra = {"min_new_tokens": new_tokens} if workload.ignore_eos else {}
        generated = model.generate(ids, attention_mask=mask, generation_config=_hf_sampling(
            workload, new_tokens, pad_token_id=pad, **extra))[:, longest:].tolist()
        for row, wanted in zip(generated, workload.output_lens[first:first + batch_size]):
            produced += wanted if workload.ignore_eos else _until_eos(row, eos)
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return _figures("hf-static", workload, elapsed, produced, workload.num_prompt_tokens, device,
                    batch_size=batch_size, attn_implementation=model.config._attn_implementation)


@torch.inference_mode()
def run_hf_score(model, workload: Workload, batch_size: int) -> dict:
    """What a scoring job computes, with HF: forward passes over batches of right-padded prompts, then each
    prompt token's logprob (fp32 log-softmax of its logits, gathered)."""
    device = model.device
    start = time.perf_counter()
    for first in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[first:first + batch_size]
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts], device=device)
        logits = model(ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            targets = torch.tensor(prompt[1:], device=device)[:, None]
            torch.log_softmax(logits[row, :len(prompt) - 1].float(), dim=-1).gather(1, targets).sum()
        del logits
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return _figures("hf-forward", workload, elapsed, 0, workload.num_prompt_tokens, device, batch_size=batch_size,
                    attn_implementation=model.config._attn_implementation)


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _until_eos(token_ids: list[int], eos: set[int]) -> int:
    """Tokens generated up to and including the first EOS (the rest of a static batch's row is padding)."""
    return next((i + 1 for i, t in enumerate(token_ids) if t in eos), len(token_ids))


@torch.no_grad()     # not inference_mode: generate_batch updates its buffers in place from its own thread
def run_hf_continuous(model, workload: Workload) -> dict:
    """transformers' own continuous batching (`generate_batch`); it stops a request at eos, so the tokens it
    actually produced are counted."""
    device = model.device
    start = time.perf_counter()
    results = model.generate_batch(inputs=workload.prompts, progress_bar=False,
                                   generation_config=_hf_sampling(workload, max(workload.output_lens)))
    _synchronize(device)
    elapsed = time.perf_counter() - start
    produced = sum(len(r.generated_tokens) for r in results.values())
    if not produced:
        raise RuntimeError("generate_batch produced no tokens (its log says why)")
    return _figures("hf-generate_batch", workload, elapsed, produced, workload.num_prompt_tokens, device)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@click.command("bench")
@click.option("--model", default="default", show_default=True, help="Model directory, hub id or 'default'.")
@click.option("--load-format", type=click.Choice(["safetensors", "dummy"]), default="safetensors",
              show_default=True, help="dummy: random weights of the config's shape (no weight files needed).")
@click.option("--name", default="custom", show_default=True, help="Workload name in the JSON lines.")
@click.option("--num-requests", type=int, default=64, show_default=True)
@click.option("--input-len", type=int, default=128, show_default=True)
@click.option("--input-len-max", type=int, default=None, help="Draw input lengths uniformly up to this.")
@click.option("--output-len", type=int, default=64, show_default=True)
@click.option("--output-len-max", type=int, default=None, help="Draw output lengths uniformly up to this.")
@click.option("--prefix-len", type=int, default=0, show_default=True, help="Shared prefix before every prompt.")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False),
              help="Real prompts instead of random tokens: JSONL rows with 'prompt' or 'messages', cycled to "
                   "--num-requests; outputs end at EOS or --output-len, for every system.")
@click.option("--schema", "schema_file", type=click.Path(exists=True, dir_okay=False),
              help="Constrain every batchgen output to this JSON schema (an output then ends when its value is "
                   "complete; output tok/s counts what was generated).")
@click.option("--tokenizer", help="Tokenizer directory, for a model directory without one (dummy weights); "
              "needed by --schema and --dataset.")
@engine_options
@click.option("--max-num-seqs", type=int, default=None)
@click.option("--max-num-batched-tokens", type=int, default=None)
@click.option("--max-model-len", type=int, default=None)
@click.option("--enforce-eager", is_flag=True, help="No CUDA graphs.")
@click.option("--score", is_flag=True, help="Scoring throughput: every prompt token's logprob, nothing generated "
              "(prompt_tok_per_s); --hf-static-batch then times HF's forward pass on the same prompts.")
@click.option("--hf-static-batch", type=int, default=0, help="Also run HF generate in batches of this size.")
@click.option("--hf-continuous", is_flag=True, help="Also run HF generate_batch (continuous batching).")
@click.option("--hf-sample", type=int, default=None, help="Run the HF systems on the first N requests only.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def bench_command(model, load_format, name, num_requests, input_len, input_len_max, output_len, output_len_max,
                  prefix_len, dataset, schema_file, tokenizer, dtype, device, quantization, tensor_parallel_size,
                  kv_cache_dtype, engine_args, allow_pickle_weights,
                  max_num_seqs, max_num_batched_tokens, max_model_len, enforce_eager, score, hf_static_batch,
                  hf_continuous, hf_sample, temperature, top_p, seed):
    """Throughput benchmark; prints one JSON line per system (batchgen, then the HF peers)."""
    from batchgen.llm import LLM

    settings = engine_settings(dtype, device, quantization, kv_cache_dtype, tensor_parallel_size, engine_args,
                               allow_pickle_weights)
    settings.update({k: v for k, v in dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                           max_model_len=max_model_len, tokenizer=tokenizer).items() if v})
    # the sampling timed is the flags' own, not the model's defaults
    llm = LLM(model, load_format=load_format, enforce_eager=enforce_eager, seed=seed, generation_config="none",
              **settings)
    if dataset:
        workload = dataset_workload(name, dataset, llm.tokenizer, num_requests, output_len)
    else:
        workload = make_workload(name, num_requests, input_len, output_len, llm.engine.model_config.vocab_size,
                                 prefix_len=prefix_len, input_len_max=input_len_max, output_len_max=output_len_max,
                                 seed=seed)
    workload.temperature, workload.top_p, workload.score = temperature, top_p, score
    if schema_file:
        with open(schema_file) as source:
            workload.structured = StructuredOutput(json_schema=json.load(source))
    model_dir, torch_dtype, torch_device = llm.engine.model_path, llm.engine.dtype, llm.engine.device
    figures, output_lens = run_batchgen(llm, workload)
    print(json.dumps(figures | {"model": str(model)}), flush=True)
    if workload.structured is not None:
        # the cost of the constraint alone: the same prompts unconstrained, each forced to the length its
        # constrained output had (constrained outputs end when the value closes)
        matched = replace(workload, name=f"{name}-unconstrained", output_lens=output_lens, structured=None)
        print(json.dumps(run_batchgen(llm, matched)[0] | {"model": str(model)}), flush=True)
    if not (hf_static_batch or hf_continuous):
        return
    del llm
    _release_memory()
    hf_model = load_hf_model(model_dir, torch_dtype, torch_device, dummy=load_format == "dummy")
    hf_workload = workload.sample(hf_sample) if hf_sample else workload
    if score:
        if hf_static_batch:
            print(json.dumps(run_hf_score(hf_model, hf_workload, hf_static_batch) | {"model": str(model)}), flush=True)
        return
    if hf_static_batch:
        print(json.dumps(run_hf_static(hf_model, hf_workload, hf_static_batch) | {"model": str(model)}), flush=True)
    if hf_continuous:
        try:
            figures = run_hf_continuous(hf_model, hf_workload)
        except Exception as exc:   # report a peer that can't run instead of losing the batchgen figures
            figures = {"system": "hf-generate_batch", "workload": name, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(figures | {"model": str(model)}), flush=True)
