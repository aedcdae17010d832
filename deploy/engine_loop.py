"""One thread drives the engine; every client request is a queue of events on its caller's
asyncio loop.

The engine (``workers.engine.Engine``: the distributed ``Deployment`` or the reference
engine) is not thread-safe, and its ``step()`` blocks for a whole forward pass. So a
single thread owns it: between two steps it takes the new requests and the aborts from
an inbox, then runs one step over every running sequence (continuous batching) and
hands each request its new token. Requests from HTTP, gRPC and Python callers all join
the same batch; none waits for another to finish.

Admission (``raymoe.deploy.admission``): before a request joins the engine's queue the loop
checks the queue limit (``batching.max_queue``) and, when ``max_wait_s`` is set, the
request's expected wait for a KV slot (from the queued token budgets and the measured step
time); a refused request gets a ``QueueFullError`` (HTTP 429) with a Retry-After.

Invariant: only the loop thread calls the engine. Callers talk to it through ``submit``
and ``abort``, which are safe from any thread or event loop. Per-request state (the
streams) lives only while the request is queued or running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Union

from raymoe.deploy.admission import STEP_EWMA, AdmissionPolicy, refusal
from raymoe.workers.engine import Completion, Engine, StepResult
from raymoe.workers.sampling import SamplingParams, TokenLogprob

log = logging.getLogger("raymoe.serve")


class EngineStoppedError(RuntimeError):
    """The engine loop is not running (stopped, or a step failed); carries the cause."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"the engine loop is not running: {reason}")


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    at: float  # time.perf_counter() when the step that sampled it returned
    logprob: TokenLogprob | None = None  # when the request's params ask
    prompt_logprobs: list[TokenLogprob] | None = None  # with a request's first token, when its params ask


@dataclass(frozen=True)
class FinishEvent:
    completion: Completion
    at: float


@dataclass(frozen=True)
class FailEvent:
    error: EngineStoppedError


Event = Union[TokenEvent, FinishEvent, FailEvent]


class RequestStream:
    """The events of one request, in order: tokens, then one ``FinishEvent`` (or a
    ``FailEvent`` when the engine died). Iterate it on the loop that submitted it."""

    def __init__(self, request_id: str, prompt_ids: list[int], loop: asyncio.AbstractEventLoop):
        self.request_id, self.prompt_ids, self.loop = request_id, prompt_ids, loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.done = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            yield event
            if not isinstance(event, TokenEvent):
                self.done = True
                return


@dataclass(frozen=True)
class _Add:
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    accepted: concurrent.futures.Future
    first: bool = True  # the first of a submission: the admission policy judges the submission by it


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Engine], object]
    done: concurrent.futures.Future


class EngineLoop:
    """Owns an engine and the thread that steps it.

    ``observer`` (optional, e.g. ``deploy.metrics.ServingMetrics``) is called on the loop
    thread: ``on_token(stream, now)`` before each token is handed over,
    ``on_finish(stream, completion, now)``, ``on_abort(stream)``, after every step
    ``on_step(engine, step_result, step_seconds)``, ``on_load(waiting, running, streams)``
    after taking new requests and after every step, and ``on_refuse(error)`` for each
    request refused at admission. Metrics hook in here, outside the engine.

    ``max_wait_s`` (``batching.max_wait_s``): refuse a request whose expected wait for a KV
    slot is longer (None: only the engine's ``max_queue`` limits admission).
    """

    def __init__(self, engine: Engine, observer=None, idle_wait_s: float = 0.5, max_wait_s: float | None = None):
        self.engine, self.observer, self.idle_wait_s = engine, observer, idle_wait_s
        self.max_wait_s = max_wait_s
        self.step_s: float | None = None  # moving average of the step time (loop thread)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False  # set, under _inbox_lock, once the inbox is drained for good
        self._inbox_lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="raymoe-engine-loop", daemon=True)

    # -- caller side (any thread) -----------------------------------------------------
    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self.failure is None and not self._stopping.is_set()

    def check_running(self) -> None:
        if self.failure is not None:
            raise EngineStoppedError(f"a step failed: {self.failure!r}")
        if not self.running:
            raise EngineStoppedError("stopped")

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; returns its stream once the engine has accepted it. Raises the
        engine's ``RequestError`` / ``QueueFullError``, or ``EngineStoppedError``."""
        return (await self.submit_all([(prompt_ids, params)]))[0]

    async def submit_all(self, requests: list[tuple[list[int], SamplingParams]]) -> list[RequestStream]:
        """Queue several requests together (they join the same step); all or none: if one is
        refused, the accepted ones are aborted and the first refusal is raised."""
        self.check_running()
        loop = asyncio.get_running_loop()
        items = [_Add(list(ids), params, RequestStream(f"req-{next(self._ids)}", list(ids), loop),
                      concurrent.futures.Future(), first=i == 0) for i, (ids, params) in enumerate(requests)]
        with self._inbox_lock:  # nothing enters the inbox after the loop's last look at it
            if self._closed:
                raise EngineStoppedError(f"a step failed: {self.failure!r}" if self.failure else "stopped")
            for item in items:
                self._inbox.put(item)
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(i.accepted) for i in items), return_exceptions=True)
        except asyncio.CancelledError:  # the caller went away; drop whatever was accepted meanwhile
            self._abort_accepted(items)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self._abort_accepted(items)
            raise errors[0]
        return [item.stream for item in items]

    def _abort_accepted(self, items: list[_Add]) -> None:
        for item in items:
            future = item.accepted
            if future.done() and not future.cancelled() and future.exception() is None:
                self.abort(item.stream.request_id)

    async def call(self, fn: Callable[[Engine], object]):
        """Run ``fn(engine)`` on the loop thread between two steps (e.g. a live plan change:
        ``lambda engine: engine.set_plan(plan)``); its result, or its exception."""
        self.check_running()
        item = _Call(fn, concurrent.futures.Future())
        with self._inbox_lock:
            if self._closed:
                raise EngineStoppedError(f"a step failed: {self.failure!r}" if self.failure else "stopped")
            self._inbox.put(item)
        return await asyncio.wrap_future(item.done)

    def abort(self, request_id: str) -> None:
        """Cancel a request (its client went away); its KV-cache slot is freed before the next step."""
        self._inbox.put(_Abort(request_id))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop stepping; requests still in flight get a ``FailEvent``."""
        self._stopping.set()
        self._inbox.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    # -- loop thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._take_inbox(block=not self.engine.has_work())
                self._report_load()
                if self._stopping.is_set() or not self.engine.has_work():
                    continue
                started, recoveries = time.perf_counter(), len(getattr(self.engine, "recoveries", ()))
                result = self.engine.step()
                now = time.perf_counter()
                if len(getattr(self.engine, "recoveries", ())) == recoveries:  # a recovered step is no estimate
                    self._time_step(now - started)
                self._publish(result, now)
                if self.observer is not None:
                    self.observer.on_step(self.engine, result, now - started)
                self._report_load()
        except BaseException as exc:  # a dead actor, a collective timeout: the engine is unusable
            log.exception("engine step failed; failing %d requests in flight", len(self._streams))
            self.failure = exc
        finally:
            self._fail_all(EngineStoppedError(f"a step failed: {self.failure!r}" if self.failure else "stopped"))

    def _report_load(self) -> None:
        if self.observer is not None:
            scheduler = self.engine.scheduler
            self.observer.on_load(len(scheduler.waiting), len(scheduler.running), len(self._streams))

    def _take_inbox(self, block: bool) -> None:
        """Apply queued adds and aborts; when idle, wait for the first one."""
        try:
            item = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Add):
                self._add(item)
            elif isinstance(item, _Abort):
                self._abort(item.request_id)
            elif isinstance(item, _Call) and item.done.set_running_or_notify_cancel():
                try:
                    item.done.set_result(item.fn(self.engine))
                except Exception as exc:  # the caller's to report; a broken engine fails the next step
                    item.done.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _time_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else (1 - STEP_EWMA) * self.step_s + STEP_EWMA * seconds

    def _add(self, item: _Add) -> None:
        if not item.accepted.set_running_or_notify_cancel():  # the caller went away meanwhile
            return
        # a submission's later choices wait behind its first ones: only its first is judged by the wait
        policy = AdmissionPolicy(self.engine.max_queue, self.max_wait_s if item.first else None)
        refused = refusal(policy, self.engine.scheduler, self.step_s)
        if refused is not None:
            if self.observer is not None:
                self.observer.on_refuse(refused)
            item.accepted.set_exception(refused)
            return
        try:
            self.engine.add_request(item.prompt_ids, item.params, item.stream.request_id)
        except Exception as exc:  # RequestError, QueueFullError: the caller's to report
            item.accepted.set_exception(exc)
            return
        self._streams[item.stream.request_id] = item.stream
        item.accepted.set_result(item.stream.request_id)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and self.engine.abort(request_id) and self.observer is not None:
            self.observer.on_abort(stream)

    def _publish(self, result: StepResult, now: float) -> None:
        """Hand each request its events; one thread-safe call per event loop per step."""
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        finished = result.finished
        for request_id, token in result.tokens.items():
            stream = self._streams.get(request_id)
            if stream is not None:
                if self.observer is not None:
                    self.observer.on_token(stream, now)
                stream.first_token_at = stream.first_token_at or now
                stream.last_token_at = now
                batches[stream.loop].append((stream.queue, TokenEvent(token, now, result.logprobs.get(request_id),
                                                                      result.prompt_logprobs.get(request_id))))
        for completion in finished:
            stream = self._streams.pop(completion.request_id, None)
            if stream is not None:
                if self.observer is not None:
                    self.observer.on_finish(stream, completion, now)
                batches[stream.loop].append((stream.queue, FinishEvent(completion, now)))
        for loop, events in batches.items():
            _call_soon(loop, _deliver, events)

    def _fail_all(self, error: EngineStoppedError) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for stream in self._streams.values():
            batches[stream.loop].append((stream.queue, FailEvent(error)))
        self._streams.clear()
        for loop, events in batches.items():
            _call_soon(loop, _deliver, events)
        with self._inbox_lock:
            self._closed = True
        while True:  # callers still waiting for acceptance
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Add) and item.accepted.set_running_or_notify_cancel():
                item.accepted.set_exception(error)
            elif isinstance(item, _Call) and item.done.set_running_or_notify_cancel():
                item.done.set_exception(error)


def _deliver(events: list) -> None:
    for q, event in events:
        q.put_nowait(event)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
