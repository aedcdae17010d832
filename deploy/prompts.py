"""Prompts -> token ids, and request fields -> ``SamplingParams``, within the context window.

Everything a request can get wrong about its prompt or its limits is caught here, before
the engine sees it, as an ``APIError`` naming the field: an empty prompt, a token id
outside the vocabulary, a prompt that fills the context window, ``max_tokens`` beyond
it, a text prompt for a model without a tokenizer, sampling values out of range.

The context window is ``min(batching.max_seq_len, max_position_embeddings)`` tokens,
prompt and generated together.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.deploy.chat import ChatRenderer, ChatTemplateError
from raymoe.deploy.errors import APIError, from_engine_error, invalid
from raymoe.workers.sampling import SamplingParams, SamplingParamsError
from raymoe.workers.tokenizer import Tokenizer

SAMPLING_EPS = 1e-5  # temperatures below this are greedy; top_p values below it are raised to it


@dataclass(frozen=True)
class Limits:
    """What a request may ask for, by field (API names)."""

    max_tokens: int | None  # None: the rest of the context window
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None  # token id (as text, OpenAI's) -> bias
    min_p: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None  # alternatives per generated token (None: no logprobs)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (``echo``)
    guide: tuple[str, str] | None = None  # structured output (workers/guided.py)


def _check_unicode(text: str, param: str) -> None:
    """JSON can escape a lone UTF-16 surrogate (``"\\ud800"``), which is no Unicode
    character: the tokenizer cannot take it, so it is refused here, naming its position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"'{param}' holds an unpaired UTF-16 surrogate ({text[exc.start]!r}) at character "
                      f"{exc.start}: send valid Unicode text (pair surrogates as JSON does for emoji)", param) from None


class PromptEncoder:
    """Turns prompts into token ids and checks them against the model."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, context_len: int,
                 sampling_defaults: dict | None = None, chat_template: tuple[str, str] | None = None):
        """``sampling_defaults``: the checkpoint's ``temperature`` / ``top_p`` / ``top_k``
        for requests that leave them out (``GenerationDefaults.sampling()``);
        ``chat_template``: (text, source) replacing the checkpoint's template."""
        self.tokenizer, self.vocab_size, self.context_len = tokenizer, vocab_size, context_len
        self._guide_tokenizer = None
        self.defaults = dict(sampling_defaults or {})
        self.chat = ChatRenderer(tokenizer.config if tokenizer else None, bool(tokenizer and tokenizer.add_bos),
                                 tokenizer.chat_template_file if tokenizer else None, chat_template)

    def guide_tokenizer(self):
        """llguidance's view of the vocabulary (``workers/guided.py``), built at the first
        structured-output request; GuideError when this tokenizer cannot be read."""
        if self._guide_tokenizer is None:
            from raymoe.workers.guided import ll_tokenizer

            eos = (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
            self._guide_tokenizer = ll_tokenizer(self.tokenizer.json_text, self.vocab_size, eos)
        return self._guide_tokenizer

    def token_text(self, token: int) -> str:
        """One token's text, as logprobs show it (``token_id:N`` without a tokenizer, as vLLM)."""
        return self.tokenizer.token_text(token) if self.tokenizer is not None else f"token_id:{token}"

    def text(self, text: str, param: str = "prompt") -> list[int]:
        return self.check(self.tokenize(text, param), param)

    def tokenize(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of ``text``, of any length (``text`` also checks them against the context)."""
        if not text:
            raise invalid(f"'{param}' is empty: send at least one character", param)
        _check_unicode(text, param)
        if self.tokenizer is None:
            raise invalid("this model has no tokenizer: send the prompt as token ids", param)
        return self.tokenizer.encode(text)

    def ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        return self.check(self.known_ids(ids, param), param)

    def known_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        """``ids``, each in the vocabulary, of any length."""
        if not ids:
            raise invalid(f"'{param}' is empty: send at least one token id", param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid(f"'{param}' holds token id {bad[0]}: expected ids in [0, {self.vocab_size})", param)
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (``echo`` of a token-id prompt; without a tokenizer the
        ids' ``token_id:N`` names)."""
        return self.tokenizer.decode(ids) if self.tokenizer is not None else "".join(map(self.token_text, ids))

    def completion_prompts(self, prompt: str | list) -> list[list[int]]:
        """The four OpenAI prompt forms: text, texts, token ids, lists of token ids."""
        if isinstance(prompt, str):
            return [self.text(prompt)]
        if not prompt:
            raise invalid("'prompt' is empty: send text or token ids", "prompt")
        if all(isinstance(p, str) for p in prompt):
            return [self.text(p) for p in prompt]
        if all(isinstance(p, int) for p in prompt):
            return [self.ids(prompt)]
        return [self.ids(p) for p in prompt]

    def chat_prompt(self, messages: list[dict], template_kwargs: dict | None = None,
                    tools: list[dict] | None = None) -> list[int]:
        if self.tokenizer is None:
            raise invalid("this model has no tokenizer, so it cannot chat: use /v1/completions with token ids",
                          "messages")
        for index, message in enumerate(messages):
            for key in ("content", "name"):
                if isinstance(message.get(key), str):
                    _check_unicode(message[key], f"messages.{index}.{key}")
        try:
            text = self.chat.render(messages, template_kwargs, tools)
        except ChatTemplateError as exc:
            raise invalid(str(exc), exc.param) from None
        return self.text(text, "messages")

    def check(self, ids: list[int], param: str) -> list[int]:
        if len(ids) >= self.context_len:
            raise APIError(400, f"'{param}' has {len(ids)} tokens; the context window is {self.context_len} tokens "
                           f"(prompt + generated), so a prompt may have at most {self.context_len - 1}",
                           "invalid_request_error", param, "context_length_exceeded")
        return ids

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``{"token id": bias}`` -> sorted (id, bias) pairs; ids in the vocabulary,
        biases in [-100, 100]."""
        out = []
        for key, value in (bias or {}).items():
            if not key.isdigit() or int(key) >= self.vocab_size:
                raise invalid(f"'logit_bias' has key {key!r}: expected token ids in [0, {self.vocab_size}) as "
                              "strings", "logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise invalid(f"'logit_bias' has {value!r} for token {key}: expected a number in [-100, 100]",
                              "logit_bias")
            out.append((int(key), float(value)))
        return tuple(sorted(out))

    def sampling_params(self, limits: Limits, prompt_len: int, prompt_param: str = "prompt") -> SamplingParams:
        """``SamplingParams`` for one prompt; ``max_tokens`` must fit the context window."""
        room = self.context_len - prompt_len
        max_tokens = room if limits.max_tokens is None else limits.max_tokens
        if max_tokens > room:
            raise APIError(400, f"'max_tokens' = {max_tokens}, but the prompt has {prompt_len} tokens and the context "
                           f"window is {self.context_len}: at most {room} new tokens fit", "invalid_request_error",
                           "max_tokens", "context_length_exceeded")
        if limits.stop and self.tokenizer is None:
            raise invalid("stop strings need the model's tokenizer, which it does not have: use stop_token_ids",
                          "stop")
        bad = [t for t in limits.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise invalid(f"'stop_token_ids' holds {bad[0]}: expected ids in [0, {self.vocab_size})",
                          "stop_token_ids")
        # The sampler computes in float32: logits / 1e-45 overflows to inf and top_p = 5e-324 rounds
        # to 0, both giving nan probabilities, which fail the step for the whole batch. So below
        # SAMPLING_EPS a temperature means greedy (as in vLLM) and a top_p means SAMPLING_EPS.
        temperature = 0.0 if limits.temperature < SAMPLING_EPS else limits.temperature
        top_p = max(limits.top_p, SAMPLING_EPS)
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  top_k=limits.top_k, seed=limits.seed, stop=limits.stop,
                                  stop_token_ids=limits.stop_token_ids, ignore_eos=limits.ignore_eos,
                                  presence_penalty=limits.presence_penalty, frequency_penalty=limits.frequency_penalty,
                                  repetition_penalty=limits.repetition_penalty,
                                  logit_bias=self._logit_bias(limits.logit_bias), min_p=limits.min_p,
                                  min_tokens=limits.min_tokens, logprobs=limits.logprobs,
                                  prompt_logprobs=limits.prompt_logprobs, guide=limits.guide)
        except SamplingParamsError as exc:
            raise from_engine_error(exc, prompt_param) from None
