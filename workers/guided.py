"""Structured output: a request's ``guide`` (a JSON schema, any JSON object, a regex, a
choice of strings, or a Lark grammar) becomes a mask of the tokens allowed next, applied
in the batched sampler before anything else sees the logits (llguidance).

``SamplingParams.guide`` is ``(kind, value)``: ``("json_schema", schema as JSON text)``,
``("json_object", "")``, ``("regex", pattern)``, ``("choice", JSON list of strings)`` or
``("grammar", Lark text)``. ``grammar_of`` turns it into an llguidance grammar;
``check_guide`` refuses a bad one with the reason (the API's 400).

Sampling stays stateless: the mask of a sequence's next token depends only on its guide
and the tokens it generated so far, which the step message carries for guided requests
(``History.output``). ``Guides`` keeps one matcher per sequence so each step consumes
only the new tokens, and rebuilds it from the output whenever the cached one does not
match (a replay, or another coherent rank sampling the sequence this step). When the
grammar is complete the mask allows only end-of-sequence.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import llguidance
import numpy as np
import torch

from raymoe.workers.sampling import GUIDE_KINDS as KINDS

MAX_MATCHERS = 4096  # sequences whose matcher a process keeps (least recently used dropped)
# Compact JSON (no free whitespace), as vLLM's default: a model cannot pad an object forever.
JSON_OPTIONS = {"whitespace_flexible": False}


class GuideError(ValueError):
    """A guide that cannot be compiled; ``reason`` says why."""

    def __init__(self, kind: str, reason: str):
        self.kind, self.reason = kind, reason
        super().__init__(f"the {kind} guide is invalid: {reason}")


def grammar_of(guide: tuple[str, str]) -> str:
    """The llguidance grammar of ``guide``; GuideError when it is malformed."""
    kind, value = guide
    try:
        if kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(json.loads(value), overrides=JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            choices = json.loads(value)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise GuideError(kind, "expected a non-empty list of non-empty strings")
            return llguidance.LLMatcher.grammar_from_regex("|".join(_regex_escape(c) for c in choices))
        if kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(value)
    except GuideError:
        raise
    except (ValueError, TypeError) as exc:
        raise GuideError(kind, str(exc)) from None
    raise GuideError(kind, f"unknown kind; expected one of {list(KINDS)}")


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in text)


def check_guide(guide: tuple[str, str], tokenizer: llguidance.LLTokenizer | None = None) -> None:
    """Raise GuideError if ``guide`` does not compile (with the tokenizer's vocabulary, if given)."""
    message = llguidance.LLMatcher.validate_grammar(grammar_of(guide), tokenizer)
    if message and not message.startswith("WARNING"):
        raise GuideError(guide[0], message)


def ll_tokenizer(tokenizer_json: str | Path, vocab_size: int, eos_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of a checkpoint's ``tokenizer.json`` (a path, or its text), with
    the model's vocabulary size (embedding rows past the tokenizer's are never allowed).

    llguidance reads byte-level BPE and SentencePiece-style tokenizers itself; for a
    decoder it does not know (a character-level tokenizer's ``Fuse``) each token's bytes
    are its own decoding, which is exact where no token holds part of a character.
    GuideError when neither works."""
    text = Path(tokenizer_json).read_text() if isinstance(tokenizer_json, Path) else tokenizer_json
    eos = list(eos_ids) or None
    try:
        return llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=eos)
    except ValueError as native:
        try:
            return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_DecodedTokens(text, eos_ids)),
                                          n_vocab=vocab_size, eos_token=eos)
        except (ValueError, TypeError) as exc:
            raise GuideError("tokenizer", f"structured output cannot read this model's tokenizer ({native}; {exc})") \
                from None


class _DecodedTokens:
    """What ``llguidance.TokenizerWrapper`` asks of a tokenizer, from ``tokenizers``."""

    def __init__(self, text: str, eos_ids: tuple[int, ...]):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(text)
        added = self._tok.get_added_tokens_decoder()
        self.special_token_ids = sorted(i for i, token in added.items() if token.special)
        self.tokens = [self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
                       for i in range(self._tok.get_vocab_size(with_added_tokens=True))]
        self.eos_token_id = eos_ids[0] if eos_ids else (self.special_token_ids or [0])[0]
        self.bos_token_id = None

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


class Guides:
    """The masks of guided sequences, in the process that samples them: the model's
    ``tokenizer.json``, its vocabulary size and end-of-sequence ids (llguidance's view of
    the vocabulary is built at the first guided request)."""

    def __init__(self, tokenizer_json: str | Path, vocab_size: int, eos_ids: tuple[int, ...]):
        self.tokenizer_json, self.vocab_size, self.eos_ids = tokenizer_json, vocab_size, tuple(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._matchers: OrderedDict[int, tuple[tuple[str, str], llguidance.LLMatcher, int]] = OrderedDict()
        self._grammars: dict[tuple[str, str], str] = {}

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = ll_tokenizer(self.tokenizer_json, self.vocab_size, self.eos_ids)
        return self._tokenizer

    def allowed(self, seq_id: int, guide: tuple[str, str], output: tuple[int, ...]) -> torch.Tensor:
        """``[V]`` bool: the tokens ``guide`` allows after ``output``."""
        matcher = self._matcher(seq_id, guide, output)
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool))
        if not bool(allowed.any()):  # an error state (it cannot happen to masked tokens): end the sequence
            allowed[list(self.eos_ids) or [self.tokenizer.eos_token]] = True
        return allowed

    def _matcher(self, seq_id: int, guide: tuple[str, str], output: tuple[int, ...]) -> llguidance.LLMatcher:
        cached = self._matchers.pop(seq_id, None)
        if cached is not None and cached[0] == guide and cached[2] <= len(output):
            _, matcher, consumed = cached
        else:
            if guide not in self._grammars:
                self._grammars[guide] = grammar_of(guide)
            matcher, consumed = llguidance.LLMatcher(self.tokenizer, self._grammars[guide], log_level=0), 0
        if len(output) > consumed:
            matcher.consume_tokens(list(output[consumed:]))
        self._matchers[seq_id] = (guide, matcher, len(output))
        while len(self._matchers) > MAX_MATCHERS:
            self._matchers.popitem(last=False)
        return matcher


def guide_masks(guides: Guides | None, seqs) -> list[torch.Tensor | None] | None:
    """The allowed-token masks of a step's guided sequences (``SeqStep``\ s), None for the
    others; None when none is guided."""
    if not any(s.params.guide for s in seqs):
        return None
    if guides is None:
        raise GuideError(seqs[0].params.guide[0], "structured output needs the model's tokenizer.json")
    return [guides.allowed(s.seq_id, s.params.guide, s.history.output) if s.params.guide else None for s in seqs]


def model_guides(model_dir: str | Path, vocab_size: int, eos_ids: tuple[int, ...]) -> Guides | None:
    """``Guides`` for a checkpoint directory, or None when it has no tokenizer.json."""
    path = Path(model_dir) / "tokenizer.json"
    return Guides(path, vocab_size, eos_ids) if path.is_file() else None
