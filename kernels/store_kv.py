"""The paged KV cache's layout, and writing new keys/values into it at their slots (block * block_size + offset).

Every cache is indexed [block, slot, head, dim]. K pages are stored so (each key's head_dim contiguous); an fp8
cache stores its V pages keys-contiguous, each head's page as [head_dim, block_size] (`cache_views`), so decode
attention reads them as the P x V product's operand wants them, keys along the reduction: widened to fp16 in
registers and fed to the MMA without a round trip through shared memory (docs/benchmarks.md, sixteenth session:
1.2x on the fp8 decode kernel with pages of 32). The kernels take any layout from the strides.

An fp8 (float8_e4m3fn) cache holds K / k_scale and V / v_scale, saturated to e4m3's range (+-448): one scale per
layer for K and one for V (from the checkpoint's KV-cache calibration, else 1.0). A cache in the compute dtype
holds K and V as they are and ignores the scales. Quantization multiplies by the reciprocal scale (one fp32
product, the same bits in the kernel and the reference) and rounds to nearest, ties to even.
"""
import torch
import triton
import triton.language as tl

KV_FP8 = torch.float8_e4m3fn
_FP8_MAX = tl.constexpr(torch.finfo(KV_FP8).max)   # 448


def keys_contiguous_view(buffer: torch.Tensor) -> torch.Tensor:
    """A contiguous [num_blocks, block_size, heads, dim] buffer's memory read as pages of [heads, dim, block_size]:
    the view is indexed [block, slot, head, dim] like any cache, with each page's keys contiguous."""
    num_blocks, block_size, num_heads, head_dim = buffer.shape
    return buffer.view(num_blocks, num_heads, head_dim, block_size).permute(0, 3, 1, 2)


def cache_views(layer_buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (K, V) caches from its contiguous [2, num_blocks, block_size, heads, dim] buffer: K as stored,
    V keys-contiguous in an fp8 cache (see the module docstring)."""
    k_cache, v_cache = layer_buffer
    return k_cache, keys_contiguous_view(v_cache) if v_cache.dtype == KV_FP8 else v_cache


def kv_scales(cache: torch.Tensor, k_scale: float, v_scale: float) -> tuple[float, float]:
    """The (k_scale, v_scale) a cache of this dtype is stored with: 1.0 unless it is fp8."""
    return (k_scale, v_scale) if cache.dtype == KV_FP8 else (1.0, 1.0)


def quantize_kv_ref(x: torch.Tensor, scale: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `cache_dtype` stores it (x / scale, saturated, in fp8; else x in that dtype)."""
    if cache_dtype != KV_FP8:
        return x.to(cache_dtype)
    return (x.float() * (1.0 / scale)).clamp(-_FP8_MAX.value, _FP8_MAX.value).to(KV_FP8)


def dequantize_kv_ref(cached: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached keys (or values) in `dtype`, the scale multiplied back in for an fp8 cache."""
    if cached.dtype != KV_FP8:
        return cached.to(dtype)
    return (cached.float() * scale).to(dtype)


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """key/value [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D] (any strides); slot_mapping [T] int64,
    -1 = skip."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for cache, new, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        new = quantize_kv_ref(new, scale, cache.dtype)
        if cache.dtype == KV_FP8:   # torch has no fp8 index_put_: copy the bytes
            cache, new = cache.view(torch.uint8), new.view(torch.uint8)
        cache[blocks, offsets] = new


@triton.jit
def _power_of_two(exponent):
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(x):
    """fp32 x within +-448 rounded to the nearest e4m3 value, ties to even, still in fp32: the cast to fp8 that
    follows is then exact. (The GPU's cast rounds the same way; Triton's interpreter rounds wrongly where the
    mantissa carries into the exponent, and the kernel tests run there.) e4m3 keeps 3 mantissa bits down to
    2^-6 and steps by 2^-9 below that (subnormals). A negative x that rounds to zero gives -0, as the cast does."""
    bits = x.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    step_exponent = tl.maximum(exponent, -6) - 3
    steps = x * _power_of_two(-step_exponent)          # exact: |steps| <= 16
    steps = (steps + 12582912.0) - 12582912.0          # + 1.5 * 2^23: fp32 addition rounds to an integer, ties even
    rounded = (steps * _power_of_two(step_exponent)).to(tl.uint32, bitcast=True)
    return (rounded | (bits & 0x80000000)).to(tl.float32, bitcast=True)   # the sign bit, which the addition drops at 0


@triton.jit
def _to_cache(x, inverse_scale, cache_ptr, QUANTIZE: tl.constexpr):
    if QUANTIZE:
        x = round_to_e4m3(tl.clamp(x.to(tl.float32) * inverse_scale, -_FP8_MAX, _FP8_MAX))
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_inverse_scale,
                     v_inverse_scale, num_kv_heads,
                     head_dim, stride_kt, stride_kh, stride_vt, stride_vh, stride_kcb, stride_kcs, stride_kch,
                     stride_vcb, stride_vcs, stride_vch, stride_vcd, PAGE: tl.constexpr, HEADS_POW2: tl.constexpr,
                     DIM_POW2: tl.constexpr, QUANTIZE: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block, offset = slot // PAGE, slot % PAGE
    heads = tl.arange(0, HEADS_POW2)[:, None]
    dims = tl.arange(0, DIM_POW2)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim)
    key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims,
             _to_cache(key, k_inverse_scale, k_cache_ptr, QUANTIZE), mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims * stride_vcd,
             _to_cache(value, v_inverse_scale, v_cache_ptr, QUANTIZE), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Triton twin of `store_kv_ref`: one program per token; key/value may be strided views (last dim dense), the
    V cache keys-contiguous (its head_dim strided)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(2) == value.stride(2) == k_cache.stride(3) == 1
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale, num_kv_heads, head_dim, key.stride(0),
        key.stride(1), value.stride(0), value.stride(1), *k_cache.stride()[:3], *v_cache.stride(),
        PAGE=k_cache.shape[1], HEADS_POW2=triton.next_power_of_2(num_kv_heads),
        DIM_POW2=triton.next_power_of_2(head_dim), QUANTIZE=k_cache.dtype == KV_FP8,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1)
