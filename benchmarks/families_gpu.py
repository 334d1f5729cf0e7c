"""Gemma 3 and Phi-4-mini against Hugging Face transformers, and the sliding-window attention kernels, on one GPU.

1. bf16 logits vs HF on the same random weights through the engine's own data path (scheduler, chunked
   prefill, decode steps with CUDA graphs): a Gemma-3-4B text shape cut to 6 layers (5 sliding, 1 global) with
   its window shrunk to 128 so every sequence runs past it, and a Phi-4-mini shape cut to 4 layers (partial
   rotary, LongRoPE short factors). Relative L2 per sequence, pass below 2e-2.
2. Sliding-window paged attention (Triton) vs its torch reference in bf16 at the Gemma-3-4B attention shape
   (8 query heads over 4 KV heads, head_dim 256), and its time beside global attention on the same batch:
   prefill of 4 x 8192 tokens and decode of 64 sequences of 8192 tokens, window 1024 (tiles outside it skipped).

    python benchmarks/families_gpu.py            # H200: well under 2 minutes
    python benchmarks/families_gpu.py --smoke    # CPU, tiny shapes, Triton interpreter
One JSON line per figure; exit status 1 when a check failed.
"""
import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter")
OPTS = ARGS.parse_args()
if OPTS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from batchgen.kernels import paged_attention as pa  # noqa: E402
from batchgen.kernels.testing import TOLERANCE, random_paged_batch, relative_l2  # noqa: E402
from gpu_correctness import CONFIGS, engine_with_weights, hf_random_model, logits_errors_vs_hf  # noqa: E402

SMOKE = OPTS.smoke
DEVICE = torch.device("cpu" if SMOKE else "cuda")
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=512)
MODELS = {   # config dir -> overrides of the full-size shape
    "gemma-3-4b": dict(num_hidden_layers=6, sliding_window=128,
                       layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    "phi-4-mini": dict(num_hidden_layers=4),
}
RESULTS: list[dict] = []


def emit(record: dict) -> None:
    RESULTS.append(record)
    print(json.dumps(record), flush=True)


def check_logits(model: str) -> None:
    overrides = dict(MODELS[model])
    if SMOKE:
        overrides.update(TINY)
        if model.startswith("gemma"):
            overrides["sliding_window"] = 8
        else:   # 12 of the 16 dims rotate: 6 factors
            overrides.update(rope_scaling={"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6,
                                           "rope_theta": 10000.0},
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config_dir = Path(tempfile.mkdtemp()) / model   # the shape as both sides read it
    AutoConfig.from_pretrained(CONFIGS / model, **overrides).save_pretrained(config_dir)
    hf = hf_random_model(config_dir, torch.bfloat16, DEVICE, seed=1, overrides={})
    generator = torch.Generator().manual_seed(0)
    count, min_len, max_len, decode_steps = (4, 10, 30, 4) if SMOKE else (8, 300, 700, 24)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=generator).tolist()
    sequences = [torch.randint(0, hf.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    prompt_lens = [n - decode_steps for n in lengths]
    engine_args = {} if SMOKE else {"gpu_memory_utilization": 0.5, "max_num_seqs": 32}
    llm = engine_with_weights(config_dir, hf, "bfloat16", max_num_batched_tokens=64 if SMOKE else 512,
                              max_model_len=max_len + 16, device=str(DEVICE), **engine_args)
    errors = logits_errors_vs_hf(llm, hf, sequences, prompt_lens, DEVICE)
    config = llm.engine.model_config
    emit({"check": "bf16 logits vs HF (prefill, chunked prefill, decode)", "model": model,
          "layers": config.num_hidden_layers, "sliding_window": config.sliding_window,
          "sliding_layers": config.layer_types.count("sliding_attention") if config.sliding_window else 0,
          "sequences": len(sequences), "max_len": max(lengths), "max_rel_l2": max(errors),
          "cuda_graphs": llm.engine.runner.decode_graphs is not None, "passed": max(errors) < 2e-2})
    del llm, hf
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _time_ms(fn) -> float | None:
    return None if SMOKE else triton.testing.do_bench(fn, warmup=5, rep=30)


def check_sliding_window_kernels() -> None:
    dtype = torch.float32 if SMOKE else torch.bfloat16   # the interpreter computes bf16 arithmetic wrongly
    heads, kv_heads, head_dim, block, window = (4, 2, 32, 16, 24) if SMOKE else (8, 4, 256, 16, 1024)
    context = 100 if SMOKE else 8192
    prefill = random_paged_batch([(0, context)] * (2 if SMOKE else 4), heads, kv_heads, head_dim, block, dtype,
                                 DEVICE, seed=1)
    decode = random_paged_batch([(context - 1, 1)] * (4 if SMOKE else 64), heads, kv_heads, head_dim, block, dtype,
                                DEVICE, seed=2)
    for kind, batch in (("prefill", prefill), ("decode", decode)):
        k_cache, v_cache = batch.clean_caches()

        def run(sliding_window, batch=batch, kind=kind):
            if kind == "prefill":
                return pa.paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc,
                                                  batch.seq_lens, batch.block_tables, batch.scale,
                                                  batch.max_query_len, sliding_window)
            return pa.paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens,
                                             batch.block_tables, batch.scale, sliding_window)

        if kind == "prefill":
            reference = pa.paged_prefill_attention_ref(batch.q.float(), k_cache.float(), v_cache.float(),
                                                       batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                                       batch.scale, batch.max_query_len, window)
        else:
            reference = pa.paged_decode_attention_ref(batch.q.float(), k_cache.float(), v_cache.float(),
                                                      batch.seq_lens, batch.block_tables, batch.scale, window)
        error = relative_l2(run(window), reference)
        windowed_ms, global_ms = _time_ms(lambda: run(window)), _time_ms(lambda: run(None))
        emit({"check": f"sliding-window paged {kind} attention vs reference", "dtype": str(dtype).split(".")[1],
              "sequences": len(batch.seq_lens), "context": context, "window": window, "heads": heads,
              "kv_heads": kv_heads, "head_dim": head_dim, "rel_l2": error, "windowed_ms": windowed_ms,
              "global_ms": global_ms, "speedup_vs_global": global_ms / windowed_ms if not SMOKE else None,
              "passed": error < TOLERANCE[dtype]})


def main() -> int:
    check_sliding_window_kernels()
    for model in MODELS:
        check_logits(model)
    return 0 if all(r["passed"] for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
