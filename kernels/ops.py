"""The one place that picks a kernel: Triton (or a measured-faster library call) on CUDA tensors, the torch
reference elsewhere.

`BATCHGEN_KERNELS=ref` forces the references on the GPU too (debugging, A/B checks).
"""
import os

import torch

from batchgen.kernels import (activation, fp8, fused_moe as _fused_moe, paged_attention, pick_tokens as _pick_tokens,
                              rms_norm as _rms_norm, rotary, store_kv as _store_kv, top_p_threshold as _top_p_threshold)


def _triton(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("BATCHGEN_KERNELS", "triton") != "ref"


def store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    fn = _store_kv.store_kv if _triton(key) else _store_kv.store_kv_ref
    fn(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _triton_attention(q: torch.Tensor) -> bool:
    # other head sizes (Phi-3-mini's 96) run the torch references, on the GPU too: slower, same results
    return _triton(q) and paged_attention.supports_head_dim(q.shape[-1])


def paged_prefill_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, max_query_len,
                            sliding_window=None, k_scale=1.0, v_scale=1.0):
    triton_kernel = _triton_attention(q)
    fn = paged_attention.paged_prefill_attention if triton_kernel else paged_attention.paged_prefill_attention_ref
    return fn(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, max_query_len, sliding_window,
              k_scale, v_scale)


def paged_decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, sliding_window=None, k_scale=1.0,
                           v_scale=1.0):
    fn = paged_attention.paged_decode_attention if _triton_attention(q) else paged_attention.paged_decode_attention_ref
    return fn(q, k_cache, v_cache, seq_lens, block_tables, scale, sliding_window, k_scale, v_scale)


def rms_norm(x, weight, eps, residual=None, unit_offset=False):
    fn = _rms_norm.rms_norm if _triton(x) else _rms_norm.rms_norm_ref
    return fn(x, weight, eps, residual, unit_offset)


def rms_norm_fp8(x, weight, eps, residual=None, unit_offset=False):
    fn = _rms_norm.rms_norm_fp8 if _triton(x) else _rms_norm.rms_norm_fp8_ref
    return fn(x, weight, eps, residual, unit_offset)


def rotary_embedding(positions, q, k, cos_sin_cache):
    fn = rotary.rotary_embedding if _triton(q) else rotary.rotary_embedding_ref
    return fn(positions, q, k, cos_sin_cache)


def silu_and_mul(x):
    fn = activation.silu_and_mul if _triton(x) else activation.silu_and_mul_ref
    return fn(x)


def silu_and_mul_fp8(x):
    fn = activation.silu_and_mul_fp8 if _triton(x) else activation.silu_and_mul_fp8_ref
    return fn(x)


def gelu_tanh_and_mul(x):
    fn = activation.gelu_tanh_and_mul if _triton(x) else activation.gelu_tanh_and_mul_ref
    return fn(x)


def gelu_tanh_and_mul_fp8(x):
    fn = activation.gelu_tanh_and_mul_fp8 if _triton(x) else activation.gelu_tanh_and_mul_fp8_ref
    return fn(x)


def top_p_threshold(logits, top_p):
    fn = _top_p_threshold.top_p_threshold if _triton(logits) else _top_p_threshold.top_p_threshold_ref
    return fn(logits, top_p)


def pick_tokens(processed, logits, noise):
    fn = _pick_tokens.pick_tokens if _triton(processed) else _pick_tokens.pick_tokens_ref
    return fn(processed, logits, noise)


def quantize_fp8(x, group_size=None):
    fn = fp8.quantize_fp8 if _triton(x) else fp8.quantize_fp8_ref
    return fn(x, group_size)


def fp8_gemm(x_q, x_scale, w_q, w_scale, out_dtype):
    fn = fp8.fp8_gemm if _triton(x_q) else fp8.fp8_gemm_ref
    return fn(x_q, x_scale, w_q, w_scale, out_dtype)


def fp8_block_gemm(x_q, x_scale, w_q, w_scale, block, out_dtype):
    if _triton(x_q) and fp8.cublas_takes_block_gemm(x_q, w_q, block):
        return fp8.fp8_block_gemm_cublas(x_q, x_scale, w_q, w_scale, out_dtype)   # measured faster where it applies
    fn = fp8.fp8_block_gemm if _triton(x_q) else fp8.fp8_block_gemm_ref
    return fn(x_q, x_scale, w_q, w_scale, block, out_dtype)


def fused_moe(hidden, w_gate_up, w_down, topk_weights, topk_ids, gate_up_scale=None, down_scale=None, block=None):
    fn = _fused_moe.fused_moe if _triton(hidden) else _fused_moe.fused_moe_ref
    return fn(hidden, w_gate_up, w_down, topk_weights, topk_ids, gate_up_scale, down_scale, block)
