"""Prompt logprobs: for each prompt token after the first, its logprob given the tokens before it and the top-k
alternatives, computed from the hidden states the prefill passes produce anyway.

Full-vocabulary fp32 logits of every prompt position would be gigabytes for one 8k-token step, so they are
made, normalised and gathered `chunk_rows` positions at a time; the engine sets that to max_num_seqs, the
rows of logits a sampling step already holds (and the sampler copies), so the step's peak memory, which the
KV sizing leaves room for, does not grow. Requests that score their prompt bypass the prefix cache (every position needs its hidden
state); the blocks they compute are still offered to others.
"""
from dataclasses import dataclass, field

import torch

from batchgen.engine.request import Request
from batchgen.engine.transfer import to_device
from batchgen.outputs import TokenLogprobs


@dataclass
class PromptPositions:
    """Rows of a step's flat batch whose next token is a prompt token some request scores."""
    flat_rows: list[int] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)
    # (request, prompt position of its first target, number of targets), in flat_rows order
    spans: list[tuple[Request, int, int]] = field(default_factory=list)

    def add(self, request: Request, flat_offset: int, start: int, end: int) -> None:
        """The request runs positions [start, end) at flat rows flat_offset...; position p predicts prompt
        token p + 1."""
        last = min(end, request.num_prompt_tokens - 1)
        if start >= last:
            return
        self.flat_rows.extend(range(flat_offset, flat_offset + last - start))
        self.target_ids.extend(request.prompt_token_ids[start + 1:last + 1])
        self.spans.append((request, start + 1, last - start))

    def __bool__(self) -> bool:
        return bool(self.flat_rows)

    def score(self, model: torch.nn.Module, hidden: torch.Tensor, chunk_rows: int) -> None:
        """Compute the logprobs and write them into each request's `prompt_logprobs` (a list the engine made
        when the request arrived); waits for the device."""
        # (a tensor-parallel rank other than 0 gets the rows without their requests: it only makes the logits)
        top_k = max((request.params.prompt_logprobs for request, _, _ in self.spans), default=0)
        rows = to_device(self.flat_rows, hidden.device)
        targets = to_device(self.target_ids, hidden.device)
        token_logprobs, top_values, top_ids = [], [], []
        for first in range(0, len(self.flat_rows), chunk_rows):
            chunk = slice(first, first + chunk_rows)
            logits = model.compute_logits(hidden[rows[chunk]]).float()
            # logprob = logit - logsumexp: no second full-vocab buffer, as log_softmax would make
            log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
            token_logprobs.append((logits.gather(1, targets[chunk, None]) - log_normalizer).squeeze(1))
            if top_k:
                values, ids = logits.topk(top_k, dim=-1)
                top_values.append(values - log_normalizer)
                top_ids.append(ids)
            del logits
        token_logprobs = torch.cat(token_logprobs).tolist()
        top_values = torch.cat(top_values).tolist() if top_k else None
        top_ids = torch.cat(top_ids).tolist() if top_k else None
        row = 0
        for request, first_position, count in self.spans:
            k = request.params.prompt_logprobs
            for position in range(first_position, first_position + count):
                top = dict(zip(top_ids[row][:k], top_values[row][:k])) if k else {}
                request.prompt_logprobs[position] = TokenLogprobs(request.prompt_token_ids[position],
                                                                  token_logprobs[row], top)
                row += 1
