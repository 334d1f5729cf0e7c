"""What two memory-bound kernels' main loops cost in instructions on Hopper, without a GPU: each kernel is compiled
for sm_90 with the installed Triton (its bundled ptxas and nvdisasm) as the runtime would build it at a decode shape,
and the SASS of its longest loop is counted by opcode:

- decode attention (Llama-3.1-8B: GQA group 4, head_dim 128) over a bf16 and an fp8 KV cache laid out as the engine
  has them (`cache_layout`), one tile of BLOCK_N keys per iteration. A tile of 128 keys x 128 dims of K and V is 32
  KiB in fp8: to stream 4.8 TB/s over 132 SMs at ~1.75 GHz, each SM must finish one every ~1,580 cycles.
- the fused MoE grouped GEMM at decode rows (16 rows of one expert, 128 output columns, 64-deep K steps) with bf16
  and fp8 expert weights and bf16 activations: an fp8 64 x 128 weight tile (8 KiB) every ~400 cycles.
- the sampler's token pick (`kernels/pick_tokens.py`), with and without the race's noise.
- prefill attention over an fp8 cache (with the query in fp8 too, as the launch config runs it, and in fp16) and a
  bf16 cache (the query tile's unmasked loop: BLOCK_M rows, BLOCK_N keys), at launch configs the GPU sweep
  (`kernels_gpu.py --sweep`) times.

A CTA of 4 warps issues its loop once per warp on the SM's 4 schedulers: about one loop length of cycles per tile,
before any stall; `F2F` (fp16 -> bf16) is a quarter-rate instruction. One JSON line per variant.

    python benchmarks/kernel_sass.py
    # with the GPU machine's Triton (3.6), unpacked beside the installed one:
    pip download --no-deps -d /tmp/t36 triton==3.6.0 && unzip -q /tmp/t36/triton-*.whl -d /tmp/t36/site
    PYTHONPATH=/tmp/t36/site python benchmarks/kernel_sass.py
"""
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from batchgen.kernels import fused_moe, paged_attention as pa, pick_tokens

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_for_hopper(fn, constants: dict, types: dict, unaligned: set[str], num_warps: int, num_stages: int):
    """fn built for sm_90 with `constants` (constexprs, and the arguments equal to 1 that the launch specializes),
    pointer and float types from `types` (others i32), and the 16-divisibility the launch finds in every other
    argument outside `unaligned`."""
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name] != "constexpr" and name not in unaligned and not signature[name].startswith("fp")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def cache_layout(cache_dtype: str) -> dict:
    """The page size and the V stride of 1 the launch specializes, as the engine lays the cache out: pages of 32
    with V keys-contiguous over an fp8 cache (store_kv.cache_views), pages of 16 with head_dim contiguous else."""
    return dict(PAGE=32, stride_vs=1) if cache_dtype == "fp8e4nv" else dict(PAGE=16, stride_vd=1)


def decode_attention(cache_dtype: str, block_n: int, num_warps: int, num_stages: int):
    constants = dict(GROUP=4, GROUP_ROWS=16, HEAD_DIM=128, BLOCK_N=block_n, SPLIT=False, DOT_PRECISION="tf32",
                     WIDE_OFFSETS=False, **cache_layout(cache_dtype))
    types = {"q_ptr": "*bf16", "out_ptr": "*bf16", "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32",
             "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32", "k_cache_ptr": f"*{cache_dtype}",
             "v_cache_ptr": f"*{cache_dtype}", "qk_scale": "fp32", "v_scale": "fp32"}
    # arguments the launch does not specialize, or that are not multiples of 16 at this shape
    unaligned = {"keys_per_split", "num_splits", "stride_bt", "window", "num_heads"}
    return compile_for_hopper(pa._decode_split_kernel, constants, types, unaligned, num_warps, num_stages)


def prefill_attention(cache_dtype: str, block_m: int, block_n: int, num_warps: int, num_stages: int,
                      fp8_query: bool = False):
    constants = dict(GROUP=4, HEAD_DIM=128, BLOCK_M=block_m, SHORT_ROWS=16, BLOCK_N=block_n, DOT_PRECISION="tf32",
                     WIDE_OFFSETS=False, FP8_QUERY=fp8_query, **cache_layout(cache_dtype))
    types = {"q_ptr": "*bf16", "out_ptr": "*bf16", "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32",
             "block_tables_ptr": "*i32", "k_cache_ptr": f"*{cache_dtype}", "v_cache_ptr": f"*{cache_dtype}",
             "qk_scale": "fp32", "v_scale": "fp32"}
    return compile_for_hopper(pa._prefill_kernel, constants, types, {"num_seqs", "stride_bt", "window"}, num_warps,
                              num_stages)


def moe_grouped_gemm(weight_dtype: str):
    """bf16 experts (bf16 activations), or fp8 experts with per-channel scales (fp8 activations)."""
    fp8 = weight_dtype == "fp8e4nv"
    constants = dict(stride_bk=1, WEIGHT_SCALE="channel" if fp8 else "none", GATHER_TOKENS=True, SCATTER_PAIRS=False,
                     DOT_PRECISION="tf32", BLOCK_M=16, BLOCK_N=128, BLOCK_K=128 if fp8 else 64)
    types = {"a_ptr": f"*{weight_dtype}", "a_scale_ptr": "*fp32", "b_ptr": f"*{weight_dtype}", "b_scale_ptr": "*fp32",
             "c_ptr": "*bf16", "weights_ptr": "*fp32", "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32"}
    unaligned = {"num_pairs", "top_k", "scale_block_n", "scale_block_k", "stride_as"}
    return compile_for_hopper(fused_moe._grouped_gemm_kernel, constants, types, unaligned, num_warps=4, num_stages=3)


def pick_tokens_kernel(has_noise: bool):
    """The sampler's token pick over one row's 2,048-column blocks, with the race's noise or without."""
    types = {"processed_ptr": "*fp32", "logits_ptr": "*fp32", "noise_ptr": "*fp32", "token_ptr": "*i64",
             "lse_ptr": "*fp32"}
    constants = dict(HAS_NOISE=has_noise, SAME_LOGITS=True, BLOCK=2048)
    return compile_for_hopper(pick_tokens._pick_tokens_kernel, constants, types, {"vocab"}, num_warps=8,
                              num_stages=3)


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(BIN / name), *flags, file.name], capture_output=True, text=True,
                              check=True).stdout


def loops(sass: str) -> list[list[str]]:
    """Each loop's opcodes: those between a backward branch's target and the branch."""
    lines = sass.splitlines()
    label_at, instructions = {}, []
    for i, line in enumerate(lines):
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label and i + 1 < len(lines) and (address := re.search(r"/\*([0-9a-f]{4,})\*/", lines[i + 1])):
            label_at[label.group(1)] = int(address.group(1), 16)
        op = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)(.*);", line)
        if op:
            instructions.append((int(op.group(1), 16), op.group(2), op.group(3)))
    spans = [(label_at[target.group(1)], address) for address, opcode, rest in instructions
             if opcode == "BRA" and (target := re.search(r"\((\.L_x_\d+)\)", rest))
             and label_at.get(target.group(1), address) < address]
    return [[opcode.split(".")[0] for address, opcode, _ in instructions if start <= address <= end]
            for start, end in spans]


def longest_loop(sass: str) -> list[str]:
    return max(loops(sass), key=len)


def unmasked_tile_loop(sass: str) -> list[str]:
    """The prefill kernel's loop over whole key tiles for its BLOCK_M-row query tile: of the loops with the most
    exponentials (BLOCK_M x BLOCK_N a tile; the 16-row tile of short chunks has fewer), the shortest (no mask)."""
    found = loops(sass)
    most = max(loop.count("MUFU") for loop in found)
    return min((loop for loop in found if loop.count("MUFU") == most), key=len)


def loop_figures(kernel, pick=longest_loop) -> dict:
    loop = pick(_tool("nvdisasm", kernel.asm["cubin"], "-c"))
    registers = re.search(r"REG:(\d+)", _tool("cuobjdump", kernel.asm["cubin"], "-res-usage")).group(1)
    opcodes = collections.Counter(loop)
    # local-memory loads and stores in the loop: registers spilled (the 128-row fp8 prefill tile's, at 255)
    return dict(loop_instructions=len(loop), registers=int(registers), shared_bytes=kernel.metadata.shared,
                spill_ops=opcodes["LDL"] + opcodes["STL"], top_opcodes=dict(opcodes.most_common(8)))


def main() -> int:
    for cache_dtype in ("fp8e4nv", "bf16"):
        for block_n, num_warps, num_stages in ((32, 1, 5), (128, 4, 3), (64, 4, 3), (128, 8, 3)):
            figures = loop_figures(decode_attention(cache_dtype, block_n, num_warps, num_stages))
            print(json.dumps(dict(
                kernel="decode attention", triton=triton.__version__, kv_cache=cache_dtype, BLOCK_N=block_n,
                num_warps=num_warps, num_stages=num_stages,
                # issue slots of one 128-key tile per SM: the loop once per warp, 4 schedulers
                issue_cycles_per_128_keys=round(figures["loop_instructions"] * num_warps / 4 * 128 / block_n),
                **figures)))
    for weight_dtype in ("fp8e4nv", "bf16"):
        print(json.dumps(dict(kernel="fused MoE grouped GEMM (decode rows)", triton=triton.__version__,
                              weights=weight_dtype, **loop_figures(moe_grouped_gemm(weight_dtype)))))
    # over an fp8 cache with the query in fp16 and in fp8 (FP8_QUERY, the launch config's choice: fp8 x fp8 scores)
    for cache_dtype, fp8_query in (("fp8e4nv", True), ("fp8e4nv", False), ("bf16", False)):
        for block_m, block_n, num_warps, num_stages in ((128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)):
            figures = loop_figures(prefill_attention(cache_dtype, block_m, block_n, num_warps, num_stages, fp8_query),
                                   unmasked_tile_loop)
            print(json.dumps(dict(kernel="prefill attention (unmasked key tiles)", triton=triton.__version__,
                                  kv_cache=cache_dtype, fp8_query=fp8_query, BLOCK_M=block_m, BLOCK_N=block_n,
                                  num_warps=num_warps, num_stages=num_stages, **figures)))
    for has_noise in (True, False):
        print(json.dumps(dict(kernel="token pick (2,048 columns an iteration)", triton=triton.__version__,
                              race=has_noise, **loop_figures(pick_tokens_kernel(has_noise)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
