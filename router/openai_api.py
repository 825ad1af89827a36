"""OpenAI-compatible HTTP API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

The routes reach the engine only through an ``EngineClient``, so the same app fronts a local ``AsyncEngine``
(tests, one process) and the Ray Serve router replicas. Every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}`` and never a stack trace. A request the engine refuses is
refused before the first byte is streamed, so a streaming client still gets a real status (400 / 429 / 503).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, ContextManager, Protocol

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from router.auth import check_bearer
from router.openai_schema import (ApiError, ChatBody, CompletionBody, SamplingBody, bad_request, check_unsupported,
                                  internal_error, sampling_params, validation_error)
from router.request import GenerationOutput, GenerationRequest, InvalidRequestError, OverloadedError, Usage

log = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # what OpenAI reports for -inf: JSON has no infinity
MAX_REQUEST_ID_CHARS = 128
# Engine finish reasons that OpenAI has no word for keep their own; "deadline" reads better as "timeout".
FINISH_REASONS = {"deadline": "timeout"}

# ----------------------------------------------------------------------------- engine side


class ServiceUnavailable(Exception):
    """The engine cannot take requests now (loading, warming up, no healthy replica): HTTP 503."""


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Any  # models.tokenizer.Tokenizer: encode, decode, apply_chat_template

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationOutput, None]:
        """An async generator (``async def`` with ``yield``) of the request's outputs. Raises
        ``InvalidRequestError`` / ``OverloadedError`` / ``ServiceUnavailable`` before the first output;
        closing it (``aclose``) must abort the request."""


class LocalEngineClient:
    """An ``AsyncEngine`` in this process as an ``EngineClient``."""

    def __init__(self, async_engine, tokenizer, model_name: str):
        self.engine, self.tokenizer, self.model_name = async_engine, tokenizer, model_name
        self.max_model_len = async_engine.engine.max_model_len

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationOutput, None]:
        return self.engine.generate(request)  # the engine's own generator: closing it aborts the request


def _no_trace(headers: Mapping[str, str]) -> ContextManager:
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- endpoints


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _merge(outputs: list[GenerationOutput]) -> GenerationOutput:
    """A whole non-streamed answer as one output."""
    last = outputs[-1]
    return GenerationOutput(
        request_id=last.request_id, token_ids=sum((o.token_ids for o in outputs), ()),
        text_delta="".join(o.text_delta for o in outputs), logprobs=sum((o.logprobs for o in outputs), ()),
        top_logprobs=sum((o.top_logprobs for o in outputs), ()), finish_reason=last.finish_reason,
        usage=last.usage, error=last.error)


class _Endpoint:
    """One route's translation: request body -> prompt ids and sampling; engine outputs -> OpenAI bodies."""

    id_prefix = object_name = chunk_object_name = context_param = ""

    def __init__(self, body, client: EngineClient, request_id: str | None):
        self.body, self.client, self.tok = body, client, client.tokenizer
        self.id = request_id or f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def prompt_ids(self) -> list[int]:
        raise NotImplementedError

    def limits(self, prompt_len: int) -> tuple[int | None, int | None]:
        """(max_tokens, number of top log-probs or None)."""
        raise NotImplementedError

    def choice(self, out: GenerationOutput) -> dict:
        raise NotImplementedError

    def generation_request(self) -> GenerationRequest:
        prompt = self.prompt_ids()
        max_tokens, logprobs = self.limits(len(prompt))
        self._check_context(len(prompt), max_tokens)
        return GenerationRequest(self.id, tuple(prompt), sampling_params(self.body, max_tokens, logprobs))

    def _check_context(self, prompt_len: int, max_tokens: int | None) -> None:
        # The engine checks this too; checking here names the field to change.
        limit = self.client.max_model_len
        if prompt_len >= limit:
            raise bad_request(f"the prompt is {prompt_len} tokens but the context length is {limit} tokens "
                       "(and at least one token must be left to generate)", self.context_param)
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise bad_request(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                       f"exceeds the context length of {limit} tokens", "max_tokens")

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        return {"id": self.id, "object": self.chunk_object_name if chunk else self.object_name,
                "created": self.created, "model": self.client.model_name, "choices": choices}

    def response(self, out: GenerationOutput) -> dict:
        return {**self._envelope([self.choice(out)], chunk=False), "usage": _usage(out.usage)}

    def chunk(self, out: GenerationOutput) -> dict:
        body = self._envelope([self.choice(out)], chunk=True)
        return {**body, "usage": None} if self.include_usage else body  # OpenAI: null in all but the last

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._envelope([], chunk=True), "usage": _usage(usage)}

    @property
    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)


class _Completions(_Endpoint):
    id_prefix, object_name, chunk_object_name, context_param = "cmpl", "text_completion", "text_completion", "prompt"

    def __init__(self, *args):
        super().__init__(*args)
        self.text_offset = 0  # of the next token, across stream chunks

    def prompt_ids(self) -> list[int]:
        prompt = self.body.prompt
        return self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)  # ids are taken as given

    def limits(self, prompt_len: int) -> tuple[int | None, int | None]:
        return self.body.max_tokens, self.body.logprobs

    def choice(self, out: GenerationOutput) -> dict:
        logprobs = None if self.body.logprobs is None else self._logprobs(out)
        return {"index": 0, "text": out.text_delta, "logprobs": logprobs,
                "finish_reason": _finish_reason(out.finish_reason)}

    def _logprobs(self, out: GenerationOutput) -> dict:
        tokens = [self.tok.decode([t]) for t in out.token_ids]
        offsets = []
        for token in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [_finite(lp) for lp in out.logprobs],
                "top_logprobs": [None if top is None else {self.tok.decode([i]): _finite(lp) for i, lp in top}
                                 for top in out.top_logprobs],
                "text_offset": offsets}


class _Chat(_Endpoint):
    id_prefix, object_name, chunk_object_name, context_param = (
        "chatcmpl", "chat.completion", "chat.completion.chunk", "messages")

    def __init__(self, *args):
        super().__init__(*args)
        self.sent_role = False

    def prompt_ids(self) -> list[int]:
        messages = [m.model_dump(include={"role", "content"}) for m in self.body.messages]
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        except jinja2.TemplateError as e:  # the checkpoint's template refuses this conversation
            raise bad_request(f"messages: the chat template rejected them: {e}", "messages") from None
        return self.tok.encode(text, add_bos=False)  # the template already starts with BOS

    def limits(self, prompt_len: int) -> tuple[int | None, int | None]:
        body = self.body
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        # Like OpenAI, no limit means "until the context is full".
        max_tokens = body.max_completion_tokens or body.max_tokens or max(self.client.max_model_len - prompt_len, 1)
        return max_tokens, (body.top_logprobs or 0) if body.logprobs else None

    def choice(self, out: GenerationOutput) -> dict:
        logprobs = {"content": self._logprobs(out)} if self.body.logprobs else None
        finish = _finish_reason(out.finish_reason)
        if not self.body.stream:
            return {"index": 0, "message": {"role": "assistant", "content": out.text_delta}, "logprobs": logprobs,
                    "finish_reason": finish}
        delta = {"content": out.text_delta} if self.sent_role else {"role": "assistant", "content": out.text_delta}
        self.sent_role = True
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self, out: GenerationOutput) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.tok.decode([token_id])
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

        return [{**entry(t, lp), "top_logprobs": [entry(i, x) for i, x in top or ()]}
                for t, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs)]


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else FINISH_REASONS.get(reason, reason)


# ----------------------------------------------------------------------------- plumbing


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (declared or actually sent)."""
    too_large = ApiError(413, f"the request body is larger than the limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():  # a body without (or lying about) Content-Length is counted as it comes
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _request_id(request: Request) -> str | None:
    rid = request.headers.get("x-request-id")
    if rid is not None and not (0 < len(rid) <= MAX_REQUEST_ID_CHARS and rid.isascii() and rid.isprintable()):
        raise bad_request(f"the X-Request-Id header must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters")
    return rid


def _get_client(client_getter: Callable[[], EngineClient]) -> EngineClient:
    try:
        return client_getter()
    except (ServiceUnavailable, RuntimeError) as e:
        raise _unavailable(e) from None


def _unavailable(e: Exception) -> ApiError:
    return ApiError(503, f"the model is not ready to serve: {e}", "server_error", code="service_unavailable",
                    headers={"Retry-After": "5"})


def _check_model(name: str | None, client: EngineClient) -> None:
    if name is not None and name != client.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {client.model_name!r}",
                       param="model", code="model_not_found")


async def _first_output(outputs: AsyncGenerator[GenerationOutput, None]) -> GenerationOutput:
    """The first output; the engine's refusals (raised before it) become HTTP errors."""
    try:
        return await anext(outputs)
    except InvalidRequestError as e:
        raise bad_request(str(e)) from None
    except OverloadedError as e:
        raise ApiError(429, str(e), "rate_limit_exceeded", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except ServiceUnavailable as e:
        raise _unavailable(e) from None
    except StopAsyncIteration:
        raise ApiError(500, "the engine ended the request without any output", "server_error") from None


def _generation_failed(out: GenerationOutput) -> ApiError:
    return ApiError(500, f"generation failed: {out.error or 'unknown engine error'}", "server_error")


async def _collect(first: GenerationOutput, outputs: AsyncGenerator[GenerationOutput, None]) -> GenerationOutput:
    collected = [first]
    async with contextlib.aclosing(outputs):
        while not collected[-1].finished:
            collected.append(await anext(outputs))
    merged = _merge(collected)
    if merged.finish_reason == "error":
        raise _generation_failed(merged)
    return merged


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _events(endpoint: _Endpoint, first: GenerationOutput,
                  outputs: AsyncGenerator[GenerationOutput, None]) -> AsyncGenerator[bytes, None]:
    """The SSE stream. Closing it (client gone) closes ``outputs``, which aborts the request in the engine."""
    async with contextlib.aclosing(outputs):
        try:
            out = first
            while True:
                if out.finish_reason == "error":
                    yield _sse(_generation_failed(out).body())
                    break
                yield _sse(endpoint.chunk(out))
                if out.finished:
                    if endpoint.include_usage:
                        yield _sse(endpoint.usage_chunk(out.usage))
                    break
                out = await anext(outputs)
        except Exception as e:  # headers are sent: the error can only be told in the stream
            log.exception("stream %s failed", endpoint.id)
            yield _sse(internal_error(e).body())
        yield b"data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette stops iterating when the client goes away but leaves a generator paused at a `yield`
            # open; closing it now frees the engine's work at once, not whenever it is garbage-collected.
            await self.body_iterator.aclose()


async def _serve(request: Request, endpoint_cls: type[_Endpoint], body_cls: type[SamplingBody],
                 client_getter: Callable[[], EngineClient], max_body_bytes: int,
                 trace_context: Callable[[Mapping[str, str]], ContextManager]) -> Response:
    try:
        body = body_cls.model_validate_json(await _read_body(request, max_body_bytes))
    except ValidationError as e:
        raise validation_error(e) from None
    check_unsupported(body)
    client = _get_client(client_getter)
    _check_model(body.model, client)
    endpoint = endpoint_cls(body, client, _request_id(request))
    generation = endpoint.generation_request()
    headers = {"X-Request-Id": endpoint.id}
    # Entered only in this task: the rest of a stream is sent from another task, where a context entered here
    # could not be exited. The request is handed to the engine (and, not streaming, finished) inside it.
    with trace_context(request.headers):
        outputs = client.generate(generation)
        first = await _first_output(outputs)
        if not body.stream:
            return JSONResponse(endpoint.response(await _collect(first, outputs)), headers=headers)
    return _EventStream(_events(endpoint, first, outputs),
                        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------- the app


def build_openai_app(client_getter: Callable[[], EngineClient], api_token: str | None,
                     max_body_bytes: int = 4 << 20,
                     trace_context: Callable[[Mapping[str, str]], ContextManager] = _no_trace) -> FastAPI:
    """The API app. ``client_getter`` is called per request (raise ``ServiceUnavailable`` / ``RuntimeError``
    while the engine is not ready: 503). ``api_token`` None turns auth off. ``trace_context(headers)`` is
    entered around handing each request to the engine, e.g. to continue a W3C ``traceparent``."""

    async def authorize(request: Request) -> None:
        if not check_bearer(request.headers.get("authorization"), api_token):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <token>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # Checked per route, not app-wide: routes a deployment adds later (a probe's /healthz) stay reachable
    # without the token. No /docs or /openapi.json: they would be open too.
    auth = [Depends(authorize)]
    app = FastAPI(title="moe-serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return e.response()

    @app.exception_handler(HTTPException)  # unknown path (404), wrong method (405): the same error shape
    async def http_error(request: Request, e: HTTPException) -> Response:
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                        headers=e.headers).response()

    async def serve(request: Request, endpoint_cls, body_cls) -> Response:
        try:
            return await _serve(request, endpoint_cls, body_cls, client_getter, max_body_bytes, trace_context)
        except ApiError:
            raise
        except Exception as e:
            log.exception("%s %s failed", request.method, request.url.path)
            raise internal_error(e) from None

    started = int(time.time())

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        client = _get_client(client_getter)
        return {"object": "list", "data": [{"id": client.model_name, "object": "model", "created": started,
                                            "owned_by": "moe-serve", "max_model_len": client.max_model_len}]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        return await serve(request, _Completions, CompletionBody)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        return await serve(request, _Chat, ChatBody)

    return app
