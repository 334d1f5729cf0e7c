"""Hugging Face fast tokenizer behind the few calls the engine and jobs make: encode, chat template, decode,
stop strings.

One `Tokenizer` serves every thread of a worker: shard threads encode rows and decode outputs while the engine
loop's thread decodes stop-string windows. HF fast tokenizers are Rust objects that raise "Already borrowed"
when a call that changes them (truncation, padding, added tokens) meets another thread's call, so every use of
the HF tokenizer goes through this wrapper under one lock. Held for one encode or decode at a time, it costs
microseconds.
"""
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import AutoTokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str | Path) -> "Tokenizer | None":
    """None for a model directory without tokenizer files (dummy-weight benchmark models): such a model
    takes token-id prompts only and returns no text."""
    if Path(path).is_dir() and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        return None
    return Tokenizer(path)


class Tokenizer:
    def __init__(self, path: str | Path):
        self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        self._lock = threading.Lock()
        self._size = len(self._hf)

    def __len__(self) -> int:
        return self._size

    @contextmanager
    def borrowed(self) -> Iterator:
        """The HF tokenizer itself, this thread's alone until the block ends (grammar setup reads it whole)."""
        with self._lock:
            yield self._hf

    def encode(self, text: str) -> list[int]:
        """Plain prompt text; the tokenizer adds its special tokens (e.g. BOS) as the model expects."""
        with self._lock:
            return self._hf.encode(text)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Messages through the model's chat template; the template writes every special token itself."""
        with self._lock:
            if not self._hf.chat_template:
                raise ValueError("this model's tokenizer has no chat template; send 'prompt' text instead of "
                                 "'messages'")
            text = self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            return self._hf.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        with self._lock:
            return self._hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def find_new_stop(self, token_ids: list[int], stops: list[str], window: int | None = None,
                      skip_special_tokens: bool = False) -> tuple[str, str] | None:
        """The stop string completed by the last token, if any, with the decoded text of
        `token_ids[-window:]` (all of them when window is None) cut just before it. Matches lying wholly
        before the last token were seen (or deliberately passed over) at earlier steps."""
        tail = token_ids if window is None else token_ids[-window:]
        with self._lock:
            text = self._hf.decode(tail, skip_special_tokens=skip_special_tokens)
            before = len(self._hf.decode(tail[:-1], skip_special_tokens=skip_special_tokens))
        for stop in stops:
            start = text.find(stop, max(0, before - len(stop) + 1))
            if start >= 0:
                return stop, text[:start]
        return None

    def stop_window(self, stops: list[str]) -> int:
        """Tokens to decode to see any stop string whole: a token spells at least one character, plus slack
        for a character split over byte tokens."""
        return max(len(s) for s in stops) + 4
