"""A character-level tokenizer: the vocabulary of the tiny trained and written checkpoints (`vocab.json`).

    tokenizer = CharTokenizer.load(directory)        # {"type": "char", "chars": [...]}, chars[0] unknown
    ids = tokenizer.encode("To be")                  # int64 [T]
    text = tokenizer.decode(ids)

`benchmarks/train_tiny_moe.py` builds and saves one beside its checkpoint; `write_tiny_checkpoint` writes one;
`python -m dali_compile run` reads it when the checkpoint has no Hugging Face tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

UNKNOWN = "\x00"  # stands for every character outside the vocabulary


class CharTokenizer:
    """Characters to ids [T] and back; `chars[0]` is the unknown character."""

    def __init__(self, chars: list[str]):
        if not chars or chars[0] != UNKNOWN:
            raise ValueError("the vocabulary must start with the unknown character")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str, min_count: int) -> CharTokenizer:
        counts: dict[str, int] = {}
        for c in text:
            counts[c] = counts.get(c, 0) + 1
        return cls([UNKNOWN] + sorted(c for c, n in counts.items() if n >= min_count and c != UNKNOWN))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 [len(text)]."""
        return torch.tensor([self.index.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, directory: Path) -> None:
        (directory / "vocab.json").write_text(json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False))

    @classmethod
    def load(cls, directory: Path) -> CharTokenizer:
        data = json.loads((Path(directory) / "vocab.json").read_text())
        if not isinstance(data, dict) or data.get("type") != "char":
            raise ValueError(f"{directory}/vocab.json is not a character vocabulary")
        return cls(data["chars"])
