"""Beam search driven over the engine one token at a time, in Hugging Face's formulation (`generate(num_beams=k)`,
early_stopping=False), so HF is its oracle.

Each round, every live beam becomes a one-token request asking for the top logprobs of its next token;
prefix caching serves the beam's context from the blocks its parent filled, so a round costs about one
decode per beam. Of the best max(2, 1 + #eos) * k continuations, those among the first k that end (eos or
length) join the finished list under score / length ** length_penalty; the best k others continue.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

from batchgen.engine.request import Request
from batchgen.sampling_params import SamplingParams


@dataclass
class Beam:
    token_ids: list[int]
    score: float        # sum of the tokens' logprobs


@dataclass
class BeamGroup:
    group_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    cache_salt: str | None = None
    running: list[Beam] = field(default_factory=lambda: [Beam([], 0.0)])
    finished: list[tuple[float, Beam]] = field(default_factory=list)   # (length-penalised score, beam)
    improvable: bool = True
    done: bool = False

    @property
    def num_candidates(self) -> int:
        return max(2, 1 + len(self.eos_token_ids)) * self.params.beam_width

    def probe_requests(self) -> list[Request]:
        probe = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True).model_copy(
            update={"logprobs": self.num_candidates})
        return [Request(f"{self.group_index}-beam{i}", self.prompt_token_ids + beam.token_ids, probe,
                        group_index=self.group_index, sample_index=i, cache_salt=self.cache_salt)
                for i, beam in enumerate(self.running)]

    def advance(self, probes: list[Request]) -> None:
        """Take one round's probe results (in `probe_requests` order) and move the beams one token on."""
        width, penalty = self.params.beam_width, self.params.length_penalty
        candidates = sorted(((beam.score + logprob, beam, token_id)
                             for beam, probe in zip(self.running, probes)
                             for token_id, logprob in probe.logprobs[0].top.items()),
                            key=lambda c: -c[0])[: self.num_candidates]
        length = len(self.running[0].token_ids) + 1
        at_limit = length >= self.params.max_tokens or len(self.prompt_token_ids) + length >= self.max_model_len
        ends = [at_limit or token_id in self.eos_token_ids for _, _, token_id in candidates]

        if self.improvable:
            for (score, beam, token_id), ended in zip(candidates[:width], ends):
                if ended:
                    self.finished.append((score / length ** penalty, Beam(beam.token_ids + [token_id], score)))
            self.finished = sorted(self.finished, key=lambda f: -f[0])[:width]
        self.running = [Beam(beam.token_ids + [token_id], score)
                        for (score, beam, token_id), ended in zip(candidates, ends) if not ended][:width]
        if len(self.finished) == width and self.running:
            best_possible = self.running[0].score / length ** penalty
            self.improvable = best_possible > self.finished[-1][0]
        self.done = not self.improvable or all(ends) or not self.running

    def best(self) -> list[Beam]:
        """The n best finished beams, best first."""
        return [beam for _, beam in self.finished[: self.params.n]]


def beam_search(groups: list[BeamGroup], run: Callable[[list[Request]], None]) -> None:
    """Advance all groups together until each is done; `run` takes probe requests to completion."""
    while live := [group for group in groups if not group.done]:
        rounds = [(group, group.probe_requests()) for group in live]
        run([probe for _, probes in rounds for probe in probes])
        for group, probes in rounds:
            group.advance(probes)
