"""Tensor parallelism on a host with two GPUs (issue 13). One mode per call, each inside a 10-minute device call;
one JSON line per figure (with card and commit), a short table, then the total time.

    correctness     Qwen3-0.6B shape, random weights saved as a checkpoint: bf16 logits of TP=2 vs TP=1 through
                    the engine's scheduler and runner (chunked prefill, decode, CUDA graphs), relative L2 per
                    sequence (bound 2e-2); fp32 greedy tokens of LLM(tensor_parallel_size=2) vs =1, identical.
    throughput      Llama-3.1-70B shape, dummy weights, TP=2 (--tensor-parallel-size): --workload W1 (512 in /
                    256 out) or 1000-1000, outputs forced to full length; output and total tok/s, KV capacity,
                    the all-reduce share of decode steps; then HF transformers `generate` (static batches,
                    device_map="auto" over the GPUs) on the first --hf-sample of the same prompts.
                    --quantization fp8 [--kv-cache-dtype fp8]: the fp8 figures (--tensor-parallel-size 1: one GPU).
    data-parallel   Llama-3.1-8B shape: two single-GPU engines in two processes, half the requests each, then one
                    TP=2 engine on all of them: which finishes the same work sooner.

    python3 benchmarks/tp_gpu.py correctness
    python3 benchmarks/tp_gpu.py throughput --workload W1
    python3 benchmarks/tp_gpu.py --smoke throughput --tensor-parallel-size 1   # CPU, tiny config: the path only

The all-reduce share is measured with torch.profiler (CUPTI) on rank 0 over a decode-heavy run after the timed
one: the summed duration of the all-reduce kernels (NCCL's, or any kernel named all_reduce) divided by the run's
wall time and by the summed duration of all kernels on rank 0's GPU (kernels replayed from CUDA graphs included).
"""
import argparse
import gc
import json
import logging
import multiprocessing
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from batchgen.distributed import disable_multicast

disable_multicast()   # before torch starts NCCL here or in any process this one starts

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from batchgen import LLM, SamplingParams  # noqa: E402
from batchgen.bench import card_name, code_commit, make_workload, run_batchgen, run_hf_static  # noqa: E402
from batchgen.config import EngineConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from gpu_correctness import engine_logits, hf_random_model  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"
WORKLOADS = {"W1": (512, 256), "1000-1000": (1000, 1000)}   # input, output tokens per request
LOGITS_BOUND = 2e-2
SMOKE_FIELDS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
ROWS: list[dict] = []
FAILED: list[str] = []


def emit(figure: str, device: torch.device, **fields) -> dict:
    record = {"figure": figure, **fields, "card": card_name(device), "commit": COMMIT}
    print(json.dumps(record), flush=True)
    ROWS.append(record)
    if record.get("passed") is False:
        FAILED.append(figure)
    return record


def config_dir(name: str, smoke: bool) -> Path:
    """The real-shaped config, or on --smoke the same architecture at tiny sizes (a directory of its own)."""
    if not smoke:
        return CONFIGS / name
    tiny = Path(tempfile.mkdtemp()) / name
    config = AutoConfig.from_pretrained(CONFIGS / name, **SMOKE_FIELDS)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    config.save_pretrained(tiny)
    return tiny


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_logits(checkpoint: Path, device: torch.device, args) -> None:
    """bf16 logits of LLM(tensor_parallel_size=2) against LLM(tensor_parallel_size=1) on the same steps: the
    logits each step samples from, through the runner's own step, which a tensor-parallel engine runs on every
    rank."""
    rng = random.Random(0)
    vocab = AutoConfig.from_pretrained(checkpoint).vocab_size
    sequences, prompt_lens = [], []
    for _ in range(args.sequences):
        length = rng.randint(args.min_len, args.max_len)
        sequences.append([rng.randrange(vocab) for _ in range(length)])
        prompt_lens.append(max(1, length - rng.randint(1, args.decode_steps)))

    def sampled_logits(size: int) -> tuple[list[torch.Tensor], bool]:
        # an engine of its own scope, so its cache is freed before the next one sizes its own
        with LLM(str(checkpoint), dtype="bfloat16", device=device.type, tensor_parallel_size=size,
                 max_num_seqs=args.sequences, max_num_batched_tokens=args.token_budget,
                 max_model_len=args.max_len + 16) as llm:
            return (engine_logits(llm, sequences, prompt_lens, every_position=False),
                    llm.engine.runner.decode_graphs is not None)

    logits = {}
    for size in (1, 2):
        logits[size], graphs = sampled_logits(size)
        release_memory()
    errors = [((mine - ref).norm() / ref.norm()).item() for mine, ref in zip(logits[2], logits[1])]
    emit("bf16 logits TP=2 vs TP=1", device, sequences=len(errors), max_rel_l2=round(max(errors), 5),
         mean_rel_l2=round(sum(errors) / len(errors), 5), bound=LOGITS_BOUND, cuda_graphs=graphs,
         passed=max(errors) < LOGITS_BOUND)


def check_greedy(checkpoint: Path, device: torch.device, args) -> None:
    """fp32 greedy through the public API: LLM(tensor_parallel_size=2) must equal LLM(tensor_parallel_size=1)."""
    rng = random.Random(1)
    vocab = AutoConfig.from_pretrained(checkpoint).vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(args.min_len, args.max_len))] for _ in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=args.greedy_tokens, ignore_eos=True)

    def greedy_tokens(size: int) -> list[list[int]]:
        with LLM(str(checkpoint), dtype="float32", device=device.type, tensor_parallel_size=size,
                 max_model_len=args.max_len + args.greedy_tokens + 16, max_num_seqs=8) as llm:
            return [output.outputs[0].token_ids for output in llm.generate(prompts, params)]

    tokens = {}
    for size in (1, 2):
        tokens[size] = greedy_tokens(size)
        release_memory()
    same = sum(a == b for a, b in zip(tokens[1], tokens[2]))
    emit("fp32 greedy TP=2 vs TP=1", device, sequences=len(prompts), tokens_each=args.greedy_tokens,
         identical=same, passed=same == len(prompts))


def correctness(args, device: torch.device) -> None:
    checkpoint = Path(tempfile.mkdtemp()) / "qwen3-0.6b-random"
    hf = hf_random_model(config_dir("qwen3-0.6b", args.smoke), torch.bfloat16, device, seed=1, overrides={})
    hf.save_pretrained(checkpoint)
    del hf
    release_memory()
    if args.smoke:
        args.sequences, args.min_len, args.max_len, args.decode_steps, args.token_budget = 4, 4, 40, 6, 32
        args.greedy_tokens = 8
    else:
        args.sequences, args.min_len, args.max_len, args.decode_steps, args.token_budget = 16, 16, 500, 24, 512
        args.greedy_tokens = 32
    check_logits(checkpoint, device, args)
    check_greedy(checkpoint, device, args)


# ---------------------------------------------------------------------------------------------------------
# throughput

def engine_settings(args, device: torch.device, workload: str) -> dict:
    input_len, output_len = WORKLOADS[workload]
    settings = dict(load_format="dummy", device=device.type, dtype="float32" if args.smoke else "bfloat16",
                    max_model_len=input_len + output_len + 16, generation_config="none",
                    gpu_memory_utilization=args.gpu_memory_utilization)
    if args.quantization:
        settings["quantization"] = args.quantization
    if args.kv_cache_dtype:
        if "kv_cache_dtype" not in EngineConfig.model_fields:
            raise SystemExit("--kv-cache-dtype: this batchgen has no EngineConfig.kv_cache_dtype yet")
        settings["kv_cache_dtype"] = args.kv_cache_dtype
    return settings


def workload_of(args, vocab: int, num_requests: int | None = None):
    input_len, output_len = WORKLOADS[args.workload]
    if args.smoke:
        input_len, output_len = input_len // 16, output_len // 16
    return make_workload(args.workload, num_requests or args.num_requests, input_len, output_len, vocab, seed=0)


def all_reduce_share(llm: LLM, args) -> dict:
    """The share of a decode-heavy run (short prompts, --profile-requests requests, 64 tokens out) that rank 0
    spends in all-reduce; see the module docstring."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    vocab = llm.engine.model_config.vocab_size
    workload = make_workload("all-reduce-profile", args.profile_requests, 16, 64, vocab, seed=1)
    device = llm.engine.device
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        llm.generate(workload.prompts, params)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    # kernels on the GPU; on the CPU (gloo) the all-reduce ops themselves, each counted once (not inside another)
    timed = [event for event in profiler.events() if event.device_type == kind and
             (kind == DeviceType.CUDA or _is_all_reduce(event) and not _is_all_reduce(event.cpu_parent))]
    all_reduce_us = sum(event.time_range.elapsed_us() for event in timed if _is_all_reduce(event))
    busy_us = sum(event.time_range.elapsed_us() for event in timed) if kind == DeviceType.CUDA else None
    return dict(requests=len(workload.prompts), input_len=16, output_len=64,
                all_reduce_ms=round(all_reduce_us / 1e3, 1), wall_ms=round(wall_us / 1e3, 1),
                share_of_wall=round(all_reduce_us / wall_us, 4),
                share_of_gpu_time=None if busy_us is None else round(all_reduce_us / busy_us, 4),
                kernels_seen=sorted({event.name for event in timed if _is_all_reduce(event)})[:4],
                method="torch.profiler on rank 0: all-reduce kernel time / wall time and / all kernel time")


def _is_all_reduce(event) -> bool:
    return event is not None and "allreduce" in event.name.lower().replace("_", "")


def hf_across_devices(config: Path, dtype: torch.dtype, devices: list[torch.device]):
    """HF transformers' model placed as device_map="auto" places it over several GPUs (accelerate's balanced
    map of whole decoder layers, hooks moving activations between them), built on the meta device and filled
    with random weights where each tensor lives: a 70B random init on the CPU takes too long."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import get_balanced_memory, infer_auto_device_map, set_module_tensor_to_device

    with init_empty_weights():   # parameters on meta; buffers (rotary frequencies) computed on the CPU
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config), dtype=dtype)
    if devices[0].type == "cuda":
        no_split = model._no_split_modules
        max_memory = get_balanced_memory(model, {d.index: torch.cuda.mem_get_info(d)[0] for d in devices},
                                         no_split_module_classes=no_split, dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory, no_split_module_classes=no_split, dtype=dtype)
    else:
        device_map = {"": "cpu"}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            place = max((key for key in device_map if key == "" or name == key or name.startswith(key + ".")), key=len)
            target = torch.device("cuda", device_map[place]) if isinstance(device_map[place], int) else \
                torch.device(device_map[place])
            if tensor.device.type == "meta":
                value = torch.empty(tensor.shape, dtype=dtype, device=target)
                if "norm" in name:
                    value.fill_(1.0)
                else:
                    value.normal_(0.0, 0.02, generator=None if target.type == "cuda" else generator)
            else:
                value = tensor
            set_module_tensor_to_device(model, name, target, value=value)
    return dispatch_model(model, device_map).eval(), device_map


def throughput(args, device: torch.device) -> None:
    config = config_dir(args.config, args.smoke)
    settings = engine_settings(args, device, args.workload)
    llm = LLM(str(config), tensor_parallel_size=args.tensor_parallel_size, **settings)
    workload = workload_of(args, llm.engine.model_config.vocab_size)
    figures, _ = run_batchgen(llm, workload)
    emit("throughput", device, **{"model": args.config, "kv_cache_dtype": args.kv_cache_dtype, **figures})
    if args.tensor_parallel_size > 1:
        emit("all-reduce share", device, model=args.config, tensor_parallel_size=args.tensor_parallel_size,
             **all_reduce_share(llm, args))
    llm.close()
    del llm
    release_memory()
    if args.hf_sample:
        dtype = torch.float32 if args.smoke else torch.bfloat16
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if device.type == "cuda" \
            else [device]
        hf, device_map = hf_across_devices(config, dtype, devices)
        figures = run_hf_static(hf, workload.sample(args.hf_sample), args.hf_batch)
        emit("throughput", device, model=args.config, device_map_devices=sorted({str(d) for d in device_map.values()}),
             **figures)


# ---------------------------------------------------------------------------------------------------------
# data parallel vs tensor parallel

def data_parallel_engine(index: int, config: str, settings: dict, args, results) -> None:
    """One single-GPU engine (the GPU that CUDA_VISIBLE_DEVICES shows this process) on every other request."""
    with LLM(config, **settings) as llm:
        workload = workload_of(args, llm.engine.model_config.vocab_size)
        figures, _ = run_batchgen(llm, replace(workload, prompts=workload.prompts[index::2],
                                               output_lens=workload.output_lens[index::2]))
    results.put(figures)


def data_parallel(args, device: torch.device) -> None:
    config = config_dir(args.config, args.smoke)
    settings = engine_settings(args, device, args.workload)
    context = multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    engines = []
    for index in range(2):
        visible = {"CUDA_VISIBLE_DEVICES": str(index)} if device.type == "cuda" else {}
        saved = {name: os.environ.get(name) for name in visible}
        os.environ.update(visible)   # a spawned process starts with this process's environment
        engines.append(context.Process(target=data_parallel_engine, args=(index, str(config), settings, args, results)))
        engines[-1].start()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    for engine in engines:
        engine.join()
    halves = [results.get() for _ in range(sum(engine.exitcode == 0 for engine in engines))]
    for figures in halves:
        emit("data-parallel engine", device, model=args.config, **figures)
    if len(halves) == 2:
        # both engines run at once on their own GPUs: the pair finishes when the slower one does
        elapsed = max(h["elapsed_s"] for h in halves)
        output, prompt = sum(h["output_tokens"] for h in halves), sum(h["prompt_tokens"] for h in halves)
        emit("throughput", device, model=args.config, system="batchgen 2 x TP=1 (data parallel)",
             workload=args.workload, requests=sum(h["requests"] for h in halves), elapsed_s=elapsed,
             output_tok_per_s=round(output / elapsed, 1), total_tok_per_s=round((output + prompt) / elapsed, 1),
             kv_capacity_tokens=sum(h["kv_capacity_tokens"] for h in halves))
    else:
        emit("data-parallel engine", device, passed=False, exit_codes=[engine.exitcode for engine in engines])
    with LLM(str(config), tensor_parallel_size=2, **settings) as llm:
        figures, _ = run_batchgen(llm, workload_of(args, llm.engine.model_config.vocab_size))
    emit("throughput", device, model=args.config, **figures)


# ---------------------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    lines = [("figure", "system / check", "TP", "workload", "out tok/s", "total tok/s", "KV tokens", "note")]
    for row in rows:
        note = ""
        if "share_of_wall" in row:
            note = f"all-reduce {row['share_of_wall']:.1%} of wall" + (
                f", {row['share_of_gpu_time']:.1%} of GPU time" if row["share_of_gpu_time"] is not None else "")
        elif "passed" in row:
            note = ("passed " if row["passed"] else "FAILED ") + json.dumps(
                {k: row[k] for k in ("max_rel_l2", "identical") if k in row})
        system = " ".join(filter(None, (row.get("system"), row.get("quantization"), row.get("kv_cache_dtype"))))
        lines.append((row["figure"], system,
                      str(row.get("tensor_parallel_size", "")), str(row.get("workload", "")),
                      str(row.get("output_tok_per_s", "")), str(row.get("total_tok_per_s", "")),
                      str(row.get("kv_capacity_tokens", "")), note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config of the same architecture")
    modes = parser.add_subparsers(dest="mode", required=True)
    modes.add_parser("correctness")
    for mode, config, requests in (("throughput", "llama-3.1-70b", 1000), ("data-parallel", "llama-3.1-8b", 1000)):
        sub = modes.add_parser(mode)
        sub.add_argument("--config", default=config, help="a directory under benchmarks/configs")
        sub.add_argument("--workload", choices=WORKLOADS, default="W1")
        sub.add_argument("--num-requests", type=int, default=requests)
        sub.add_argument("--quantization", choices=["fp8"])
        sub.add_argument("--kv-cache-dtype", choices=["fp8"])
        sub.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                         help="the share of each card the engine may take (weights, KV cache, steps)")
    throughput_mode = modes.choices["throughput"]
    throughput_mode.add_argument("--tensor-parallel-size", type=int, default=2)
    throughput_mode.add_argument("--profile-requests", type=int, default=256)
    throughput_mode.add_argument("--hf-sample", type=int, default=64, help="HF on the first N requests; 0: none")
    throughput_mode.add_argument("--hf-batch", type=int, default=64)
    args = parser.parse_args()
    # the engine's start-up lines (ranks loaded, KV cache sized, graphs captured) on stderr, with their times: a
    # call that runs out of time shows where it was
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s: %(message)s")
    if args.smoke:   # a few tiny requests: the script's path, not its figures
        args.num_requests = min(getattr(args, "num_requests", 8), 8)
        args.hf_sample = min(getattr(args, "hf_sample", 4), 4)
        args.profile_requests = args.hf_batch = 4
    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    start = time.perf_counter()
    {"correctness": correctness, "throughput": throughput, "data-parallel": data_parallel}[args.mode](args, device)
    print(table(ROWS))
    print(f"total time: {time.perf_counter() - start:.0f} s; failed: {FAILED or 'none'}", flush=True)
    return 1 if FAILED else 0


COMMIT = code_commit()

if __name__ == "__main__":
    sys.exit(main())
