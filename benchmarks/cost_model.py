"""The per-token cost model of docs/benchmarks.md (issue 11), in one place.

Kernels run one after another, so per token the costs add: each projection's GEMM FLOPs at the rate measured
for its shape (`fp8_gpu.py`, H200: decode rows at M = 256, prefill at M = 8,192, the fp8 rates including the
per-token activation quantization), the K/V a decode token reads at the measured copy bandwidth, and the rest:
the LM head of each sampled token and prefill attention's FLOPs. Only the work a token needs counts: of the last
layer a prompt's tokens before its last need only their K/V (the engine runs that layer's o, gate-up and down
projections over the sampled rows alone). A run is predicted as the sum over its tokens; a measured figure is
reported as predicted / measured (1.0: the engine runs at the model; below: slower).
"""
from dataclasses import dataclass

from batchgen.models.config import ModelConfig

# TFLOP/s of Llama-8B's qkv / o / gate-up / down projections on the H200 (docs/benchmarks.md, commit 6f10cc8)
GEMM_TFLOPS = {
    ("fp8", "decode"): (424, 269, 935, 540),
    ("bf16", "decode"): (464, 364, 614, 561),
    ("fp8", "prefill"): (1048, 1077, 1172, 855),
    ("bf16", "prefill"): (782, 729, 731, 760),
}
KV_READ_TB_S = 4.14          # measured copy bandwidth
LM_HEAD_TFLOPS = 495         # the doc's 1.0 ms for 471 rows of the 4,096 x 128,256 bf16 head
PREFILL_ATTENTION_TFLOPS = 300   # causal attention FLOPs of prefill (the doc's ~0.9 s of 1000 x 1000 tokens)


@dataclass(frozen=True)
class Prediction:
    prefill_s: float
    decode_s: float           # GEMMs + K/V reads + LM head of every generated token after the first
    decode_kv_s: float        # of which reading K/V

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def projection_flops(config: ModelConfig) -> tuple[float, float, float, float]:
    """FLOPs per token of one layer's qkv, o, gate-up and down projections."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return tuple(2.0 * params for params in (hidden * (q + 2 * kv), q * hidden, hidden * 2 * config.intermediate_size,
                                             config.intermediate_size * hidden))


def kv_bytes_per_token(config: ModelConfig, kv_element_bytes: int) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * kv_element_bytes


def _gemm_seconds(config: ModelConfig, layer_tokens: tuple[float, ...], weights: str, phase: str) -> float:
    """layer_tokens: the tokens each of the four projections runs over, summed over the layers."""
    return sum(flops * tokens / (rate * 1e12)
               for flops, tokens, rate in zip(projection_flops(config), layer_tokens, GEMM_TFLOPS[weights, phase]))


def predict(config: ModelConfig, weights: str, kv_element_bytes: int, num_requests: int, input_len: int,
            output_len: int) -> Prediction:
    """Seconds a run of `num_requests` prompts of `input_len` tokens, each generating `output_len`, should take;
    weights "fp8" or "bf16"."""
    lm_head_s = 2.0 * config.hidden_size * config.vocab_size / (LM_HEAD_TFLOPS * 1e12)
    attention_flops = (4.0 * input_len * input_len / 2 * config.num_attention_heads * config.head_dim
                       * config.num_hidden_layers)
    layers = config.num_hidden_layers
    last_layer_tail = (layers - 1) * input_len + 1   # o, gate-up, down: the last layer's over the last token
    prefill_gemm_s = _gemm_seconds(config, (layers * input_len, *[last_layer_tail] * 3), weights, "prefill")
    prefill_s = num_requests * (prefill_gemm_s + lm_head_s + attention_flops / (PREFILL_ATTENTION_TFLOPS * 1e12))
    decode_tokens = num_requests * (output_len - 1)
    # decode token t (1 .. output_len - 1) attends over input_len + t keys
    kv_tokens_read = num_requests * sum(input_len + t for t in range(1, output_len))
    decode_kv_s = kv_tokens_read * kv_bytes_per_token(config, kv_element_bytes) / (KV_READ_TB_S * 1e12)
    decode_gemm_s = _gemm_seconds(config, (layers * decode_tokens,) * 4, weights, "decode")
    decode_s = decode_gemm_s + decode_kv_s + decode_tokens * lm_head_s
    return Prediction(prefill_s, decode_s, decode_kv_s)
