"""Token-by-token generation with a KV cache, timed: prefill apart from decode.

# B sequences, T prompt tokens, V vocabulary

One loop serves `run` (B = 1, each token printed as it comes, stopping at an end-of-sequence id) and `bench`
(B >= 1, a fixed number of tokens). It is a plain loop over the model's forward rather than `generate`, so
each forward is timed on its own and each token reaches the screen as soon as it is known.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..hf_compat import cache_keyword


@dataclass
class Timing:
    """Tokens and seconds of the prefill (the prompt's forward) and of the decode steps after it; for B
    sequences the tokens count every sequence's."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    def add(self, other: Timing) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.prefill_s += other.prefill_s
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s

    @property
    def prefill_rate(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_rate(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 and self.decode_tokens else None


class Sampler:
    """Next tokens [B] from last-position logits [B, V]: argmax at temperature 0, else softmax sampling at that
    temperature over the top_k logits (0: all), from a generator seeded once, so a seed repeats a run."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, seed: int = 0):
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, choose: Callable | None = None,
             stop_ids: set[int] = frozenset(), on_token: Callable[[int], None] | None = None
             ) -> tuple[list[list[int]], Timing]:
    """Up to `max_new_tokens` new tokens for each row of `input_ids` (int64 [B, T], on the model's device).
    With B = 1 generation stops after a token in `stop_ids` (which is kept, as `generate` keeps it), and
    `on_token` sees every token once it is known. Returns the new tokens per row and their timing (the
    callback's own time left out)."""
    from transformers import DynamicCache

    choose = choose or Sampler()
    batch, prompt_length = input_ids.shape
    cache = DynamicCache(config=model.config)
    keyword = cache_keyword(model)
    timing = Timing(prompt_tokens=batch * prompt_length)
    start = time.perf_counter()
    logits = model(input_ids=input_ids, **{keyword: cache}, use_cache=True).logits[:, -1]
    token = choose(logits)
    new = [token.tolist()]  # the host needs the token: this waits for the device
    timing.prefill_s = time.perf_counter() - start
    while True:
        if on_token is not None:
            on_token(new[-1][0])
        if len(new) == max_new_tokens or (batch == 1 and new[-1][0] in stop_ids):
            break
        start = time.perf_counter()
        logits = model(input_ids=token[:, None], **{keyword: cache}, use_cache=True).logits[:, -1]
        token = choose(logits)
        new.append(token.tolist())
        timing.decode_s += time.perf_counter() - start
        timing.decode_tokens += batch
    return [list(row) for row in zip(*new, strict=True)], timing


class TextPrinter:
    """Prints a sequence's text as its tokens come: the whole sequence is decoded each time (a token's text can
    depend on its neighbours) and what was not printed yet goes out, flushed; an incomplete UTF-8 character
    (decoded as U+FFFD) waits for the next token."""

    def __init__(self, text, out=None):
        self.text, self.out = text, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        decoded = self.text.decode(self.ids)
        if decoded.endswith("\ufffd"):
            return
        self.out.write(decoded[self.printed:])
        self.out.flush()
        self.printed = len(decoded)


class IdPrinter:
    """Prints token ids as they come, separated by spaces (for checkpoints without a tokenizer)."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.first = True

    def __call__(self, token: int) -> None:
        self.out.write(("" if self.first else " ") + str(token))
        self.out.flush()
        self.first = False
