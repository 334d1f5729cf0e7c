#!/usr/bin/env bash
# The GPU runs, as named calls that each fit one device call (10 minutes): `bash benchmarks/gpu_run.sh CALL`.
# Before the first call, here: `benchmarks/prepare_device.sh` (wheels the image lacks, a tokenizer, into .whl) and
# `git rev-parse --short HEAD > .commit` (the device's copy has no history of its own); carry .whl and .commit.
# The first call on a machine installs batchgen as a user would, offline (the carried wheels, then
# `pip install --no-deps --no-build-isolation .`); later calls on the same warm machine reinstall only batchgen.
# A machine held idle for 30 s goes back, and a cold one costs its start and the install again: have the next
# call ready before this one returns. Single-GPU runs go two at a time, one per card, on nvidia-h200-x2.
#
#   tp-fp8      x2  70B shape, fp8 weights + fp8 KV, TP=2, 1000/1000 x 1,000 requests; all-reduce share  (~7 min)
#   tp-bf16     x2  70B shape, bf16, TP=2, 1000/1000 x 1,000 requests; all-reduce share (~9 min: install first)
#   tp-bf16-hf  x2  the same with 300 requests, then HF device_map="auto" on the first 16                  (~8 min)
#   tp-check    x2  TP=2 vs TP=1 logits and greedy; 8B W1 data parallel (two engines) vs TP=2            (~6 min)
#   fp8         x2  the kernels' tests, then kernels_gpu.py --sweep in bf16 (fp8-KV decode included) beside the 8B
#                   1000/1000 fp8-weight runs with fp8 and bf16 KV and the fp8-KV decode profile          (~9 min)
#   fp8-one     x1  the fp8 call on one card: kernels' tests, kernels in bf16 unswept, 8B 1000/1000 fp8 + fp8 KV
#                   and its decode profile                                                                (~5 min)
#   fp8-gemm    x1  fp8_gpu.py: fp8 GEMMs (Triton, _scaled_mm, cuBLASLt block-scaled), fp8 logits, the
#                   projections at decode row counts (fp8_gpu.py --decode-gemms), gpu_correctness.py      (~5 min)
#   fp8-3000    x1  8B fp8 + fp8 KV 1000/1000 x 3,000 (TensorRT-LLM's count), then 500/2000 x 800          (~7 min)
#   fp8-1500    x1  8B fp8 + fp8 KV 2048/2048 x 1,500 (TensorRT-LLM's count), fp8 alone                    (~7 min)
#   fp8-2048-128 x1 8B fp8 + fp8 KV 2048/128 x 3,000 (TensorRT-LLM's count), fp8 alone                   (~4 min)
#   fp8-128-2048, fp8-500-2000  x1  the same for 128/2048 and 500/2000 x 3,000                     (~5, ~7 min)
#   fp8-70b     x1  70B shape, fp8 weights + fp8 KV on one card, 1000/1000 x 1,000 requests              (~9 min)
#   kernel-tests x1 pytest -n 8 tests/kernels on the card (pytest-xdist carried in .whl)                  (~3 min)
#   decode-latency x1  the decode sweep (launch configs at several split counts), then Nsight Compute on one  
#                   decode-attention launch over each cache (856 rows): occupancy, warp stall reasons     (~6 min)
#   overlap     x1  overlap_gpu.py: half a decode batch's attention beside the other half's GEMMs, the GEMMs
#                   held off 16-66 SMs (cuBLASLt's SM count target), at 2048/2048's, 1000/1000's, W1's rows (~8 min)
#   kernels-ab  x1  attention (or AB_ONLY's kernels) as installed against the kernel files in .ab/          (~2 min)
#   shapes      x2  8B fp8 + fp8 KV on TensorRT-LLM's shapes: 128/2048, 500/2000 x 1,000, 2048/2048 x 750,
#                   2048/128 x 3,000 (its count)                                                          (~9 min)
#   shapes-decode x2  the issue's one run per shape, fp8 (+ fp8 KV) and bf16 then HF: 128/2048 x 1,000 and
#                   500/2000 x 800 (request counts that fit a call)                                      (~9 min)
#   shape-128-2048, shape-500-2000  x1  shapes-decode's two parts, one a call, for a one-card machine   (~9 min)
#   shapes-long x2  the same for 2048/2048 x 400 and 2048/128 x 2,000                                    (~9 min)
#   shape-2048, shape-2048-128  x1  shapes-long's two parts, one a call, for a one-card machine   (~8, ~9 min)
#   moe         x2  Qwen3-30B-A3B (card 0) and Mixtral-8x7B (card 1): W1 x 1,000, 1000/1000 x 1,000 (Mixtral
#                   x 300), each beside HF static generate on its first prompts (W1: 16 / 8, 1000/1000: 8 / 4) (~10 min)
#   moe-one     x1  Qwen3-30B-A3B W1 and Mixtral-8x7B W1 (with HF), the fused MoE kernel, the MoE logits   (~7 min)
#   moe-qwen3-1000, moe-mixtral-1000  x1  the moe call's 1000/1000 runs, one a call                  (~5, ~6 min)
#   engine      x1  8B W1 / W3 and Qwen3-0.6B W2 with HF peers, structured output, scoring, families       (~9 min)
#   w1-blas     x1  8B bf16 W1 four times, torch's default bf16 GEMMs and cuBLASLt's by turns               (~6 min)
#   gate-up-epilogue x1  gate_up_epilogue_gpu.py: SiLU-and-mul in the bf16 gate_up GEMM's epilogue (Triton) vs
#                   F.linear then silu_and_mul, by turns, 1,024-12,288 rows                               (~1 min)
#   host-gaps   x1  8B bf16 W1 four times through host_gaps.py: host time outside the steps, full GC passes (~4 min)
#   w1-power    x1  8B bf16 W1 twice through card_power.py: power drawn, SM clock, share held by the power cap (~2 min)
#   zero-rows   x1  zero_rows_gpu.py: a decode step's bf16 GEMMs at 1,024 rows, 0 / 64 / 128 of them zero, held at
#                   the power cap, by turns                                                               (~1 min)
#
# Every part has its own time limit (`timeout -s INT`: a run cut short still prints its progress lines); each
# part's output goes to $OUT/NAME.txt, the part list with exit codes and seconds to $OUT/parts.txt, and the
# figures' JSON lines are printed at the end.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
# NVLink multicast stays off in every process (it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_BREAK_SYSTEM_PACKAGES=1 OMP_NUM_THREADS=4
[ -f .commit ] && export BATCHGEN_COMMIT=$(cat .commit)

if python3 -c "import pydantic, accelerate, transformers, sys; from packaging.version import Version as V
sys.exit(V(transformers.__version__) < V('5.18'))" 2>/dev/null
then python3 -m pip install -q --no-deps --no-build-isolation . >"$OUT/pip.txt" 2>&1 || exit 1
else python3 -m pip install -q --no-index --no-deps .whl/*.whl >"$OUT/pip.txt" 2>&1 &&
     python3 -m pip install -q --no-deps --no-build-isolation . >>"$OUT/pip.txt" 2>&1 || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

part() {   # part NAME SECONDS command...: one run with its own limit
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout -k 10 -s INT "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "$name rc=$? $((SECONDS - start))s" >>"$OUT/parts.txt"
}
on_gpu() { (export CUDA_VISIBLE_DEVICES=$1; "${@:2}"); }   # on_gpu 1 part ...: the part sees one card
fp8_run() {   # fp8_run NAME SECONDS SHAPE REQUESTS: 8B fp8 weights + fp8 KV on one shape, no HF sample
  part "$1" "$2" python3 benchmarks/engine_gpu.py --shape "$3" --quantization fp8 --kv-cache-dtype fp8 \
    --num-requests "$4" --hf-sample 0
}
BENCH_8B=(batchgen bench --model benchmarks/configs/llama-3.1-8b --load-format dummy)
W1_ARGS=(--name W1 --num-requests 1000 --input-len 512 --output-len 256 --max-model-len 1024)   # bench's, 8B bf16
MOE=(python3 benchmarks/moe_gpu.py)
# the kernels' tests on the card, bf16 included (the interpreter gets bf16 arithmetic wrong)
KERNEL_TESTS=(env OMP_NUM_THREADS=2 python3 -P -m pytest -q -n 8 tests/kernels)

call_tp-fp8() {
  part tp_fp8 540 python3 benchmarks/tp_gpu.py throughput --workload 1000-1000 --quantization fp8 \
    --kv-cache-dtype fp8 --num-requests 1000 --hf-sample 0
}
call_tp-bf16() {
  part tp_bf16 580 python3 benchmarks/tp_gpu.py throughput --workload 1000-1000 --num-requests 1000 --hf-sample 0
}
call_tp-bf16-hf() {
  part tp_bf16_hf 560 python3 benchmarks/tp_gpu.py throughput --workload 1000-1000 --num-requests 300 \
    --hf-sample 16 --hf-batch 16
}
call_tp-check() {
  part tp_correctness 200 python3 benchmarks/tp_gpu.py correctness
  part tp_data_parallel 300 python3 benchmarks/tp_gpu.py data-parallel --workload W1
}
fp8_kv_1000() {   # 8B 1000/1000 with fp8 weights and KV, and where an fp8-KV decode step's time goes
  fp8_run fp8_1000_fp8kv 160 1000/1000 1000
  part decode_profile 150 python3 benchmarks/engine_gpu.py --profile-decode 856 1500 --quantization fp8 \
    --kv-cache-dtype fp8
}
call_fp8() {   # card 0: the kernels' tests, then the kernels checked and timed in bf16, attention launch
  # configs swept (fp8 KV included); card 1: 8B 1000/1000 with fp8 and bf16 KV, the fp8-KV decode profile
  ( on_gpu 0 part kernel_tests 270 "${KERNEL_TESTS[@]}"
    on_gpu 0 part kernels 270 python3 benchmarks/kernels_gpu.py --sweep --dtypes bfloat16 ) &
  ( on_gpu 1 fp8_kv_1000
    on_gpu 1 part fp8_1000_bf16kv 150 python3 benchmarks/engine_gpu.py --shape 1000/1000 --quantization fp8 \
      --kv-cache-dtype auto --num-requests 1000 --hf-sample 0 ) &
  wait
}
call_fp8-one() {   # one card: the kernels' tests, the kernels in bf16 (no sweep), then fp8_kv_1000
  part kernel_tests 170 "${KERNEL_TESTS[@]}"
  part kernels 90 python3 benchmarks/kernels_gpu.py --dtypes bfloat16
  fp8_kv_1000
}
call_overlap() {   # one half batch's decode attention beside the other's GEMMs held off N SMs (overlap_gpu.py)
  part overlap_2048 200 python3 benchmarks/overlap_gpu.py --rows 400 --keys 2500 3500 --carveout 16 32 48 66
  part overlap_1000 150 python3 benchmarks/overlap_gpu.py --rows 856 --keys 1500 1700 --carveout 32 66
  part overlap_w1 150 python3 benchmarks/overlap_gpu.py --bf16 --rows 480 --keys 512 768 --carveout 32 66
}
call_kernels-ab() {   # kernels_gpu.py as installed (A) and with .ab/'s kernel files (B), on one machine; AB_ONLY
  # picks the kernels (default decode,prefill); prepare .ab/ here: git show COMMIT:kernels/X.py > .ab/X.py; carry .ab
  part kernels_a 200 python3 benchmarks/kernels_gpu.py --only "${AB_ONLY:-decode,prefill}" --dtypes bfloat16
  part kernels_b 200 python3 benchmarks/kernels_gpu.py --only "${AB_ONLY:-decode,prefill}" --dtypes bfloat16 \
    --kernels-from .ab
  python3 benchmarks/kernels_gpu.py --compare "$OUT/kernels_a.txt" "$OUT/kernels_b.txt"
}
call_decode-latency() {   # ncu on the launch the engine runs (docs/benchmarks.md, sixteenth session: what limits it)
  local ncu
  part decode_sweep 200 python3 benchmarks/kernels_gpu.py --only decode --sweep --dtypes bfloat16
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
  for cache in fp8 bf16; do
    part "ncu_$cache" 200 "$ncu" --clock-control none -k regex:_decode_split_kernel --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis python3 benchmarks/ncu_decode.py "$cache"
  done
}
call_kernel-tests() {
  part kernel_tests 300 "${KERNEL_TESTS[@]}"
}
call_fp8-70b() {   # the 70B shape in fp8 + fp8 KV on one card (TensorRT-LLM publishes 2,909 on one H200), 1,000
  # requests: with 300 (earlier calls) the cache's ~210 sequences left a second wave of 90 rows for half the steps;
  # GPU_MEM=0.97 gives the KV cache more of the card (the engine's default share is 0.9)
  part fp8_70b_1gpu 560 python3 benchmarks/tp_gpu.py throughput --tensor-parallel-size 1 --workload 1000-1000 \
    --num-requests 1000 --quantization fp8 --kv-cache-dtype fp8 --hf-sample 0 --gpu-memory-utilization "${GPU_MEM:-0.97}"
}
call_fp8-gemm() {   # the fp8 GEMMs (per-channel, block-scaled: Triton and cuBLASLt), the fp8 engine's logits, the
  # projections at decode row counts (8B and 70B; fp8 two ways, bf16), and the correctness harness (bf16 logits and
  # fp32 greedy vs HF, fp8 KV logits vs bf16 KV)
  part fp8_kernels 300 python3 benchmarks/fp8_gpu.py
  part decode_gemms 120 python3 benchmarks/fp8_gpu.py --decode-gemms
  part correctness 150 python3 benchmarks/gpu_correctness.py
}
# TensorRT-LLM's request counts (3,000; 1,500 for 2048/2048, run in waves of ~458 sequences)
call_fp8-1500() { fp8_run fp8_2048_1500 560 2048/2048 1500; }
call_fp8-2048-128() { fp8_run fp8_2048_128 400 2048/128 3000; }
call_fp8-128-2048() { fp8_run fp8_128_2048 560 128/2048 3000; }
call_fp8-500-2000() { fp8_run fp8_500_2000_3000 580 500/2000 3000; }
call_fp8-3000() { fp8_run fp8_1000_3000 330 1000/1000 3000; fp8_run fp8_500_2000 150 500/2000 800; }
call_shapes() {   # fp8 weights + fp8 KV, TensorRT-LLM's four other shapes
  on_gpu 0 part shape_128_2048 270 python3 benchmarks/engine_gpu.py --shape 128/2048 --quantization fp8 \
    --kv-cache-dtype fp8 --num-requests 1000 --hf-sample 8 &
  on_gpu 1 fp8_run shape_500_2000 270 500/2000 1000 &
  wait
  on_gpu 0 fp8_run shape_2048_2048 270 2048/2048 750 &
  on_gpu 1 part shape_2048_128 200 python3 benchmarks/engine_gpu.py --shape 2048/128 --quantization fp8 \
    --kv-cache-dtype fp8 --num-requests 3000 --hf-sample 8 &
  wait
}
# the issue's "one run per shape": fp8 (+ fp8 KV) and bf16 (+ bf16 KV) on the same prompts, then HF on a sample
SHAPE_RUN=(python3 benchmarks/engine_gpu.py --quantization fp8 none --kv-cache-dtype fp8 auto --paired)
call_shape-128-2048() {
  part both_128_2048 560 "${SHAPE_RUN[@]}" --shape 128/2048 --num-requests 1000 --hf-sample 8
}
call_shape-500-2000() {
  part both_500_2000 560 "${SHAPE_RUN[@]}" --shape 500/2000 --num-requests 800 --hf-sample 8
}
call_shapes-decode() {
  on_gpu 0 call_shape-128-2048 &
  on_gpu 1 call_shape-500-2000 &
  wait
}
call_shape-2048() {
  part both_2048_2048 520 "${SHAPE_RUN[@]}" --shape 2048/2048 --num-requests 400 --hf-sample 4
}
call_shape-2048-128() {
  part both_2048_128 560 "${SHAPE_RUN[@]}" --shape 2048/128 --num-requests 2000 --hf-sample 8
}
call_shapes-long() {
  on_gpu 0 call_shape-2048 &
  on_gpu 1 call_shape-2048-128 &
  wait
}
# each MoE throughput run takes HF's static generate on a sample of the same prompts in the same run (HF's MoE
# generate: ~0.1-0.2 s a step, whatever the batch)
qwen3_w1() { part qwen3_w1 170 "${MOE[@]}" --mode throughput --model qwen3-30b-a3b --workload W1 --hf-sample 16 --hf-batch 16; }
mixtral_w1() { part mixtral_w1 230 "${MOE[@]}" --mode throughput --model mixtral-8x7b --workload W1 --hf-sample 8 --hf-batch 8; }
qwen3_1000() { part qwen3_1000 330 "${MOE[@]}" --mode throughput --model qwen3-30b-a3b --workload 1000-1000 --hf-sample 8 --hf-batch 8; }
mixtral_1000() {
  part mixtral_1000 400 "${MOE[@]}" --mode throughput --model mixtral-8x7b --workload 1000-1000 --num-requests 300 \
    --hf-sample 4 --hf-batch 4
}
call_moe() {
  ( on_gpu 0 qwen3_w1; on_gpu 0 qwen3_1000 ) &
  ( on_gpu 1 mixtral_w1; on_gpu 1 mixtral_1000 ) &
  wait
}
call_moe-one() { qwen3_w1; part moe_kernels 80 "${MOE[@]}" --mode kernels; part moe_logits 90 "${MOE[@]}" --mode logits; mixtral_w1; }
call_moe-qwen3-1000() { qwen3_1000; }
call_moe-mixtral-1000() { mixtral_1000; }
call_engine() {
  part w1 150 "${BENCH_8B[@]}" "${W1_ARGS[@]}" \
    --hf-static-batch 64 --hf-continuous --hf-sample 64
  part w3 80 "${BENCH_8B[@]}" --name W3 --num-requests 1000 --prefix-len 1024 --input-len 256 --output-len 128 \
    --max-model-len 1536 --hf-static-batch 64 --hf-continuous --hf-sample 64
  part w2 120 batchgen bench --model benchmarks/configs/qwen3-0.6b --load-format dummy --name W2 --num-requests 256 \
    --input-len 100 --input-len-max 1024 --output-len 100 --output-len-max 1024 --max-model-len 2048 \
    --hf-static-batch 64 --hf-continuous --hf-sample 64
  # structured output on the W1 shape: a 6-field schema (tokenizer borrowed from the default model)
  part w1_json 80 "${BENCH_8B[@]}" --name W1-json --num-requests 1000 --input-len 512 --output-len 128 \
    --max-model-len 1024 --tokenizer .whl/tokenizer --schema benchmarks/schemas/six_fields.json
  part w1_score 60 "${BENCH_8B[@]}" --name W1-score --num-requests 1000 --input-len 512 --max-model-len 1024 --score \
    --hf-static-batch 16 --hf-sample 256
  part families 100 python3 benchmarks/families_gpu.py
}
call_w1-blas() {   # cuBLASLt ran W1 1.4% faster than the default in one run (nineteenth session): A, B, A, B
  local lt="import sys, torch; torch.backends.cuda.preferred_blas_library('cublaslt'); from batchgen.cli import main
sys.argv[0] = 'batchgen'; main()"
  for run in 1 2; do
    part "w1_default_$run" 120 "${BENCH_8B[@]}" "${W1_ARGS[@]}"
    part "w1_cublaslt_$run" 120 python3 -P -c "$lt" "${BENCH_8B[@]:1}" "${W1_ARGS[@]}"
  done
}
call_host-gaps() {   # the twentieth session's runs spent 0.27-0.36 s in a full garbage collection after the last step
  for run in 1 2 3 4; do
    part "host_gaps_$run" 120 python3 -P benchmarks/host_gaps.py "${BENCH_8B[@]:1}" "${W1_ARGS[@]}"
  done
}
call_w1-power() {   # W1 twice while nvidia-smi samples the card: the power drawn, the SM clock, the power cap
  for run in 1 2; do
    part "w1_power_$run" 120 python3 benchmarks/card_power.py "${BENCH_8B[@]}" "${W1_ARGS[@]}"
  done
}
call_zero-rows() {
  part zero_rows 120 python3 benchmarks/zero_rows_gpu.py
}
call_gate-up-epilogue() {
  part gate_up_epilogue 240 python3 benchmarks/gate_up_epilogue_gpu.py
}

for call in "$@"; do
  declare -F "call_$call" >/dev/null || { echo "gpu_run.sh: no call named $call" >&2; exit 2; }
  "call_$call"
done
cat "$OUT/parts.txt"
cat "$OUT"/*.txt | grep -h '^{' | grep -v '"type": "check"' | cut -c1-600 | tail -n 60
