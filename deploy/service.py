"""What the served model offers every front door (HTTP and gRPC alike): check the model
name and the API key, submit prompts to the engine loop, and give back whole choices or
a stream of text pieces. A request whose consumer goes away is aborted, freeing its
KV-cache slot.

Every request has a deadline, ``request_timeout_s`` after it reached the engine loop:
past it the request is aborted and its caller gets a 504 (gRPC ``DEADLINE_EXCEEDED``).
While the server drains (``start_draining``, on shutdown) new requests get a 503 and the
ones in flight run to their end, or are failed with a 503 by ``fail_in_flight``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from raymoe.cluster.config import DeploymentConfigError
from raymoe.deploy.engine_loop import (
    EngineLoop,
    EngineStoppedError,
    Event,
    FailEvent,
    FinishEvent,
    RequestStream,
    TokenEvent,
)
from raymoe.deploy.errors import (
    APIError,
    deadline_exceeded,
    from_engine_error,
    invalid,
    model_not_found,
    shutting_down,
    unauthorized,
    unavailable,
)
from raymoe.deploy.metrics import ServingMetrics
from raymoe.deploy.prompts import PromptEncoder
from raymoe.deploy.text_stream import TextStream
from raymoe.placement.errors import PlanError
from raymoe.placement.plan import PlacementPlan
from raymoe.workers.engine import QueueFullError
from raymoe.workers.sampling import SamplingParams, TokenLogprob
from raymoe.workers.scheduler import RequestError

log = logging.getLogger("raymoe.serve")


@dataclass(frozen=True)
class Piece:
    """New output of one choice: text (may be empty) and token ids; the last piece of a
    choice has its ``finish_reason``."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of token_ids, when the params ask
    prompt_logprobs: list[TokenLogprob] | None = None  # on a choice's first piece, when the params ask


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Health:
    ready: bool
    actors: int  # actors of the deployment
    alive: int  # of them, those that answered
    reason: str = ""


DEFAULT_REQUEST_TIMEOUT_S = 300.0


class ModelService:
    """Runs on one asyncio loop (the replica's): ``_open`` is touched only from it."""

    def __init__(self, name: str, loop: EngineLoop, encoder: PromptEncoder, metrics: ServingMetrics,
                 api_key: str | None = None, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 strict_fields: bool = False, root: str = ""):
        """``strict_fields``: refuse a request with a field raymoe does not know (400), instead
        of ignoring it with a warning. ``root``: the model directory (the model card's)."""
        self.name, self.loop, self.encoder, self.metrics = name, loop, encoder, metrics
        self.root = root
        self.strict_fields = strict_fields
        self._api_key = api_key.encode() if api_key else None
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())
        self.draining = False
        self._open: set[RequestStream] = set()  # submitted, not yet released by their caller

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

    def check_fields(self, unknown: list[str]) -> None:
        """A request's unknown top-level fields: ignored with one warning line naming them,
        or, in strict mode, a 400 naming the first."""
        if not unknown:
            return
        if self.strict_fields:
            raise invalid(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
        named = ", ".join(repr(name[:40]) for name in unknown[:10]) + (f" and {len(unknown) - 10} more"
                                                                        if len(unknown) > 10 else "")
        log.warning("ignoring request fields raymoe does not know: %s (--strict-fields refuses them)", named)

    def check_model(self, model: str) -> None:
        """The served name; an empty name (gRPC default) means this model."""
        if model and model != self.name:
            raise model_not_found(model, self.name)

    # -- submit -----------------------------------------------------------------------
    async def start(self, prompts: list[list[int]], params: list[SamplingParams],
                    prompt_param: str = "prompt") -> list[RequestStream]:
        """Submit every choice together; if one is refused, none runs and the refusal is raised."""
        if self.draining:
            raise shutting_down()
        limit = self.loop.engine.max_queue
        if limit is not None and len(prompts) > limit:  # would be refused however long a client waits
            raise invalid(f"the request asks for {len(prompts)} completions (prompts x n); this server queues at "
                          f"most {limit} at once", "n")
        try:  # the loop thread takes new requests between steps: a stuck step must not hold the caller
            streams = await asyncio.wait_for(self.loop.submit_all(list(zip(prompts, params))), self.request_timeout_s)
        except asyncio.TimeoutError:
            raise deadline_exceeded(self.request_timeout_s) from None
        except (RequestError, QueueFullError) as exc:
            raise from_engine_error(exc, prompt_param) from None
        except EngineStoppedError as exc:
            raise unavailable(exc.reason) from None
        self.metrics.count_prompt(sum(len(s.prompt_ids) for s in streams))
        self._open.update(streams)
        return streams

    def abort(self, streams: list[RequestStream]) -> None:
        """Release the caller's requests: those not finished are aborted (KV slots freed)."""
        self._open.difference_update(streams)
        for stream in streams:
            if not stream.done:
                self.loop.abort(stream.request_id)

    # -- draining ---------------------------------------------------------------------
    def start_draining(self) -> int:
        """Refuse new requests (503) from now on; returns how many are in flight."""
        self.draining = True
        return self.in_flight()

    def in_flight(self) -> int:
        """Requests submitted whose caller has not yet had their last event."""
        return sum(1 for stream in self._open if not stream.done)

    def fail_in_flight(self, reason: str) -> int:
        """End every request in flight now: its caller gets a 503 with ``reason``; returns how many."""
        failing = [stream for stream in self._open if not stream.done]
        for stream in failing:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, FailEvent(EngineStoppedError(reason)))
            self.loop.abort(stream.request_id)
        return len(failing)

    # -- results ----------------------------------------------------------------------
    async def collect(self, streams: list[RequestStream], stops: list[tuple[str, ...]]) -> list[Choice]:
        """Wait for every choice (aborting all of them if the caller is cancelled)."""
        choices: list[Choice] = []
        try:
            for index, (stream, stop) in enumerate(zip(streams, stops)):
                text, ids, scores, prompt, reason = [], [], [], None, None
                async for piece in self._pieces(index, stream, stop):
                    text.append(piece.text)
                    ids.extend(piece.token_ids)
                    scores.extend(piece.logprobs)
                    prompt = prompt or piece.prompt_logprobs
                    reason = piece.finish_reason
                choices.append(Choice(index, "".join(text), ids, reason or "abort", scores, prompt))
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
        text = TextStream(tokenizer.incremental().push if tokenizer else None, stop)
        events = aiter(stream)
        while True:
            event = await self._next_event(stream, events)
            ids, piece, scores, prompt = [], [], [], None
            while isinstance(event, TokenEvent):
                ids.append(event.token_id)
                piece.append(text.push(event.token_id))
                if event.logprob is not None:
                    scores.append(event.logprob)
                prompt = prompt or event.prompt_logprobs
                if stream.queue.empty():
                    break
                event = await self._next_event(stream, events)
            if ids:
                yield Piece(index, "".join(piece), ids, logprobs=scores, prompt_logprobs=prompt)
            if isinstance(event, FinishEvent):
                yield Piece(index, text.finish(event.completion.text), [], event.completion.finish_reason)
                return
            if isinstance(event, FailEvent):
                raise unavailable(event.error.reason)

    async def _next_event(self, stream: RequestStream, events: AsyncIterator[Event]) -> Event:
        """The request's next event, or a 504 once its deadline has passed (the caller's
        ``finally`` then aborts it)."""
        left = stream.arrived + self.request_timeout_s - time.perf_counter()
        if left <= 0:
            raise deadline_exceeded(self.request_timeout_s)
        if not stream.queue.empty():
            return await anext(events)
        try:
            return await asyncio.wait_for(anext(events), left)
        except asyncio.TimeoutError:  # TimeoutError from 3.11; the project supports 3.10
            raise deadline_exceeded(self.request_timeout_s) from None

    # -- plan changes -----------------------------------------------------------------
    async def set_plan(self, text: str) -> dict:
        """Switch the running deployment to the placement plan in ``text`` (the YAML
        `raymoe plan` writes) between two steps; expert weights move between the ranks and
        the requests in flight carry on (``Deployment.set_plan``). What moved, as a dict."""
        try:
            plan = PlacementPlan.loads(text, "plan")
        except PlanError as exc:
            raise invalid(f"the plan is invalid: {exc}", "plan") from None
        if not hasattr(self.loop.engine, "set_plan"):
            raise invalid("this server's engine is not distributed: it has no placement plan", "plan")
        try:
            moved = await self.loop.call(lambda engine: engine.set_plan(plan))
        except DeploymentConfigError as exc:
            raise invalid(f"the plan does not fit this deployment: {exc}", "plan") from None
        except EngineStoppedError as exc:
            raise unavailable(exc.reason) from None
        return {"object": "placement_plan", "policy": plan.policy, "num_ranks": plan.num_ranks,
                "experts_moved": moved["experts"], "bytes_moved": moved["bytes"], "seconds": moved["seconds"]}

    # -- health -----------------------------------------------------------------------
    async def health(self, timeout_s: float = 5.0) -> Health:
        """Ready when the engine loop steps and every actor of the deployment answers."""
        actors = list(getattr(self.loop.engine, "actors", []))
        if self.draining:
            return Health(False, len(actors), 0, "draining: the server is shutting down")
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
