"""asyncio front of the engine: one thread owns the ``Engine`` and runs steps; callers stream results.

Every change to the engine happens on its thread (commands are queued to it), so the engine needs no locks.
A consumer that stops listening (cancelled task, closed generator, passed deadline) aborts its request, which
frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from router.engine import Engine
from router.request import EngineError, GenerationOutput, GenerationRequest
from router.tracing import tracer

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self.step_error: str | None = None  # set when a step failed (e.g. an expert shard stopped answering)
        self._thread = threading.Thread(target=self._loop, name="moe-serve-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream the request's outputs; raises ``InvalidRequestError`` / ``OverloadedError`` before the first."""
        loop, stream = asyncio.get_running_loop(), asyncio.Queue()
        finished = rejected = False
        try:
            try:
                await self.call(lambda: self._add(request, loop, stream))
            except EngineError:
                rejected = True  # never queued: nothing to abort (and the id may belong to another request)
                raise
            while not finished:
                out: GenerationOutput = await stream.get()
                finished = out.finished
                yield out
        finally:
            if not (finished or rejected):  # the consumer went away (or was cancelled while adding): stop now
                self._commands.put(lambda: self._abort(request.request_id))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run():
            try:
                result = fn()
            except BaseException as e:  # handed to the caller, not lost on this thread
                loop.call_soon_threadsafe(_set, fut, None, e)
            else:
                loop.call_soon_threadsafe(_set, fut, result, None)

        self._commands.put(run)
        return await fut

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=30)

    # -- engine thread -------------------------------------------------------------------------
    def _add(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, stream: asyncio.Queue) -> None:
        self.engine.add_request(request)
        self._streams[request.request_id] = (loop, stream)

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._streams.pop(request_id, None)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:  # block only when idle; otherwise just pick up what arrived during the last step
                commands = [self._commands.get(timeout=None if not self.engine.has_work() else 0)]
            except queue.Empty:
                commands = []
            while not self._commands.empty():
                commands.append(self._commands.get_nowait())
            for command in commands:
                command()
            if self.engine.has_work():
                self._deliver(self._step())

    def _step(self) -> list[GenerationOutput]:
        try:
            with tracer().start_as_current_span("engine.step") as span:  # sampled: a root span per step
                outputs = self.engine.step()
                span.set_attribute("outputs", len(outputs))
                return outputs
        except Exception as e:  # a failed step must not leave streams hanging or blocks allocated
            log.exception("engine step failed")
            self.step_error = f"{type(e).__name__}: {e}"
            return self.engine.fail_all(f"internal error during generation: {type(e).__name__}")

    def _deliver(self, outputs: list[GenerationOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, out)


def _set(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
