"""What the decode attention kernel's main loop costs in instructions on Hopper, without a GPU: the kernel is
compiled for sm_90 with the installed Triton (its bundled ptxas and nvdisasm), and the SASS of its longest loop (one
key tile per iteration) is counted by opcode, for a bf16 and an fp8 KV cache at the Llama-3.1-8B decode shape.

A tile of 128 keys x 128 dims of K and V is 32 KiB in fp8: to stream 4.8 TB/s over 132 SMs at ~1.75 GHz, each SM
must finish one every ~1,580 cycles, and a CTA of 4 warps issues its loop's instructions once per warp (4 schedulers:
about one loop length of cycles per tile, before any stall). One JSON line per variant.

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

from batchgen.kernels import paged_attention as pa

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {"q_ptr": "*bf16", "out_ptr": "*bf16", "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32",
            "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32"}
# arguments the launch does not specialize (or that are not multiples of 16 at this shape)
UNALIGNED = {"keys_per_split", "num_splits", "stride_bt", "qk_scale", "v_scale", "window", "num_heads"}


def compile_decode(cache_dtype: str, block_n: int, num_warps: int, num_stages: int):
    """The split kernel as the runtime would build it for Llama-3.1-8B (GQA group 4, head_dim 128, pages of 16),
    with the 16-divisibility the launch finds in the pointers and strides."""
    fn = pa._decode_split_kernel
    constants = dict(GROUP=4, GROUP_ROWS=16, HEAD_DIM=128, PAGE=16, BLOCK_N=block_n, SPLIT=False,
                     DOT_PRECISION="tf32")
    signature = {name: "constexpr" if name in constants else POINTERS.get(name) or
                 (f"*{cache_dtype}" if name.endswith("cache_ptr") else "fp32" if name.endswith("scale") else "i32")
                 for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name] != "constexpr" and name not in UNALIGNED and name != "seq_lens"}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(BIN / name), *flags, file.name], capture_output=True, text=True,
                              check=True).stdout


def longest_loop(sass: str) -> list[str]:
    """Opcodes between the target of the backward branch with the longest span and that branch."""
    lines = sass.splitlines()
    label_at, instructions = {}, []
    for i, line in enumerate(lines):
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label and i + 1 < len(lines) and (address := re.search(r"/\*([0-9a-f]{4,})\*/", lines[i + 1])):
            label_at[label.group(1)] = int(address.group(1), 16)
        op = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)(.*);", line)
        if op:
            instructions.append((int(op.group(1), 16), op.group(2), op.group(3)))
    start, end = max(((label_at[target.group(1)], address) for address, opcode, rest in instructions
                      if opcode == "BRA" and (target := re.search(r"\((\.L_x_\d+)\)", rest))
                      and label_at.get(target.group(1), address) < address), key=lambda span: span[1] - span[0])
    return [opcode.split(".")[0] for address, opcode, _ in instructions if start <= address <= end]


def main() -> int:
    for cache_dtype in ("fp8e4nv", "bf16"):
        for block_n, num_warps, num_stages in ((128, 4, 3), (64, 4, 3), (128, 8, 3), (128, 4, 1)):
            kernel = compile_decode(cache_dtype, block_n, num_warps, num_stages)
            loop = longest_loop(_tool("nvdisasm", kernel.asm["cubin"], "-c"))
            registers = re.search(r"REG:(\d+)", _tool("cuobjdump", kernel.asm["cubin"], "-res-usage")).group(1)
            print(json.dumps(dict(
                kernel="decode attention", triton=triton.__version__, kv_cache=cache_dtype, BLOCK_N=block_n,
                num_warps=num_warps, num_stages=num_stages, loop_instructions=len(loop),
                # issue slots of one 128-key tile per SM: the loop once per warp, 4 schedulers
                issue_cycles_per_128_keys=round(len(loop) * num_warps / 4 * 128 / block_n),
                registers=int(registers), shared_bytes=kernel.metadata.shared,
                top_opcodes=dict(collections.Counter(loop).most_common(8)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
