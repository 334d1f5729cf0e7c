#!/usr/bin/env bash
# First benchmarks/prepare_device.sh here (wheels the image lacks, a tokenizer), then carry .whl.
# Everything the GPU acceptance needs, in one device call: kernel checks, engine-vs-HF correctness, then the W1/W3/W2
# throughput workloads with HF peers measured in the same run. Each part has its own time limit so one slow
# part can't lose the others' figures. JSON lines go to stdout and to $OUT/gpu.jsonl.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# batchgen installed as a user installs it, offline: the carried wheels, then the project itself (the image has
# setuptools, torch, triton, transformers). PIP_BREAK_SYSTEM_PACKAGES: the image's python may be Debian's.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install -q --no-index --no-deps .whl/*.whl && python3 -m pip install -q --no-deps --no-build-isolation . \
  || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

bench() { timeout "$1" batchgen bench "${@:2}" 2>>"$OUT/stderr.log" | tee -a "$OUT/gpu.jsonl"; }

timeout "${T_KERNELS:-150}" python3 benchmarks/kernels_gpu.py 2>>"$OUT/stderr.log" | tee "$OUT/kernels.txt" | tail -n 40
timeout "${T_CHECK:-90}" python3 benchmarks/gpu_correctness.py 2>>"$OUT/stderr.log" | tee -a "$OUT/gpu.jsonl"
bench "${T_W1:-240}" --model benchmarks/configs/llama-3.1-8b --load-format dummy --name W1 --num-requests 1000 \
  --input-len 512 --output-len 256 --max-model-len 1024 --hf-static-batch 64 --hf-continuous --hf-sample 64
bench "${T_W3:-90}" --model benchmarks/configs/llama-3.1-8b --load-format dummy --name W3 --num-requests 1000 \
  --prefix-len 1024 --input-len 256 --output-len 128 --max-model-len 1536 --hf-static-batch 64 --hf-continuous --hf-sample 64
bench "${T_W2:-300}" --model benchmarks/configs/qwen3-0.6b --load-format dummy --name W2 --num-requests 256 \
  --input-len 100 --input-len-max 1024 --output-len 100 --output-len-max 1024 --max-model-len 2048 \
  --hf-static-batch 64 --hf-continuous --hf-sample 64
# structured output on the W1 shape: 6-field schema, then the same job unconstrained with each output forced to
# its constrained length (tokenizer borrowed)
bench "${T_JSON:-120}" --model benchmarks/configs/llama-3.1-8b --load-format dummy --name W1-json \
  --num-requests 1000 --input-len 512 --output-len 128 --max-model-len 1024 --tokenizer .whl/tokenizer \
  --schema benchmarks/schemas/six_fields.json
# fp8 (issue 11): kernel checks, fp8-vs-bf16 logits, GEMM timings; then TensorRT-LLM's 1000/1000 shape in fp8
timeout "${T_FP8:-240}" python3 benchmarks/fp8_gpu.py 2>>"$OUT/stderr.log" | tee -a "$OUT/gpu.jsonl"
bench "${T_FP8_W:-300}" --model benchmarks/configs/llama-3.1-8b --load-format dummy --quantization fp8 \
  --name fp8-1000-1000 --num-requests 1000 --input-len 1000 --output-len 1000 --max-model-len 2048
# mixture-of-experts (issue 12): fused MoE kernel checks and timings (bf16 and fp8 experts), bf16 logits vs HF bf16
# and fp32 on Qwen3-30B-A3B layers; then the W1 shape on the full Qwen3-30B-A3B and Mixtral-8x7B shapes (dummy
# weights), HF static generate first on a sample of the same prompts, freed before the engine starts
moe() { timeout "$1" python3 benchmarks/moe_gpu.py "${@:2}" 2>>"$OUT/stderr.log" | tee -a "$OUT/gpu.jsonl"; }
moe "${T_MOE:-120}" --mode kernels
moe "${T_MOE_LOGITS:-120}" --mode logits
moe "${T_MOE_W1:-300}" --mode throughput --model qwen3-30b-a3b --workload W1
moe "${T_MIXTRAL_W1:-300}" --mode throughput --model mixtral-8x7b --workload W1
# scoring: W1's prompts (512 tokens), every prompt token's logprob, nothing generated; HF's forward pass (logits,
# fp32 log-softmax, gather) on the first 256 of the same prompts
bench "${T_SCORE:-150}" --model benchmarks/configs/llama-3.1-8b --load-format dummy --name W1-score \
  --num-requests 1000 --input-len 512 --max-model-len 1024 --score --hf-static-batch 16 --hf-sample 256
# Gemma 3 and Phi-4-mini (issue 12): bf16 logits vs HF, sliding-window kernels vs reference and against global
timeout "${T_FAMILIES:-150}" python3 benchmarks/families_gpu.py 2>>"$OUT/stderr.log" | tee -a "$OUT/gpu.jsonl"
tail -n 30 "$OUT/stderr.log"
