"""Engine vs Hugging Face transformers on the GPU, on a real-shaped model with random weights.

1. Logits: 32 sequences of mixed lengths go through the engine's own data path (scheduler, KV block manager,
   model runner with Triton kernels and decode CUDA graphs) with a small token budget, so prompts are split
   into chunked prefills mixed with decodes; after the prompt, the sequence's own next tokens are fed back
   (teacher forcing) through decode steps. The logits of every position are compared with HF's forward of
   the whole sequence: relative L2 error per sequence, bf16.
2. Greedy: fp32 greedy generation through `LLM.generate` must equal HF `generate` token for token.
3. fp8 KV cache: the same sequences' logits with an fp8 cache against the bf16 cache's (relative L2, reported);
   the Triton kernels must be no farther from the bf16 cache than the torch references with the same fp8 cache.

Runs on CPU too (tiny shapes) as a dry run: `python benchmarks/gpu_correctness.py --dry-run`.
Prints one JSON line per check and exits 1 if any fails.
"""
import argparse
import gc
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from batchgen import LLM, SamplingParams
from batchgen.engine.request import Request
from batchgen.engine.scheduler import ScheduledBatch
from batchgen.kernels.testing import relative_l2

CONFIGS = Path(__file__).parent / "configs"


def hf_random_model(config_dir: Path, dtype: torch.dtype, device: torch.device, seed: int, overrides: dict):
    config = AutoConfig.from_pretrained(config_dir, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def engine_with_weights(model_dir: Path, hf_model, dtype: str, **engine_args) -> LLM:
    """A batchgen engine on the HF model's exact weights (dummy init, then HF's tensors loaded)."""
    llm = LLM(str(model_dir), load_format="dummy", dtype=dtype, **engine_args)
    llm.engine.model.load_weights((name, tensor) for name, tensor in hf_model.state_dict().items())
    return llm


def engine_logits(llm: LLM, sequences: list[list[int]], prompt_lens: list[int],
                  every_position: bool = True) -> list[torch.Tensor]:
    """Logits of each sequence computed by the engine's scheduler and runner; tokens after the prompt are
    appended one per step as if sampled. every_position: at every position (the model run directly on the
    step's inputs); else at the positions a step samples from (each sequence's last one per step), through the
    runner's own step, which a tensor-parallel engine runs on every rank."""
    engine = llm.engine
    requests = [Request(str(i), seq[:p], SamplingParams(), group_index=i)
                for i, (seq, p) in enumerate(zip(sequences, prompt_lens))]
    rows: list[list[torch.Tensor]] = [[] for _ in sequences]
    for request in requests:
        engine.scheduler.add(request)
    while engine.scheduler.has_unfinished():
        batch: ScheduledBatch = engine.scheduler.schedule()
        inputs = engine.runner.prepare(batch)
        with torch.inference_mode():
            if every_position:
                hidden = engine.runner.forward(inputs.input_ids, inputs.positions, inputs.meta)
                logits = engine.model.compute_logits(hidden).float().cpu()
            else:
                logits = engine.runner.execute(inputs).float().cpu()
        offset = 0
        # rows in the runner's order: decodes first (a stable sort, as ModelRunner.prepare does)
        for request, num_new in sorted(zip(batch.requests, batch.num_new_tokens), key=lambda pair: pair[1] != 1):
            index = request.group_index
            request.num_computed_tokens += num_new
            reached_end = request.num_computed_tokens == request.num_tokens
            taken = num_new if every_position else int(reached_end)
            rows[index].append(logits[offset:offset + taken])
            offset += taken
            if reached_end:
                if request.num_tokens == len(sequences[index]):
                    request.finish("length")
                    engine.scheduler.finish(request)
                else:
                    request.output_token_ids.append(sequences[index][request.num_tokens])
    return [torch.cat(r) for r in rows]


def logits_errors_vs_hf(llm: LLM, hf_model, sequences: list[list[int]], prompt_lens: list[int], device) -> list[float]:
    """Per sequence: relative L2 error of the engine's logits at every position against HF's forward of the
    whole sequence."""
    ours = engine_logits(llm, sequences, prompt_lens)
    errors = []
    with torch.inference_mode():
        for seq, mine in zip(sequences, ours):
            reference = hf_model(torch.tensor([seq], device=device)).logits[0].float().cpu()
            errors.append(((mine - reference).norm() / reference.norm()).item())
    return errors


def mixed_sequences(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    """32 sequences of random lengths, and how many of each one's tokens are prompt (the rest decode)."""
    rng = random.Random(0)
    sequences, prompt_lens = [], []
    for _ in range(32):
        length = rng.randint(args.min_len, args.max_len)
        sequences.append([rng.randrange(vocab) for _ in range(length)])
        prompt_lens.append(max(1, length - rng.randint(1, args.decode_steps)))
    return sequences, prompt_lens


def check_logits(args, device) -> dict:
    config_dir = args.config_dir
    hf = hf_random_model(config_dir, torch.bfloat16, device, seed=1, overrides=args.overrides)
    sequences, prompt_lens = mixed_sequences(args, hf.config.vocab_size)
    llm = engine_with_weights(config_dir, hf, "bfloat16", max_num_batched_tokens=args.token_budget,
                              max_model_len=args.max_len + 16, device=str(device), **args.engine_args)
    errors = logits_errors_vs_hf(llm, hf, sequences, prompt_lens, device)
    graphs = llm.engine.runner.decode_graphs is not None
    del llm, hf
    return {"check": "bf16 logits vs HF (prefill, chunked prefill, decode)", "model": args.model,
            "sequences": len(sequences), "max_rel_l2": max(errors), "mean_rel_l2": sum(errors) / len(errors),
            "cuda_graphs": graphs, "passed": max(errors) < 2e-2}


def check_greedy(args, device) -> dict:
    config_dir = args.config_dir
    hf = hf_random_model(config_dir, torch.float32, device, seed=2, overrides=args.overrides)
    rng = random.Random(1)
    vocab = hf.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(args.min_len, args.max_len))] for _ in range(32)]
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.greedy_tokens,
                              min_new_tokens=args.greedy_tokens, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    llm = engine_with_weights(config_dir, hf, "float32", max_model_len=args.max_len + args.greedy_tokens + 16,
                              device=str(device), **args.engine_args)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.greedy_tokens,
                                                   ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outputs]
    same = sum(g == e for g, e in zip(got, expected))
    first_diff = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), None) for g, e in zip(got, expected)]
    del llm, hf
    return {"check": "fp32 greedy tokens vs HF generate", "model": args.model, "sequences": len(prompts),
            "identical": same, "first_divergence": [d for d in first_diff if d is not None],
            "passed": same == len(prompts)}


def check_fp8_kv_logits(args, device) -> dict:
    hf = hf_random_model(args.config_dir, torch.bfloat16, device, seed=1, overrides=args.overrides)
    sequences, prompt_lens = mixed_sequences(args, hf.config.vocab_size)
    logits = {}
    for name, kv_cache_dtype, kernels in (("bf16", "auto", "triton"), ("fp8", "fp8", "triton"),
                                          ("fp8-ref", "fp8", "ref")):
        os.environ["BATCHGEN_KERNELS"] = kernels
        llm = engine_with_weights(args.config_dir, hf, "bfloat16", kv_cache_dtype=kv_cache_dtype,
                                  max_num_batched_tokens=args.token_budget, max_model_len=args.max_len + 16,
                                  device=str(device), **args.engine_args)
        logits[name] = engine_logits(llm, sequences, prompt_lens)
        del llm
        gc.collect()
    os.environ.pop("BATCHGEN_KERNELS")
    del hf

    def errors(a: str, b: str) -> list[float]:
        return [relative_l2(x, y) for x, y in zip(logits[a], logits[b])]

    kernels, references = errors("fp8", "bf16"), errors("fp8-ref", "bf16")
    return {"check": "fp8 KV logits vs bf16 KV logits (same bf16 weights; kernels vs the fp8 references)",
            "model": args.model, "sequences": len(sequences), "max_rel_l2": max(kernels),
            "mean_rel_l2": sum(kernels) / len(kernels), "references_max_rel_l2": max(references),
            "kernels_vs_references_max_rel_l2": max(errors("fp8", "fp8-ref")),
            "passed": max(kernels) <= 1.1 * max(references)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton under the interpreter "
                        "only if TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        args.overrides = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
                          "max_window_layers": 2, "layer_types": ["full_attention"] * 2}
        args.min_len, args.max_len, args.decode_steps, args.token_budget, args.greedy_tokens = 4, 40, 6, 64, 8
    else:
        device = torch.device("cuda")
        args.overrides = {}
        args.min_len, args.max_len, args.decode_steps, args.token_budget, args.greedy_tokens = 16, 700, 24, 512, 32
    args.engine_args = {"gpu_memory_utilization": 0.5, "max_num_seqs": 32} if device.type == "cuda" else {}
    args.config_dir = CONFIGS / args.model
    if args.dry_run:   # a directory holding just the shrunk config (dummy weights need no weight files)
        args.config_dir = Path(tempfile.mkdtemp()) / args.model
        AutoConfig.from_pretrained(CONFIGS / args.model, **args.overrides).save_pretrained(args.config_dir)
        args.overrides = {}
    results = []
    for check in (check_logits, check_greedy, check_fp8_kv_logits):
        results.append(check(args, device))
        print(json.dumps(results[-1]), flush=True)
        gc.collect()   # the check's engine and HF model, before the next one sizes its KV cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
