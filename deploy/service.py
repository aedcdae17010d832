"""What the served model offers every front door (HTTP and gRPC alike): check the model
name and the API key, submit prompts to the engine loop, and give back whole choices or
a stream of text pieces. A request whose consumer goes away is aborted, freeing its
KV-cache slot.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from typing import AsyncIterator

from deploy.engine_loop import EngineLoop, EngineStoppedError, FailEvent, FinishEvent, RequestStream, TokenEvent
from deploy.errors import APIError, from_engine_error, invalid, model_not_found, unauthorized, unavailable
from deploy.metrics import ServingMetrics
from deploy.prompts import PromptEncoder
from deploy.text_stream import TextStream
from workers.engine import QueueFullError
from workers.sampling import SamplingParams
from workers.scheduler import RequestError


@dataclass(frozen=True)
class Piece:
    """New output of one choice: text (may be empty) and token ids; the last piece of a
    choice has its ``finish_reason``."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass(frozen=True)
class Health:
    ready: bool
    actors: int  # actors of the deployment
    alive: int  # of them, those that answered
    reason: str = ""


class ModelService:
    def __init__(self, name: str, loop: EngineLoop, encoder: PromptEncoder, metrics: ServingMetrics,
                 api_key: str | None = None):
        self.name, self.loop, self.encoder, self.metrics = name, loop, encoder, metrics
        self._api_key = api_key.encode() if api_key else None
        self.created = int(time.time())

    # -- checks at the edge -----------------------------------------------------------
    @property
    def requires_key(self) -> bool:
        return self._api_key is not None

    def check_key(self, authorization: str | None) -> None:
        """``Authorization: Bearer <key>``, compared in constant time."""
        if self._api_key is None:
            return
        if not authorization:
            raise unauthorized("missing API key")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise unauthorized("invalid API key")

    def check_model(self, model: str) -> None:
        """The served name; an empty name (gRPC default) means this model."""
        if model and model != self.name:
            raise model_not_found(model, self.name)

    # -- submit -----------------------------------------------------------------------
    async def start(self, prompts: list[list[int]], params: list[SamplingParams],
                    prompt_param: str = "prompt") -> list[RequestStream]:
        """Submit every choice together; if one is refused, none runs and the refusal is raised."""
        limit = self.loop.engine.max_queue
        if limit is not None and len(prompts) > limit:  # would be refused however long a client waits
            raise invalid(f"the request asks for {len(prompts)} completions (prompts x n); this server queues at "
                          f"most {limit} at once", "n")
        try:
            streams = await self.loop.submit_all(list(zip(prompts, params)))
        except (RequestError, QueueFullError) as exc:
            raise from_engine_error(exc, prompt_param) from None
        except EngineStoppedError as exc:
            raise unavailable(exc.reason) from None
        self.metrics.count_prompt(sum(len(s.prompt_ids) for s in streams))
        return streams

    def abort(self, streams: list[RequestStream]) -> None:
        for stream in streams:
            if not stream.done:
                self.loop.abort(stream.request_id)

    # -- results ----------------------------------------------------------------------
    async def collect(self, streams: list[RequestStream], stops: list[tuple[str, ...]]) -> list[Choice]:
        """Wait for every choice (aborting all of them if the caller is cancelled)."""
        choices: list[Choice] = []
        try:
            for index, (stream, stop) in enumerate(zip(streams, stops)):
                text, ids, reason = [], [], None
                async for piece in self._pieces(index, stream, stop):
                    text.append(piece.text)
                    ids.extend(piece.token_ids)
                    reason = piece.finish_reason
                choices.append(Choice(index, "".join(text), ids, reason or "abort"))
        finally:
            self.abort(streams)
        return choices

    async def stream(self, streams: list[RequestStream], stops: list[tuple[str, ...]]) -> AsyncIterator[Piece]:
        """Pieces of all choices as they come; closing the iterator aborts what is left."""
        if len(streams) == 1:
            try:
                async for piece in self._pieces(0, streams[0], stops[0]):
                    yield piece
            finally:
                self.abort(streams)
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for piece in self._pieces(index, streams[index], stops[index]):
                    merged.put_nowait(piece)
            except APIError as exc:
                merged.put_nowait(exc)
            merged.put_nowait(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await merged.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, APIError):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            self.abort(streams)

    async def _pieces(self, index: int, stream: RequestStream, stop: tuple[str, ...]) -> AsyncIterator[Piece]:
        """Text pieces of one request. Tokens that arrived together are sent together."""
        tokenizer = self.encoder.tokenizer
        text = TextStream(tokenizer.decode if tokenizer else None, stop)
        events = aiter(stream)
        while True:
            event = await anext(events)
            ids, piece = [], []
            while isinstance(event, TokenEvent):
                ids.append(event.token_id)
                piece.append(text.push(event.token_id))
                if stream.queue.empty():
                    break
                event = await anext(events)
            if ids:
                yield Piece(index, "".join(piece), ids)
            if isinstance(event, FinishEvent):
                yield Piece(index, text.finish(event.completion.text), [], event.completion.finish_reason)
                return
            if isinstance(event, FailEvent):
                raise unavailable(event.error.reason)

    # -- health -----------------------------------------------------------------------
    async def health(self, timeout_s: float = 5.0) -> Health:
        """Ready when the engine loop steps and every actor of the deployment answers."""
        actors = list(getattr(self.loop.engine, "actors", []))
        if not self.loop.running:
            reason = f"engine loop stopped ({self.loop.failure!r})" if self.loop.failure else "engine loop stopped"
            return Health(False, len(actors), 0, reason)
        alive = 0
        for actor in actors:
            try:
                await asyncio.wait_for(asyncio.wrap_future(actor.where.remote().future()), timeout_s)
                alive += 1
            except Exception as exc:  # RayActorError, timeout
                return Health(False, len(actors), alive, f"actor {alive} did not answer: {type(exc).__name__}")
        return Health(True, len(actors), alive)
