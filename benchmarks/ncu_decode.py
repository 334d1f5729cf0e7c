"""Launch decode attention at the 1000/1000 fp8 run's mean decode step (856 rows of 1,500-1,700 keys, Llama-8B's
heads) over each cache named on the command line (fp8, bf16), twice each, for Nsight Compute to profile the second
launch: its memory-system limits (L1 wavefronts, L2 tag requests, the L2 partitions' fabric), warp stall reasons
and occupancy (docs/benchmarks.md, sixteenth session). `gpu_run.sh decode-latency` runs it under ncu; alone it only
launches the kernels."""
import sys

import torch

from batchgen.kernels import paged_attention as pa
from batchgen.kernels.testing import fp8_caches, random_paged_batch

FP8_KV_SCALES = (0.05, 0.02)


def main() -> int:
    lengths = [int(n) for n in torch.randint(1500, 1701, (856,), generator=torch.Generator().manual_seed(1))]
    for cache in sys.argv[1:]:
        # pages as the engine has them: 32 tokens over an fp8 cache (V keys-contiguous), 16 over a 16-bit one
        block = 32 if cache == "fp8" else 16
        batch = random_paged_batch([(n - 1, 1) for n in lengths], 32, 8, 128, block, torch.bfloat16, "cuda", seed=856)
        k_cache, v_cache = batch.clean_caches()
        if cache == "fp8":
            scales = FP8_KV_SCALES
            caches = fp8_caches(k_cache, v_cache, *scales)
        else:
            caches, scales = (k_cache, v_cache), (1.0, 1.0)
        for _ in range(2):   # the first launch compiles
            pa.paged_decode_attention(batch.q, *caches, batch.seq_lens, batch.block_tables, batch.scale, None, *scales)
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
