"""The checkpoint's tokenizer (``tokenizer.json``, via the ``tokenizers`` library), and the
incremental decoding of a growing output (``IncrementalDecoder``: constant work per token,
where decoding the whole output again at every token costs O(n) per token).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from raymoe.workers.model.errors import CheckpointError


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json"
        try:
            self.json_text = file.read_text()  # (structured output builds its own view of the vocabulary from it)
            self._tok = _HFTokenizer.from_str(self.json_text)
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(file, f"cannot be loaded as a tokenizer ({exc})", "restore tokenizer.json") from None
        config_file = path / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = path / "chat_template.jinja"  # transformers writes the chat template here now
        self.chat_template_file = template_file.read_text() if template_file.is_file() else None
        self.add_bos = bool(self.config.get("add_bos_token", False))
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")

    def _special_id(self, name: str) -> int | None:
        token = self.config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """The text of one token on its own, special tokens included (what logprobs name)."""
        return self._tok.decode([token], skip_special_tokens=False)

    def incremental(self) -> "IncrementalDecoder":
        """A decoder for one output that grows a token at a time."""
        return IncrementalDecoder(self)


REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of an incomplete UTF-8 character


class IncrementalDecoder:
    """The text of one output, a token at a time (tokenizers' ``DecodeStream``, which
    decodes a window of the last few tokens, so each token costs the same however long
    the output is).

    ``push(token)`` returns the text that token completes: "" while the token ends in
    the middle of a character (byte-level BPE splits characters across tokens); those
    tokens' text comes out with a later token's, and ``held()`` shows its complete
    characters meanwhile. The pieces are a prefix of ``Tokenizer.decode`` of all the
    tokens, and equal it once the output does not end in the middle of a character
    (tests/e2e/test_serving_parts.py checks both on random token ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []  # tokens since the last piece (their text is not out yet)

    def push(self, token_id: int) -> str:
        piece = self._stream.step(self._tokenizer._tok, token_id)
        if not piece:
            self._held.append(token_id)
            return ""
        self._held.clear()
        return piece

    def held(self) -> str:
        """The complete characters of the tokens whose text ``push`` has not returned yet
        (decoded on their own; a few tokens at most)."""
        return self._tokenizer.decode(self._held).rstrip(REPLACEMENT) if self._held else ""


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory, or None if it has no ``tokenizer.json``."""
    return Tokenizer(path) if (Path(path) / "tokenizer.json").is_file() else None
