"""One token per row, and the row's log-normalizer, in one pass over the vocabulary.

A sampled row draws by the exponential race: with q ~ Exp(1) per token, argmax(p / q) picks token t with
probability p_t. The kernel takes the same argmax as argmax(x - log q) on the processed logits x (softmax's
normalizer cannot move it), so it never writes the probabilities; beside it, it sums the raw logits' exp for the
logprobs. On a 128k vocabulary the torch form is ~8 passes over the [rows, vocab] logits (softmax, clamp, divide,
argmax, logsumexp's max, exp, sum), ~2 ms a step at 856 rows on an H200 (docs/benchmarks.md, the decode profile).
"""
import torch
import triton
import triton.language as tl

_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)


def pick_tokens_ref(processed: torch.Tensor, logits: torch.Tensor, noise: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """processed, logits [R, V] (float32, or a model's 16-bit logits, computed in float32); noise [R, V] float32
    Exp(1) draws, or None for argmax on every row (a row whose noise is all 1 takes its argmax too) -> (token ids
    [R] int64, logsumexp(logits) [R] float32)."""
    processed, logits = processed.float(), logits.float()
    if noise is None:
        scores = processed
    else:
        # q == 0 would turn a zero-probability token into 0/0 = NaN, which argmax prefers
        scores = processed.softmax(-1).div_(noise.clamp_min(_TINY.value))
    return scores.argmax(-1), logits.logsumexp(-1)


@triton.jit
def _pick_tokens_kernel(processed_ptr, logits_ptr, noise_ptr, token_ptr, lse_ptr, vocab, stride_p, stride_l,
                        stride_n, HAS_NOISE: tl.constexpr, SAME_LOGITS: tl.constexpr, BLOCK: tl.constexpr):
    """One program a row. Each lane keeps its own best score and running sums over the columns it visits, and
    the lanes meet once at the end: reducing across the block every iteration cost the loop shuffle trees and
    barriers (compiled for sm_90 by triton 3.6: 512 instructions an iteration against 458 with noise, most of them
    now the accurate log; 273 against 207 without)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    best_score = tl.full([BLOCK], float("-inf"), tl.float32)
    best_token = tl.zeros([BLOCK], tl.int32)
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        in_vocab = start + cols < vocab
        x = tl.load(processed_ptr + row * stride_p + start + cols, mask=in_vocab, other=float("-inf")
                    ).to(tl.float32)
        if HAS_NOISE:
            q = tl.load(noise_ptr + row * stride_n + start + cols, mask=in_vocab, other=1.0)
            score = x - tl.log(tl.maximum(q, _TINY))
        else:
            score = x
        better = score > best_score   # a lane keeps its first maximum
        best_token = tl.where(better, start + cols, best_token)
        best_score = tl.where(better, score, best_score)
        if SAME_LOGITS:
            raw = x
        else:
            raw = tl.load(logits_ptr + row * stride_l + start + cols, mask=in_vocab, other=float("-inf")
                          ).to(tl.float32)
        new_max = tl.maximum(running_max, raw)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)   # nothing finite yet: the sum stays 0
        running_sum = running_sum * tl.exp(running_max - shift) + tl.exp(raw - shift)
        running_max = new_max
    # the first token holding the best score, as torch.argmax picks (token 0 for a row of only -inf)
    row_best = tl.max(best_score, 0)
    token = tl.min(tl.where(best_score == row_best, best_token, vocab), 0)
    row_max = tl.max(running_max, 0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.sum(running_sum * tl.exp(running_max - shift), 0)
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(lse_ptr + row, row_max + tl.log(row_sum))


def pick_tokens(processed: torch.Tensor, logits: torch.Tensor, noise: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `pick_tokens_ref` (rows with a unit last stride; noise float32)."""
    num_rows, vocab = processed.shape
    token_ids = torch.empty(num_rows, dtype=torch.long, device=processed.device)
    log_normalizer = torch.empty(num_rows, dtype=torch.float32, device=processed.device)
    if num_rows == 0:
        return token_ids, log_normalizer
    for name, tensor in (("processed", processed), ("logits", logits), ("noise", noise)):
        if tensor is not None and (not tensor.dtype.is_floating_point or tensor.stride(-1) != 1):
            raise ValueError(f"pick_tokens needs floating-point {name} with contiguous rows")
    if noise is not None and noise.dtype != torch.float32:
        raise ValueError("pick_tokens needs float32 noise")
    same = logits.data_ptr() == processed.data_ptr() and logits.stride(0) == processed.stride(0)
    _pick_tokens_kernel[(num_rows,)](
        processed, logits, processed if noise is None else noise, token_ids, log_normalizer, vocab,
        processed.stride(0), logits.stride(0), processed.stride(0) if noise is None else noise.stride(0),
        HAS_NOISE=noise is not None, SAME_LOGITS=same, BLOCK=2048, num_warps=8)
    return token_ids, log_normalizer
