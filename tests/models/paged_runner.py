"""Runs a batchgen model the way the engine's model runner does, for tests that need a real paged forward."""
import torch

from batchgen.models.attention import AttentionMetadata

BLOCK_SIZE = 4
NUM_BLOCKS = 64
# per sequence: the tokens of each step; step 0 is the prefill, step 1 continues on cached context (a chunk of
# a longer prompt, or one token), later steps decode one token per sequence
STEP_LENGTHS = [[7, 1, 1, 1, 1], [9, 5, 1, 1, 1], [3, 1, 1, 1], [4, 7, 1, 1, 1]]


class PagedSequences:
    """Drives a model the way the engine's runner does: one flat token batch per step, K/V in a block pool
    handed out from a shuffled free list, so every sequence's blocks are scattered and interleaved."""

    def __init__(self, model, config, seed: int = 0):
        self.model = model
        generator = torch.Generator().manual_seed(seed)
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        for layer in model.attention_layers:
            # the KV heads this (tensor-parallel) rank caches
            shape = (NUM_BLOCKS, BLOCK_SIZE, layer.num_kv_heads, config.head_dim)
            # garbage rather than zeros: reading a slot nobody wrote changes the logits
            layer.k_cache = torch.randn(shape, generator=generator).to(weight)
            layer.v_cache = torch.randn(shape, generator=generator).to(weight)
        self.free_blocks = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
        self.block_tables: dict[int, list[int]] = {}
        self.num_cached: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]], last_rows_only: bool = False
             ) -> tuple[dict[int, torch.Tensor], AttentionMetadata]:
        """chunks: sequence -> its next tokens. Returns each sequence's logits for those tokens (for the last one
        alone, asking the model for those rows only, as a step that samples them does), and the metadata."""
        input_ids, positions, slots, query_start_loc, seq_lens = [], [], [], [0], []
        for seq, tokens in chunks.items():
            start = self.num_cached.get(seq, 0)
            end = start + len(tokens)
            table = self.block_tables.setdefault(seq, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free_blocks.pop())
            for position in range(start, end):
                positions.append(position)
                slots.append(table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE)
            input_ids += tokens
            query_start_loc.append(query_start_loc[-1] + len(tokens))
            seq_lens.append(end)
            self.num_cached[seq] = end
        block_tables = torch.zeros(len(chunks), max(len(self.block_tables[seq]) for seq in chunks), dtype=torch.int32)
        for row, seq in enumerate(chunks):
            block_tables[row, :len(self.block_tables[seq])] = torch.tensor(self.block_tables[seq])
        device = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=block_tables.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(len(tokens) for tokens in chunks.values()), max_seq_len=max(seq_lens))
        rows = torch.tensor(query_start_loc[1:], device=device) - 1 if last_rows_only else None
        with torch.no_grad():
            hidden = self.model(torch.tensor(input_ids, device=device), torch.tensor(positions, device=device), meta,
                                rows)
            logits = self.model.compute_logits(hidden).float().cpu()
        if last_rows_only:
            return {seq: logits[row:row + 1] for row, seq in enumerate(chunks)}, meta
        return {seq: logits[query_start_loc[row]:query_start_loc[row + 1]] for row, seq in enumerate(chunks)}, meta


def run_paged(model, config, sequences: list[list[int]], last_rows_only: bool = False) -> list[torch.Tensor]:
    """Logits [len, vocab] of every sequence, computed in the steps STEP_LENGTHS describes; with last_rows_only
    [steps, vocab], the logits of each step's last token (see PagedSequences.step)."""
    paged = PagedSequences(model, config)
    logits: list[list[torch.Tensor]] = [[] for _ in sequences]
    for step in range(max(len(lengths) for lengths in STEP_LENGTHS)):
        chunks = {}
        for seq, lengths in enumerate(STEP_LENGTHS):
            if step < len(lengths):
                start = sum(lengths[:step])
                chunks[seq] = sequences[seq][start:start + lengths[step]]
        step_logits, meta = paged.step(chunks, last_rows_only)
        assert meta.decode_only == (step >= 2)
        for seq, rows in step_logits.items():
            logits[seq].append(rows)
    return [torch.cat(rows) for rows in logits]


