"""Text to token ids and back for the command line: the checkpoint's Hugging Face tokenizer when it has one,
else its character vocabulary (`vocab.json`, as the tiny checkpoints have), else an error that points at
`--prompt-ids`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..char_tokenizer import CharTokenizer
from .options import CliError

# Files whose presence means a Hugging Face tokenizer (a character vocabulary.json is told apart by its "type").
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "merges.txt")


class HFText:
    """A transformers tokenizer; its chat template, where it has one, formats chat turns."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stop_ids(self, configured: set[int]) -> set[int]:
        """The checkpoint's generation-config ids and the tokenizer's end of sequence, as `generate` stops."""
        eos = self.tokenizer.eos_token_id
        return configured | (set() if eos is None else {int(eos)})

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            return plain_turns(self, messages)
        # The template's text, then ids: the same on every transformers release (the tokenized return changed).
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class CharText:
    """A character vocabulary: no special tokens, so generation stops at --max-new-tokens only."""

    def __init__(self, tokenizer: CharTokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).tolist()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def stop_ids(self, configured: set[int]) -> set[int]:
        """None: the config's end-of-sequence ids (its class's defaults) are ordinary characters here."""
        return set()

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return plain_turns(self, messages)


def plain_turns(text, messages: list[dict]) -> list[int]:
    """A conversation without a chat template: every turn's text on its own line(s), the reply follows."""
    return text.encode("".join(m["content"] + "\n" for m in messages))


def load_text(directory) -> HFText | CharText:
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CliError(f"--model {directory}: no such directory (a local Hugging Face checkpoint directory)")
    if any((directory / name).is_file() for name in _HF_TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            return HFText(AutoTokenizer.from_pretrained(directory, local_files_only=True))
        except (OSError, ValueError) as error:
            raise CliError(f"{directory}: its tokenizer cannot be loaded ({error}); pass token ids with "
                           "--prompt-ids 1,2,3 instead") from None
    vocabulary = directory / "vocab.json"
    if vocabulary.is_file():
        try:
            return CharText(CharTokenizer.load(directory))
        except (ValueError, KeyError, json.JSONDecodeError) as error:
            raise CliError(f"{vocabulary}: {error}; pass token ids with --prompt-ids 1,2,3 instead") from None
    raise CliError(f"{directory} has no tokenizer (no tokenizer.json / tokenizer_config.json, no character "
                   "vocab.json); pass token ids with --prompt-ids 1,2,3 (the output is printed as ids)")
